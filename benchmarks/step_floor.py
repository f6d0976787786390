"""Every second of a real-model GRPO step against its arithmetic floor on this machine.

    python benchmarks/step_floor.py                                    # the SmolLM2 recipe, 6 steps
    python benchmarks/step_floor.py --config configs/smollm2-135m-cpu.yaml --steps 8 --repo /path/to/other/checkout

First this machine's rates: bf16 and float32 matmul (2048², all threads) and memory bandwidth (a 512 MiB copy).
Then `--steps` optimizer steps of the recipe through `train.py fit` in a child process (validation and preflight off),
with the step's phases timed by wrapping the module's own methods, and for each phase the floor its work implies:

- generation: B·G·T tokens decoded in T steps; each step reads every weight once (memory-bound at this batch), and
  the whole decode does 2·params FLOPs per token — the floor is the larger of the two;
- reference forward: 2·params FLOPs per token it runs (each prompt once, every completion token);
- policy forward + backward: 6·params FLOPs per token (forward, and a backward twice its cost);
- optimizer: AdamW reads weights, gradients and both moments and writes three of them: 28 bytes per parameter;
- weight sync: every weight read once and written once into the engine (2 · 4 bytes per parameter, float32).

The training rate is bf16's where the run trains in bf16, else float32's. `--repo` runs another checkout (e.g. a
`git worktree` of an earlier commit) in the same way, for before/after ratios measured in one run (`--repo-config`:
its recipe, where its config schema differs). Each checkout's raw timings go to `<out>/step_floor-<folder>.json`;
`--profile` also writes the third step's policy phase by operator (torch profiler) beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = [  # (module method, phase name)
    ("generate", "generation"), ("reference_logprobs", "reference forward"), ("optimize", "policy fwd+bwd+optimizer"),
    ("clip_and_step", "optimizer"), ("sync_weights", "weight sync"), ("score", "rewards"),
]  # fmt: skip


def machine_rates() -> dict[str, float]:
    import torch

    def matmul_tflops(dtype) -> float:
        a = torch.randn(2048, 2048).to(dtype)
        a @ a
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < 1.0:
            a @ a
            n += 1
        return 2 * 2048**3 * n / (time.perf_counter() - start) / 1e12

    src = torch.empty(512 * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    bandwidth = 5 * 2 * src.numel() * 4 / (time.perf_counter() - start) / 1e9  # read + write
    return {"bf16_tflops": matmul_tflops(torch.bfloat16), "fp32_tflops": matmul_tflops(torch.float32),
            "bandwidth_gbs": bandwidth}  # fmt: skip


def child(args: argparse.Namespace) -> None:
    """In the checkout under test: fit the recipe for --steps steps with every phase timed."""
    sys.path.insert(0, os.getcwd())
    import torch

    from grpo_lightning import cli
    from grpo_lightning.module import GRPOModule

    times: dict[str, list[float]] = {}
    shapes: list[dict] = []

    def timed(method: str, phase: str, owner: type = GRPOModule):
        inner = getattr(owner, method)

        def wrapper(self, *a, **k):
            start = time.perf_counter()
            try:
                return inner(self, *a, **k)
            finally:
                times.setdefault(phase, []).append(time.perf_counter() - start)

        setattr(owner, method, wrapper)

    for method, phase in PHASES:
        if hasattr(GRPOModule, method):  # checkouts differ in where a phase lives
            timed(method, phase)
    try:
        from grpo_lightning.rollout_worker import RolloutWorker

        timed("sync", "weight sync", RolloutWorker)
    except ImportError:
        pass
    generate = GRPOModule.generate

    def record_shapes(self, questions):
        rollout, seconds = generate(self, questions)
        shapes.append({"completions": len(rollout.completion_ids), "tokens": rollout.num_tokens,
                       "longest": max(len(c) for c in rollout.completion_ids),
                       "prompt_tokens": sum(len(p) for p in rollout.prompt_ids)})  # fmt: skip
        return rollout, seconds

    GRPOModule.generate = record_shapes
    if args.profile:  # the policy phase of the third step (a steady one), by operator
        optimize, calls = GRPOModule.optimize, []

        def profiled(self, *a, **k):
            calls.append(1)
            if len(calls) != 3:
                return optimize(self, *a, **k)
            with torch.profiler.profile() as prof:
                result = optimize(self, *a, **k)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
            (Path(args.out) / f"policy-profile-{Path.cwd().name}.txt").write_text(table)
            return result

        GRPOModule.optimize = profiled
    stamps: list[float] = []
    import lightning as L

    class Stamp(L.Callback):
        def on_train_batch_end(self, *a, **k):
            stamps.append(time.perf_counter())

    overrides = ["--trainer.max_steps", str(args.steps), "--data.val_size", "0", "--trainer.default_root_dir", args.out,
                 "--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false"]  # fmt: skip
    if Path("grpo_lightning/preflight.py").exists():  # checkouts from before the preflight have no such field
        overrides += ["--model.rewards.preflight", "off"]
    cli_obj = cli.main(["--config", args.config, *overrides], run=False)
    cli_obj.trainer.callbacks.append(Stamp())
    cli_obj.trainer.fit(cli_obj.model, datamodule=cli_obj.datamodule)
    model = cli_obj.model
    print(json.dumps({
        "step_seconds": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
        "phases": {k: v[1:] for k, v in times.items()},  # the first step warms up
        "shapes": shapes[1:],
        "params": sum(p.numel() for p in model.policy.parameters()),
        "precision": str(cli_obj.trainer.precision),
        "threads": __import__("torch").get_num_threads(),
    }))  # fmt: skip


def floors(result: dict, rates: dict) -> dict[str, float]:
    P = result["params"]
    shape = {k: statistics.fmean(s[k] for s in result["shapes"]) for k in result["shapes"][0]}
    bf16 = "bf16" in result["precision"]
    train_flops = (rates["bf16_tflops"] if bf16 else rates["fp32_tflops"]) * 1e12
    bandwidth = rates["bandwidth_gbs"] * 1e9
    weight_bytes = P * (2 if bf16 else 4)
    run_tokens = shape["prompt_tokens"] + shape["tokens"]  # each prompt once, every completion token
    return {
        "generation": max(shape["longest"] * weight_bytes / bandwidth, 2 * P * shape["tokens"] / train_flops),
        "reference forward": 2 * P * run_tokens / train_flops,
        "policy fwd+bwd+optimizer": 6 * P * run_tokens / train_flops + 28 * P / bandwidth,
        "optimizer": 28 * P / bandwidth,
        "weight sync": 8 * P / bandwidth,
    }


def measure(repo: Path, config: str, steps: int, out: str, profile: bool = False) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "2",
           "WANDB_MODE": "disabled", "PYTHONPATH": str(repo)}  # fmt: skip
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--config",
        str(Path(config).resolve()),
        "--steps",
        str(steps),
        "--out",
        out,
    ] + (["--profile"] if profile else [])
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{repo}: failed\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "smollm2-135m-cpu.yaml"), help="recipe to time")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps (the first is a warm-up)")
    parser.add_argument("--repo", action="append", default=[], help="also time this checkout (before/after ratios)")
    parser.add_argument("--repo-config", help="the recipe for the --repo checkouts, if their config schema differs")
    parser.add_argument("--out", default="runs/step-floor", help="scratch run folder")
    parser.add_argument("--profile", action="store_true", help="write the third step's policy phase by operator "
                        "to <out>/policy-profile-<checkout folder>.txt")  # fmt: skip
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    args.out = str(Path(args.out).resolve())  # every checkout's child writes beside the others
    Path(args.out).mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    from grpo_lightning.hardware import cpu_description

    rates = machine_rates()
    print(f"machine: {cpu_description()}; bf16 matmul {rates['bf16_tflops']:.2f} TFLOP/s, float32 "
          f"{rates['fp32_tflops']:.2f} TFLOP/s, memory {rates['bandwidth_gbs']:.1f} GB/s")  # fmt: skip
    steps = []  # (checkout, median s/step): the same checkout may run twice, under two recipes
    for repo in [REPO, *map(Path, args.repo)]:
        config = args.config if repo == REPO else args.repo_config or args.config
        result = measure(repo, config, args.steps, args.out, args.profile)
        (Path(args.out) / f"step_floor-{repo.name}.json").write_text(json.dumps(result))
        step = statistics.median(result["step_seconds"][1:] or result["step_seconds"])
        steps.append((f"{repo} {Path(config).name}", step))
        print(f"\n{repo}: {step:.2f} s/step (median of steady steps), precision {result['precision']}, "
              f"{result['threads']} torch threads, {result['params'] / 1e6:.1f} M parameters")  # fmt: skip
        print(f"  {'phase':26s} {'measured s':>10s} {'floor s':>9s} {'ratio':>7s}")
        floor = floors(result, rates)
        for phase, values in result["phases"].items():
            measured = statistics.median(values) if values else float("nan")
            f = floor.get(phase)
            ratio = f"{measured / f:7.1f}" if f else "      —"
            print(f"  {phase:26s} {measured:10.3f} {f if f else float('nan'):9.3f} {ratio}")
    (base, base_step), *others = steps
    for other, other_step in others:
        print(f"step_ratio={base_step / other_step:.3f} ({base} / {other})")


if __name__ == "__main__":
    main()
