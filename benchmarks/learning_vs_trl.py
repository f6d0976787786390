"""The same GRPO training run on our trainer and on TRL 1.16's GRPOTrainer: reward curves side by side.

    pip install -e ".[bench]"                                   # trl, pinned
    python benchmarks/learning_vs_trl.py --config configs/smollm2-135m-warm.yaml --steps 50

Both sides get what the recipe says: the same model weights (a GGUF policy is written once as an HF folder both
load), the same training problems in the same order (our seeded sampler's order, handed to TRL unshuffled), the
same prompt (system prompt + user template through the chat template), reward functions, their keyword arguments
(``rewards.strict_seed_semantics``, ``rewards.kwargs``) and weights, G, B, sampling temperature and length, learning
rate and schedule (warmup ratio, cosine), AdamW betas and weight decay, β, clipping ε, gradient accumulation, gradient-norm clipping, precision, loss "grpo", the notebook's KL form
(TRL: ``use_bias_correction_kl=False``) and the number of optimizer steps. Validation is off on both sides. TRL
generates with transformers ``generate`` (its vLLM modes do not run on CPU); ours uses the recipe's engine.

Writes ``<out>/ours/metrics.csv``, ``<out>/trl/metrics.csv`` (one row per step: reward, strict format,
correctness, …), ``<out>/summary.json`` (wall times, last-20 % means with standard errors) and the figure
``<out>/reward_curves.png``. Either side can be rerun alone with ``--sides``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PANELS = ("strict_format_reward_func", "correctness_reward_func", "last_number_reward_func")  # drawn when used
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
    "VLLM_CPU_KVCACHE_SPACE": "2",
}


def recipe(config: str, steps: int):
    from grpo_lightning.cli import main

    cli = main(["--config", config, "--trainer.max_steps", str(steps), "--data.val_size", "0"], run=False)
    cli.datamodule.setup("fit")
    return cli


def curves(funcs: list[str]) -> dict[str, tuple[str, str]]:
    """Panel → (our metric, TRL's log key): the total reward and each of the recipe's rewards named in PANELS
    (none when the recipe has one reward: its panel would repeat the total's)."""
    used = [name for name in PANELS if name in funcs] if len(funcs) > 1 else []
    return {"total reward": ("train/reward", "reward")} | {
        name.removesuffix("_func").replace("_", " "): (f"train/rewards/{name}", f"rewards/{name}/mean") for name in used
    }


def run_ours(config: str, steps: int, out: Path, panels: dict[str, tuple[str, str]]) -> float:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "train.py"), "fit", "--config", config, "--trainer.max_steps", str(steps),
           "--data.val_size", "0", "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
           "--model.rewards.preflight", "off", "--overwrite"]  # fmt: skip
    start = time.perf_counter()
    with open(out / "train.log", "w") as log:
        subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    (metrics,) = sorted(out.glob("csv/version_*/metrics.csv"))[-1:]
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("train/reward")]
    write_rows(out / "metrics.csv", [{"step": int(r["step"]) + 1, **{panel: float(r[ours]) for panel, (ours, _) in panels.items()}}
                                     for r in rows])  # fmt: skip
    return seconds


def run_trl(config: str, steps: int, out: Path) -> float:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from grpo_lightning.data import ResumableSampler, prompt_messages
    from grpo_lightning.export import save_hf_folder
    from grpo_lightning.models import check_loadable, load_causal_lm, load_tokenizer

    cli = recipe(config, steps)
    module, data, trainer = cli.model, cli.datamodule, cli.trainer
    grpo, sampling, optim, rewards = module.grpo, module.sampling, module.optim, module.rewards
    panels = curves(rewards.funcs)
    B, G = data.hparams.batch_size, grpo.num_generations
    policy = check_loadable(module.policy_config)
    folder = out / "policy-hf"
    if not (folder / "config.json").is_file():  # the exact weights our side starts from
        save_hf_folder(load_causal_lm(policy), load_tokenizer(policy), folder)
    order = list(ResumableSampler(len(data.problems), data.hparams.seed, data.hparams.shuffle))[: B * steps]
    problems = [data.problems[i] for i in order]
    dataset = Dataset.from_list([{"prompt": prompt_messages(p.question, module.prompt), "answer": p.answer,
                                  "question": p.question} for p in problems])  # fmt: skip
    bf16 = "bf16" in str(trainer.precision)
    args = GRPOConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=B * G // grpo.gradient_accumulation_steps,
        gradient_accumulation_steps=grpo.gradient_accumulation_steps, num_generations=G,
        max_completion_length=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
        top_k=sampling.top_k, learning_rate=optim.lr, adam_beta1=optim.betas[0], adam_beta2=optim.betas[1],
        weight_decay=optim.weight_decay, warmup_steps=optim.warmup_ratio, lr_scheduler_type="cosine",  # a float: a ratio
        beta=grpo.beta, epsilon=grpo.epsilon_low, epsilon_high=grpo.epsilon_high, loss_type=grpo.loss_type,
        scale_rewards="group" if grpo.advantage_scale == "group" else grpo.advantage_scale,
        use_bias_correction_kl=False, max_grad_norm=optim.max_grad_norm, reward_weights=rewards.weights,
        num_iterations=grpo.num_iterations, mask_truncated_completions=grpo.mask_truncated_completions,
        bf16=bf16, use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no", logging_steps=1,
        shuffle_dataset=False, seed=data.hparams.seed, dataloader_num_workers=0, disable_tqdm=False,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    fixed = dict(
        strict_seed_semantics=rewards.strict_seed_semantics, max_completion_len=sampling.max_tokens, **rewards.kwargs
    )  # what our side passes every reward function besides TRL's arguments
    funcs = [with_arguments(f, fixed) for f in module.reward_funcs]
    trl = GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=dataset,
                      processing_class=tokenizer)  # fmt: skip
    start = time.perf_counter()
    trl.train()
    seconds = time.perf_counter() - start
    logged = [h for h in trl.state.log_history if "reward" in h]
    write_rows(out / "metrics.csv", [{"step": h["step"], **{panel: h[key] for panel, (_, key) in panels.items()}}
                                     for h in logged])  # fmt: skip
    return seconds


def with_arguments(func: Any, fixed: dict[str, Any]) -> Any:
    """``func`` called with ``fixed`` keyword arguments too, under its own name (TRL logs each reward by name)."""

    @functools.wraps(func)
    def reward(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs, **fixed)

    return reward


def write_seconds(summary_path: Path, side: str, seconds: float) -> None:
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"seconds": {}}
    summary["seconds"][side] = seconds
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")


def write_rows(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(path.open())]


def last_fifth(rows: list[dict[str, float]], key: str) -> tuple[float, float]:
    """Mean over the last 20 % of steps and its standard error (steps treated as independent draws)."""
    tail = [r[key] for r in rows[-max(2, len(rows) // 5) :]]
    return statistics.fmean(tail), statistics.stdev(tail) / len(tail) ** 0.5


def plot(sides: dict[str, list[dict[str, float]]], png: Path, seconds: dict[str, float], panels: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sys.path.insert(0, str(REPO / "scripts"))
    from plot_run import smooth

    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for side, rows in sides.items():
            steps, values = [r["step"] for r in rows], [r[panel] for r in rows]
            ax.plot(steps, values, alpha=0.2)
            wall = f", {seconds[side] / 60:.0f} min" if side in seconds else ""
            ax.plot(steps, smooth(values), color=ax.lines[-1].get_color(), label=f"{side} (10-step mean{wall})")
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training recipe both sides follow")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps on each side (default: 100)")
    parser.add_argument("--out", default="runs/learning-vs-trl", help="output folder")
    parser.add_argument(
        "--sides",
        default="ours,trl",
        help="comma-separated: ours, trl, or '' to redraw (the other side's results are reused; two commands, one "
        "per side, may run at once on separate cores)",
    )
    parser.add_argument("--child-trl", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    if args.child_trl:
        print(json.dumps({"seconds": run_trl(args.config, args.steps, out / "trl")}))
        return
    panels = curves(recipe(args.config, 1).model.rewards.funcs)
    summary_path = out / "summary.json"
    for side in filter(None, args.sides.split(",")):
        if side == "ours":
            seconds = run_ours(args.config, args.steps, out / "ours", panels)
        else:  # a fresh process: TRL and ours never share threads, caches or imports
            (out / "trl").mkdir(parents=True, exist_ok=True)
            with open(out / "trl" / "train.log", "w") as log:
                proc = subprocess.run([sys.executable, __file__, "--config", args.config, "--steps", str(args.steps),
                                       "--out", str(out), "--child-trl"], env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                                      stderr=log, text=True, check=True)  # fmt: skip
            seconds = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
        print(f"{side}: {seconds:.0f} s", flush=True)
        write_seconds(summary_path, side, seconds)  # read back first: the sides may run as two concurrent commands
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"seconds": {}}
    summary.update(config=args.config, steps=args.steps)
    sides = {
        side: read_rows(out / side / "metrics.csv")
        for side in ("ours", "trl")
        if (out / side / "metrics.csv").is_file()
    }
    summary["last_20_percent"] = {
        side: {panel: last_fifth(rows, panel) for panel in panels} for side, rows in sides.items()
    }
    for side, values in summary["last_20_percent"].items():
        print(f"{side:5s} " + "  ".join(f"{panel} {m:.3f} ± {se:.3f}" for panel, (m, se) in values.items()))
    if {"ours", "trl"} <= sides.keys():
        (ours, _), (trl, trl_se) = (
            summary["last_20_percent"]["ours"]["total reward"],
            summary["last_20_percent"]["trl"]["total reward"],
        )
        summary["ours_at_least_trl_minus_2se"] = ours >= trl - 2 * trl_se
        print(
            f"ours {ours:.3f} vs TRL {trl:.3f} − 2·{trl_se:.3f}: {'met' if summary['ours_at_least_trl_minus_2se'] else 'missed'}"
        )
    plot(sides, out / "reward_curves.png", summary["seconds"], list(panels))
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"figure: {out / 'reward_curves.png'}\nsummary: {summary_path}")


if __name__ == "__main__":
    main()
