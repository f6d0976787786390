"""Plot a run's training curves from its Lightning CSV metrics into one PNG.

    python scripts/plot_run.py runs/smollm2-135m-cpu/csv/version_0/metrics.csv docs/images/smollm2-135m-cpu.png

Panels: total reward with the tag-count, strict/soft format and correctness rewards, validation accuracy and format rate, completion
length, and KL to the reference. A metric the run did not log is left out.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

PANELS = {
    "reward (mean of the step's completions)": ["train/reward", "train/rewards/xmlcount_reward_func", "train/rewards/strict_format_reward_func",
                                                "train/rewards/soft_format_reward_func", "train/rewards/correctness_reward_func"],
    "validation (greedy)": ["val/strict_accuracy", "val/lenient_accuracy", "val/strict_format_rate", "val/soft_format_rate",
                            "val/notebook_strict_format_rate"],
    "completion length (tokens)": ["train/completion_length"],
    "KL to the reference": ["train/kl"],
}  # fmt: skip


def series(rows: list[dict[str, str]], key: str) -> tuple[list[int], list[float]]:
    points = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
    return [p[0] for p in points], [p[1] for p in points]


def smooth(values: list[float], window: int = 10) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    windows = (values[max(0, i - window + 1) : i + 1] for i in range(len(values)))
    return [sum(w) / len(w) for w in windows]


def main(csv_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    panels = {title: [k for k in keys if any(r.get(k) for r in rows)] for title, keys in PANELS.items()}
    panels = {title: keys for title, keys in panels.items() if keys}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4))
    for ax, (title, keys) in zip(axes if len(panels) > 1 else [axes], panels.items(), strict=False):
        for key in keys:
            steps, values = series(rows, key)
            label = key.split("/")[-1].removesuffix("_reward_func")
            if key.startswith("val/"):
                ax.plot(steps, values, marker="o", label=label)
            else:
                ax.plot(steps, values, alpha=0.25)
                ax.plot(steps, smooth(values), label=f"{label} (10-step mean)", color=ax.lines[-1].get_color())
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    print(f"wrote {png_path}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
