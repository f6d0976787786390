"""GPU throughput of the pieces of a GRPO step on a Qwen2.5-0.5B-shaped model with random weights (no download).

    python benchmarks/gpu.py                  # on a GPU: training tokens/s + MFU, HF and vLLM rollout tokens/s, sync
    python benchmarks/gpu.py --tiny           # the same code on the tiny model, CPU (a smoke run, numbers meaningless)

Measured, each as the median of `--repeats` after a warm-up:
- training: forward + backward of the policy through the trainer's own log-prob path (`grpo_lightning.logprobs.sequence_logprobs`:
  bf16 autocast, fused head, the prompt's forward shared by its completions) on one micro-batch of `--micro`
  completions of one P-token prompt, plus the AdamW step; tokens/s counts the tokens the model runs (P + micro · T),
  MFU = 6 · parameters · those tokens / s / peak FLOP/s;
- rollout: B prompts × G samples × T tokens (min tokens = max tokens) with transformers `generate` and, where vLLM
  is installed, the vLLM engine; tokens/s;
- weight sync: the seconds to push all weights into vLLM (the step's `rollout/sync_seconds`).
Then the arithmetic for one GSM8K epoch (7,473 prompts × G completions) at those rates.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grpo_lightning.batch import pack_sequences
from grpo_lightning.logprobs import sequence_logprobs
from grpo_lightning.rollout import HFEngine, SamplingConfig, VLLMConfig, VLLMEngine
from grpo_lightning.tiny import build_tokenizer

QWEN_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151_936, max_position_embeddings=32_768, tie_word_embeddings=True,
                rope_theta=1_000_000.0)  # fmt: skip
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=320, max_position_embeddings=1024, tie_word_embeddings=True)  # fmt: skip
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, SXM data sheets
GSM8K_TRAIN = 7_473


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    seconds = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_tflops(device: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None)


def build_folder(config: dict, out: Path, tokenizer) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(**config, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    )
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny model on CPU (smoke run)")
    parser.add_argument("--prompts", type=int, default=4, help="B prompts per step (notebook: 4)")
    parser.add_argument("--generations", type=int, default=16, help="G completions per prompt (notebook: 16)")
    parser.add_argument("--tokens", type=int, default=200, help="T completion tokens (notebook: ≤ 200)")
    parser.add_argument("--prompt-tokens", type=int, default=100, help="P prompt tokens (GSM8K + system prompt ≈ 100)")
    parser.add_argument("--micro", type=int, default=16, help="completions per micro-batch, ≤ G (64 / accumulation 4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="vLLM's share (notebook: 0.3)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: from its name)")
    args = parser.parse_args()
    if args.tiny:
        args.prompts, args.generations, args.tokens, args.prompt_tokens, args.micro, args.repeats = 1, 4, 8, 16, 4, 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    config = TINY if args.tiny else QWEN_05B
    tokenizer = build_tokenizer()
    B, G, T, P = args.prompts, args.generations, args.tokens, args.prompt_tokens
    if not 1 <= args.micro <= G or G % args.micro:
        parser.error(f"--micro {args.micro}: a micro-batch holds completions of one prompt, so it must divide G = {G}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(config, Path(tmp) / "model", tokenizer)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).train()
        params = sum(p.numel() for p in model.parameters())
        print(f"device: {name}; model: {params / 1e6:.1f} M parameters; B={B} G={G} T={T} P={P} micro={args.micro}")

        # training: one micro-batch forward + backward, and the optimizer step
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.99), weight_decay=0.1)
        vocab = min(config["vocab_size"], len(tokenizer))
        prompts = torch.randint(0, vocab, (B, P)).tolist()
        group = torch.randint(0, vocab, (args.micro, T)).tolist()  # a micro-batch: completions of one prompt
        seqs = pack_sequences([prompts[0]] * args.micro, group, tokenizer.pad_token_id).to(device)

        def train_micro() -> None:
            with torch.autocast(device, dtype=torch.bfloat16):
                logp = sequence_logprobs(model, seqs)  # defaults: fused log-probs, shared prompt forward
            logp.mean().backward()

        def optimizer_step() -> None:  # zeroed, not freed: every timed repeat updates every parameter
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)

        train_s = timed(train_micro, args.repeats)
        model.zero_grad(set_to_none=True)
        train_micro()
        step_s = timed(optimizer_step, args.repeats)
        tokens = P + args.micro * T
        rows["train tokens/s (fwd+bwd)"] = tokens / train_s
        peak = peak_tflops(name, args.peak_tflops)
        if peak:
            rows["train MFU (%)"] = 100 * 6 * params * tokens / train_s / (peak * 1e12)
        rows["optimizer step (s)"] = step_s

        # rollouts
        sampling = SamplingConfig(temperature=0.9, max_tokens=T, min_tokens=T)
        model.eval()
        hf = HFEngine(model, tokenizer)
        with torch.autocast(device, dtype=torch.bfloat16):
            rows["HF rollout tokens/s"] = (
                B * G * T / timed(lambda: hf.generate(prompts, n=G, sampling=sampling), args.repeats)
            )
        if importlib.util.find_spec("vllm"):
            vllm = VLLMEngine(str(folder), tokenizer, VLLMConfig(gpu_memory_utilization=args.gpu_memory_utilization,
                                                                 dtype="bfloat16", max_model_len=P + T + 8))  # fmt: skip
            rows["vLLM rollout tokens/s"] = (
                B * G * T / timed(lambda: vllm.generate(prompts, n=G, sampling=sampling), args.repeats)
            )
            rows["weight sync (s)"] = timed(lambda: vllm.update_weights(model.named_parameters()), args.repeats)

    for key, value in rows.items():
        print(f"{key:28s} {value:12.3f}")
    epoch_estimate(rows, B, G, T, P, args.micro)


def epoch_estimate(rows: dict, B: int, G: int, T: int, P: int, micro: int) -> None:
    """Seconds per step = generation + policy fwd/bwd + reference forward (≈ 1/3 of fwd/bwd) + optimizer + sync."""
    steps = GSM8K_TRAIN // B
    gen_rate = rows.get("vLLM rollout tokens/s", rows["HF rollout tokens/s"])
    gen = B * G * T / gen_rate
    micro_batches = B * G // micro  # each holds one prompt (micro ≤ G), run once, and micro completions
    train = micro_batches * (P + micro * T) / rows["train tokens/s (fwd+bwd)"] * (1 + 1 / 3)
    step = gen + train + rows["optimizer step (s)"] + rows.get("weight sync (s)", 0.0)
    print(f"epoch estimate: {steps} steps × ({gen:.3f} s generation + {train:.3f} s policy+reference + "
          f"{rows['optimizer step (s)']:.3f} s optimizer + {rows.get('weight sync (s)', 0.0):.3f} s sync) "
          f"= {steps * step / 60:.1f} min")  # fmt: skip


if __name__ == "__main__":
    main()
