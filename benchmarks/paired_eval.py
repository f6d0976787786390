"""Two `grpo evaluate` outputs on the same problems, compared pair by pair (BENCHMARKS.md §1b).

    python benchmarks/paired_eval.py eval/base-gsm8k500 eval/trained-gsm8k500

For each per-problem field: both means with 95 % intervals, and the mean difference with the 95 % interval of the
paired differences (1.96 standard errors), over the problems both folders graded. A field that either folder's
records lack (made before the field existed) is left out.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

FIELDS = ("strict_correct", "lenient_correct", "strict_format", "soft_format", "notebook_strict_format",
          "reasoning_copied", "completion_tokens", "reasoning_tokens")  # fmt: skip


def records(folder: str) -> dict[int, dict]:
    lines = (Path(folder) / "problems.jsonl").read_text(encoding="utf-8").splitlines()
    return {r["index"]: r for r in map(json.loads, lines)}


def mean_interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95 % interval."""
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
    return mean, 1.96 * math.sqrt(variance / len(values))


def compare(base_dir: str, other_dir: str) -> dict[str, dict[str, tuple[float, float]]]:
    base, other = records(base_dir), records(other_dir)
    shared = sorted(set(base) & set(other))
    if not shared:
        raise SystemExit(f"paired_eval: {base_dir} and {other_dir} graded no problem in common")
    table = {}
    for field in (f for f in FIELDS if f in base[shared[0]] and f in other[shared[0]]):
        b = [float(base[i][field]) for i in shared]
        o = [float(other[i][field]) for i in shared]
        diff = [y - x for x, y in zip(b, o, strict=True)]
        table[field] = {"base": mean_interval(b), "other": mean_interval(o), "difference": mean_interval(diff)}
    return table


def main(base_dir: str, other_dir: str) -> None:
    for field, row in compare(base_dir, other_dir).items():
        print(f"{field:18s} " + "   ".join(f"{name} {m:+.3f} ± {h:.3f}" for name, (m, h) in row.items()))


if __name__ == "__main__":
    main(*sys.argv[1:3])
