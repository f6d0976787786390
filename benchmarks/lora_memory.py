"""Peak memory of GRPO training with full fine-tuning vs LoRA, on a Qwen2.5-0.5B-shaped model, CPU.

    python benchmarks/lora_memory.py                 # 2 optimizer steps per side
    python benchmarks/lora_memory.py --steps 1 --rank 16 --alpha 64

The model has Qwen2.5-0.5B-Instruct's architecture (hidden 896, 24 layers, 14/2 heads, MLP 4864, 151,936-token
tied vocabulary: 494 M parameters), randomly initialised offline and saved once to a temporary folder. Each side is
a fresh `train.py fit` child (the real training step: HF rollouts, reference log-probs, policy loss, AdamW) with the
same recipe: B = 1 prompt, G = 4 completions of 16 tokens, β = 0.04, bf16 autocast. `full` trains every weight and
keeps a frozen reference copy; `lora` trains adapters on every projection (the notebook's variant: r 16, α 64) and
uses the base model with adapters off as the reference. Printed per side: peak RSS of the child, trainable
parameters, and the bytes of weights + gradients + AdamW state + reference that the two designs need.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from grpo_lightning.tiny import build_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
QWEN_05B = {"hidden_size": 896, "num_layers": 24, "intermediate_size": 4864, "num_attention_heads": 14,
            "num_key_value_heads": 2, "max_position_embeddings": 32768}  # fmt: skip
VOCAB = 151936
CHILD = """
import json, resource, sys, time
from grpo_lightning.cli import main
start = time.perf_counter()
cli = main(["fit", "--config", sys.argv[1]])
policy = cli.model.policy
print("RESULT " + json.dumps({
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "trainable": sum(p.numel() for p in policy.parameters() if p.requires_grad),
    "total": sum(p.numel() for p in policy.parameters()),
    "reference_copy": cli.model.reference is not None,
    "seconds": time.perf_counter() - start,
}))
"""


def recipe(model: Path, run_dir: Path, steps: int, lora: dict | None) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "bf16-mixed", "max_steps": steps, "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(run_dir)},
        "model": {"policy": {"name_or_path": str(model)},
                  "grpo": {"num_generations": 4, "beta": 0.04, "gradient_accumulation_steps": 2, "max_prompt_length": 128},
                  "sampling": {"max_tokens": 16, "min_tokens": 16}, "optim": {"lr": 1e-5, "warmup_ratio": 0.0}},
        "data": {"source": "synthetic", "synthetic_size": 64, "batch_size": 1},
    }  # fmt: skip
    if lora:
        cfg["model"]["lora"] = lora
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_side(config: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(config)], cwd=REPO, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"child failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def state_gib(result: dict) -> float:
    """fp32 weights (4 B) + gradients and AdamW's two moments for trainable ones (12 B) + a reference copy (4 B)."""
    total, trainable = result["total"], result["trainable"]
    return (4 * total + 12 * trainable + (4 * total if result["reference_copy"] else 0)) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=64.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        model = build_tiny_checkpoint(tmp / "qwen2.5-0.5b-shaped", vocab_size=VOCAB, **QWEN_05B)
        print(f"model folder written in {time.perf_counter() - started:.0f} s")
        sides = {"full": None, "lora": {"rank": args.rank, "alpha": args.alpha, "dropout": 0.05}}
        results = {}
        for name, lora in sides.items():
            (tmp / name).mkdir()
            results[name] = run_side(recipe(model, tmp / name, args.steps, lora))
            r = results[name]
            print(f"{name:>4}: peak RSS {r['peak_rss_mib']:8.0f} MiB | trainable {r['trainable'] / 1e6:7.2f} M of "
                  f"{r['total'] / 1e6:.1f} M | weights+grads+AdamW+reference {state_gib(r):5.2f} GiB | "
                  f"{r['seconds']:.0f} s for {args.steps} steps")  # fmt: skip
    full, lora = results["full"], results["lora"]
    print(
        f"rss_ratio={lora['peak_rss_mib'] / full['peak_rss_mib']:.3f} state_ratio={state_gib(lora) / state_gib(full):.3f}"
    )


if __name__ == "__main__":
    main()
