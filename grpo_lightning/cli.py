"""The command lines: ``python train.py fit --config configs/<recipe>.yaml`` (a LightningCLI), and ``grpo``
(``preflight`` before training; ``evaluate``, ``infer``, ``export`` for everything after it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from grpo_lightning.datamodule import GSM8KDataModule
from grpo_lightning.hardware import resolve_precision
from grpo_lightning.module import GRPOModule


def wandb_offline_without_credentials() -> None:
    """Never block on a W&B login prompt: log offline when no API key or netrc entry is configured."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    os.environ["WANDB_MODE"] = "offline"


class GRPOCLI(LightningCLI):
    """LightningCLI that tells the module its command line (for the model card), adds ``fit --overwrite``, shows a
    step-based progress bar and exits 130 after Ctrl-C."""

    def __init__(self, *args, command: list[str], **kwargs) -> None:
        self.command = shlex.join(["python", "train.py", *command])
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--overwrite", action="store_true",
                            help="fit: delete the checkpoints of an earlier run in the checkpoint folder and start "
                                 "fresh (default: refuse; resume it with --ckpt_path last)")  # fmt: skip

    def instantiate_trainer(self, **kwargs):
        from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

        from grpo_lightning.callbacks import StepCheckpoint, StepProgressBar

        trainer_config = self._get(self.config_init, "trainer", default={})
        configured = list(trainer_config.get("callbacks") or [])  # copied before Lightning adds its default bar
        trainer = super().instantiate_trainer(**kwargs)
        bar = trainer.progress_bar_callback  # Lightning's default reads "Epoch 0/-2" when max_steps bounds training
        if type(bar) is RichProgressBar and not any(isinstance(c, ProgressBar) for c in configured):
            trainer.callbacks[trainer.callbacks.index(bar)] = StepProgressBar()
        for callback in trainer.callbacks:
            if isinstance(callback, StepCheckpoint):
                callback.overwrite = bool(self._get(self.config, "overwrite", default=False))
        return trainer

    def fit(self, **kwargs) -> None:
        try:
            self.trainer.fit(**kwargs)
        except SystemExit:
            if self.trainer.interrupted:  # Lightning exits 1 after its graceful Ctrl-C shutdown; shells expect 130
                raise SystemExit(130) from None
            raise

    def before_instantiate_classes(self) -> None:
        GRPOModule.launch_command = self.command
        trainer = (self.config[self.subcommand] if self.subcommand else self.config).trainer
        choice = resolve_precision(trainer.precision, str(trainer.accelerator))
        trainer.precision = choice.precision
        if choice.slow:
            rank_zero_warn(choice.reason)
        elif choice.reason:
            rank_zero_info(choice.reason)


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Start the CLI (``fit``, ``validate``, ``test``); every config field is documented in ``--help``."""
    from jsonargparse import set_parsing_settings

    wandb_offline_without_credentials()
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    command = sys.argv[1:] if args is None else args
    return GRPOCLI(
        GRPOModule, GSM8KDataModule, args=args, run=run, save_config_kwargs={"overwrite": True}, command=command
    )


DEBUG_FLAG = "GRPO_DEBUG"
"""Environment variable: set to 1 to see the full traceback of an error the commands otherwise show as one line."""


def train(args: list[str] | None = None, prog: str = "train.py") -> int:
    """``python train.py …``: :func:`main`, with errors that say what to change shown as one line (exit 2).

    The full traceback comes with ``GRPO_DEBUG=1``; other errors always show it.
    """
    try:
        main(args)
    except _user_errors() as err:
        if os.environ.get(DEBUG_FLAG, "") not in ("", "0"):
            raise
        print(f"{prog}: error: {err}  ({DEBUG_FLAG}=1 shows the traceback)", file=sys.stderr)
        return 2
    return 0


# ------------------------------------------------------------------------------------------------- grpo
# `grpo evaluate | infer | export` (and `grpo train …`, the same as `python train.py …`).


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message says what to change (data, paths, settings, the Hub): one line, not a traceback."""
    from grpo_lightning.export import HubError
    from grpo_lightning.models import ModelLoadError
    from grpo_lightning.preflight import PreflightError

    return ValueError, OSError, ModelLoadError, HubError, PreflightError


def grpo(argv: list[str] | None = None) -> int:
    """The ``grpo`` command: evaluate, ask, export and publish models trained (or not) with grpo-lightning."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        return train(argv[1:], prog="grpo train")
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    if overrides and args.command != "preflight":
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    args.overrides, args.argv = overrides, argv
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except _user_errors() as err:
        if os.environ.get(DEBUG_FLAG, "") not in ("", "0"):
            raise
        print(f"grpo {args.command}: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpo", description="grpo-lightning: evaluate, ask and publish GRPO models. "
                                     "Training: `grpo train fit --config configs/<recipe>.yaml` (= python train.py …).")  # fmt: skip
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="{train,preflight,warmup,evaluate,infer,export}"
    )

    commands.add_parser(
        "train", help="train with GRPO: `grpo train fit --config …` is `python train.py fit --config …`"
    )
    pre = commands.add_parser(
        "preflight",
        help="before training: do a recipe's rollouts carry reward differences to learn from?",
        epilog="Other options are recipe fields, as for train.py: --model.sampling.temperature=1.0",
    )
    pre.add_argument(
        "--config",
        required=True,
        action="append",
        help="training recipe (YAML), as for train.py; repeat to layer files",
    )
    pre.add_argument(
        "--prompts", type=int, default=8, help="training prompts to sample, G completions each (default: 8)"
    )
    pre.add_argument(
        "--min-signal", type=float, default=0.25, help="least share of groups with reward differences (default: 0.25)"
    )
    pre.add_argument(
        "--engine", choices=("recipe", "hf", "vllm"), default="recipe", help="rollout engine (default: the recipe's)"
    )
    pre.set_defaults(run=_preflight)

    warm = commands.add_parser(
        "warmup",
        help="before GRPO: teach a recipe's model the answer format on a few worked solutions (supervised)",
        epilog="Then train from it: train.py fit --config <recipe> --model.policy.name_or_path <out> "
        "--model.policy.gguf_file null",
    )
    warm.add_argument("--config", required=True, action="append", help="training recipe (YAML): its model and prompt")
    warm.add_argument("--out", required=True, help="HF folder to write the warmed-up model to")
    warm.add_argument("--data", default="openai/gsm8k", help="Hub dataset or .jsonl/.parquet file with worked "
                      "solutions ending in '#### n' (default: openai/gsm8k)")  # fmt: skip
    warm.add_argument("--split", default="train", help="split of a Hub dataset (default: train)")
    warm.add_argument("--examples", type=_count, default=512, help="the N shortest solutions are used (default: 512)")
    warm.add_argument("--steps", type=_count, default=64, help="optimizer steps (default: 64, one pass over 512)")
    warm.add_argument("--batch-size", type=_count, default=8, help="examples per step (default: 8)")
    warm.add_argument("--lr", type=float, default=5e-5, help="peak learning rate, warmup + cosine (default: 5e-5)")
    warm.add_argument("--overwrite", action="store_true", help="replace --out even if it holds files we did not write")
    warm.set_defaults(run=_warmup)

    ev = commands.add_parser("evaluate", help="GSM8K accuracy and format rates of a model (greedy decoding)")
    _model_arguments(ev)
    ev.add_argument(
        "--data",
        default="openai/gsm8k",
        help="Hub dataset, .jsonl/.parquet file or 'synthetic' (default: openai/gsm8k)",
    )
    ev.add_argument("--split", default="test", help="split of a Hub dataset (default: test)")
    ev.add_argument(
        "--synthetic-seed", type=int, default=1, help="seed of --data synthetic (default: 1; training's default is 0)"
    )
    ev.add_argument(
        "--synthetic-operations", type=int, default=1, choices=(1, 2), help="synthetic problems: 1 operation, or 1-2"
    )
    ev.add_argument(
        "--held-out-from",
        metavar="CONFIG",
        help="drop problems whose question is among this recipe's training problems",
    )
    ev.add_argument("--limit", type=_count, help="evaluate the first N problems only (default: all 1,319 of GSM8K)")
    ev.add_argument("--out", help="folder for problems.jsonl and summary.json (default: runs/eval/<model>)")
    ev.add_argument("--batch-size", type=_count, default=64, help="prompts per generate call (default: 64)")
    ev.add_argument("--max-tokens", type=_count, default=200, help="longest completion (default: 200, as in training)")
    ev.set_defaults(run=_evaluate)

    inf = commands.add_parser("infer", help="answer questions in the terminal and append them to a JSONL file")
    _model_arguments(inf)
    inf.add_argument("question", nargs="*", help="question(s) to answer; none and no --input: interactive")
    inf.add_argument("--input", help="text file with one question per line")
    inf.add_argument(
        "--output", default="inference.jsonl", help="JSONL file the answers are appended to (default: inference.jsonl)"
    )
    inf.add_argument("--num-samples", type=_count, default=1, help="answers per question (> 1 needs --temperature > 0)")
    inf.add_argument(
        "--temperature", type=float, default=0.0, help="0: greedy (default); the training recipe samples at 0.9"
    )
    inf.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: 1.0, off)")
    inf.add_argument("--max-tokens", type=_count, default=200, help="longest completion (default: 200)")
    inf.set_defaults(run=_infer)

    ex = commands.add_parser("export", help="Lightning checkpoint → HF folder (+ zip, + Hub push with a model card)")
    ex.add_argument("source", help="a .ckpt of grpo-lightning, or an exported HF folder to publish")
    ex.add_argument("--out", help="folder to write (needed for a .ckpt)")
    ex.add_argument("--base", help="base model folder/name for the tokenizer, when the run's has moved")
    ex.add_argument("--eval-summary", help="summary.json of `grpo evaluate`, shown in the model card")
    ex.add_argument(
        "--adapter-only",
        action="store_true",
        help="LoRA runs: write the adapter alone (default: merged into the model)",
    )
    ex.add_argument("--overwrite", action="store_true", help="replace --out even if it holds files we did not write")
    ex.add_argument("--zip", action="store_true", help="also write <out>.zip")
    ex.add_argument(
        "--push-to-hub", metavar="USER/REPO", help="upload to this Hub repository (token: HF_TOKEN or `hf auth login`)"
    )
    ex.add_argument("--private", action="store_true", help="create the Hub repository as private")
    ex.set_defaults(run=_export)
    return parser


def _count(text: str) -> int:
    """argparse type of counts (problems, prompts per call, tokens): a whole number ≥ 1, or a clear error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hub name, HF folder, or a grpo-lightning .ckpt")
    parser.add_argument("--gguf-file", help="GGUF file inside --model's folder, loaded dequantised")
    parser.add_argument(
        "--base", help="for a .ckpt: base model folder/name for the tokenizer, when the run's has moved"
    )
    parser.add_argument("--engine", choices=("auto", "hf", "vllm"), default="auto",
                        help="auto (default): vLLM on a GPU when installed, else transformers (on a CPU "
                             "transformers is faster to start and far lighter for jobs of this size)")  # fmt: skip
    parser.add_argument("--verbose", action="store_true", help="show the engine's own log lines (vLLM's are hidden)")
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=0.85, help="vLLM's share of GPU memory (default: 0.85)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint to run")
    parser.add_argument("--system-prompt", help="system turn (default: the notebook's, as in training)")
    parser.add_argument(
        "--user-template", default="{question}", help="user turn, {question} replaced (default: the question)"
    )
    parser.add_argument(
        "--prompt-from", metavar="CONFIG", help="take system prompt and user template from a training recipe"
    )


def _style(args: argparse.Namespace):
    from grpo_lightning.config import PromptConfig
    from grpo_lightning.rewards import SYSTEM_PROMPT

    style = PromptConfig(args.system_prompt if args.system_prompt is not None else SYSTEM_PROMPT, args.user_template)
    if args.prompt_from:
        import yaml

        recipe = yaml.safe_load(Path(args.prompt_from).read_text(encoding="utf-8")) or {}
        model = recipe.get("model") or {}
        moved = sorted({"system_prompt", "user_template"} & set(model.get("grpo") or {}))
        if moved:
            raise ValueError(
                f"{args.prompt_from}: model.grpo.{moved[0]} is an old key; the prompt now lives under model.prompt "
                f"(model.prompt.{moved[0]})"
            )
        prompt = model.get("prompt") or {}
        style = PromptConfig(
            prompt.get("system_prompt", style.system_prompt), prompt.get("user_template", style.user_template)
        )
    return style


def _open(args: argparse.Namespace):
    import torch

    from grpo_lightning.models import load_model
    from grpo_lightning.rollout import VLLMConfig, open_engine

    torch.manual_seed(args.seed)
    loaded = load_model(args.model, gguf_file=args.gguf_file, base=args.base, trust_remote_code=args.trust_remote_code)
    vllm = VLLMConfig(gpu_memory_utilization=args.gpu_memory_utilization)
    return loaded, open_engine(loaded, args.engine, vllm=vllm, seed=args.seed, quiet=not args.verbose)


def _recipe(*configs: str, overrides: list[str] = ()) -> LightningCLI:
    """A training recipe's module and data (set up, no model loaded), as `train.py fit --config …` would build them."""
    cli = main([arg for path in configs for arg in ("--config", path)] + list(overrides), run=False)
    cli.datamodule.setup("fit")
    return cli


def _preflight(args: argparse.Namespace) -> int:
    from grpo_lightning.models import check_loadable, load_model
    from grpo_lightning.preflight import preflight, sample_problems
    from grpo_lightning.rollout import open_engine

    cli = _recipe(*args.config, overrides=args.overrides)
    module, data = cli.model, cli.datamodule
    policy = module.policy_config
    check_loadable(policy)  # resolves pkg: names and builds the tiny demo model when asked
    loaded = load_model(policy.name_or_path, gguf_file=policy.gguf_file, trust_remote_code=policy.trust_remote_code)
    engine = open_engine(
        loaded, module.rollout.kind if args.engine == "recipe" else args.engine, vllm=module.rollout.vllm
    )
    report = preflight(
        engine, loaded.tokenizer, sample_problems(data.problems, args.prompts, data.hparams.seed), module.score,
        num_generations=module.grpo.num_generations, sampling=module.sampling, style=module.prompt,
        max_prompt_length=module.prompt.max_prompt_length,
    )  # fmt: skip
    print(report.table())
    advice = report.advice(args.min_signal)
    if advice:
        print(
            f"only {report.signal_share:.0%} of groups carry signal (want ≥ {args.min_signal:.0%}); try:",
            file=sys.stderr,
        )
        print("\n".join(f"  - {tip}" for tip in advice), file=sys.stderr)
        return 1
    return 0


def _warmup(args: argparse.Namespace) -> int:
    from grpo_lightning.data import load_rows
    from grpo_lightning.models import check_loadable, load_tokenizer
    from grpo_lightning.warmup import warm_up, warmup_examples

    module = _recipe(*args.config).model
    policy = check_loadable(module.policy_config)
    examples = warmup_examples(load_rows(args.data, args.split), load_tokenizer(policy), count=args.examples,
                               max_tokens=module.sampling.max_tokens, style=module.prompt, source=args.data)  # fmt: skip
    optim = dataclasses.replace(module.optim, lr=args.lr, max_grad_norm=1.0)
    record = {"command": shlex.join(["grpo", *args.argv]), "model": policy.name_or_path, "gguf_file": policy.gguf_file,
              "data": args.data, "split": args.split, "examples": args.examples, "steps": args.steps,
              "batch_size": args.batch_size, "lr": args.lr}  # fmt: skip
    start = time.perf_counter()
    folder = warm_up(policy, examples, args.out, steps=args.steps, batch_size=args.batch_size, optim=optim,
                     precision=resolve_precision("auto").precision, record=record, overwrite=args.overwrite)  # fmt: skip
    print(f"warmed-up model: {folder} ({time.perf_counter() - start:.0f} s)")
    print(f"train from it: --model.policy.name_or_path {folder} --model.policy.gguf_file null")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from grpo_lightning.data import SYNTHETIC, load_rows, synthetic_rows, to_problems
    from grpo_lightning.evaluation import evaluate, write_results

    if args.data == SYNTHETIC:  # generous: --held-out-from may drop some
        rows = synthetic_rows(2 * (args.limit or 200), seed=args.synthetic_seed, operations=args.synthetic_operations)
    else:
        rows = load_rows(args.data, args.split)
    problems = to_problems(rows, source=args.data)
    if args.held_out_from:
        seen = {p.question for p in _recipe(args.held_out_from).datamodule.problems}
        problems = [p for p in problems if p.question not in seen]
        print(f"{len(rows) - len(problems)} problems dropped: they are among {args.held_out_from}'s training problems")
    problems = problems[: args.limit or (200 if args.data == SYNTHETIC else None)]
    style = _style(args)  # before minutes of loading
    loaded, engine = _open(args)
    start = time.perf_counter()
    records = evaluate(engine, loaded.tokenizer, problems, max_tokens=args.max_tokens, batch_size=args.batch_size,
                       style=style)  # fmt: skip
    out = Path(args.out or Path("runs/eval") / Path(args.model.rstrip("/")).name)
    summary = write_results(
        out, records, model=args.model, gguf_file=args.gguf_file, data=args.data, split=args.split,
        **({"synthetic_seed": args.synthetic_seed, "synthetic_operations": args.synthetic_operations}
           if args.data == SYNTHETIC else {}), held_out_from=args.held_out_from,
        engine=type(engine).__name__, max_tokens=args.max_tokens, prompt={"system_prompt": style.system_prompt, "user_template": style.user_template}, seconds=round(time.perf_counter() - start, 1),
    )  # fmt: skip
    width = max(map(len, summary["metrics"]))
    print(f"{args.model} on {args.data} ({len(records)} problems):")
    print("\n".join(f"  {k:<{width}}  {v:.4f}" for k, v in summary["metrics"].items()))
    print(f"per-problem records: {out / 'problems.jsonl'}\nsummary: {out / 'summary.json'}")
    return 0


def _infer(args: argparse.Namespace) -> int:
    from grpo_lightning.export import append_jsonl
    from grpo_lightning.inference import answer_questions, check_samples, read_questions, render
    from grpo_lightning.rollout import SamplingConfig

    questions = list(args.question) + (read_questions(args.input) if args.input else [])
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    check_samples(args.num_samples, sampling)  # before the model loads
    style = _style(args)
    loaded, engine = _open(args)

    def ask(batch: list[str]) -> None:
        for row in answer_questions(engine, loaded.tokenizer, batch, model_name=args.model, sampling=sampling,
                                    num_samples=args.num_samples, style=style):  # fmt: skip
            print(render(row))
            append_jsonl(args.output, row)

    if questions:
        ask(questions)
    else:
        print("Ask a question (an empty line or Ctrl-D ends).")
        while (question := _read_line("question> ")) is not None:
            ask([question])
    print(f"answers appended to {args.output}")
    return 0


def _read_line(prompt: str) -> str | None:
    try:
        line = input(prompt).strip()
    except EOFError:
        return None
    return line or None


def _export(args: argparse.Namespace) -> int:
    from grpo_lightning.export import (
        EVAL_SUMMARY,
        check_replaceable,
        export_policy,
        push_to_hub,
        write_json,
        write_model_card,
        zip_folder,
    )
    from grpo_lightning.models import load_checkpoint_policy

    evaluation = json.loads(Path(args.eval_summary).read_text(encoding="utf-8")) if args.eval_summary else None
    if args.source.endswith(".ckpt"):
        if not args.out:
            raise ValueError("exporting a .ckpt needs --out FOLDER")
        check_replaceable(Path(args.out), args.overwrite)  # before minutes of loading
        loaded = load_checkpoint_policy(args.source, base=args.base, merge_lora=not args.adapter_only)
        folder = export_policy(loaded.model, loaded.tokenizer, args.out, record=loaded.record, evaluation=evaluation,
                               repo_id=args.push_to_hub, adapter_only=args.adapter_only, overwrite=args.overwrite)  # fmt: skip
    else:
        folder = Path(args.source)
        if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
            raise ValueError(f"{args.source!r} is neither a .ckpt nor an exported model folder (no config.json)")
        if evaluation:
            write_json(folder / EVAL_SUMMARY, evaluation)
        write_model_card(folder, args.push_to_hub)
    print(f"HF folder: {folder}")
    if args.zip:
        print(f"zip: {zip_folder(folder)}")
    if args.push_to_hub:
        print(f"pushed: {push_to_hub(folder, args.push_to_hub, private=args.private)}")
    return 0
