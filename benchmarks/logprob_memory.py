"""Peak memory and time of the token log-prob path: naive vs chunked vs fused (hidden states + head in chunks).

    python benchmarks/logprob_memory.py                      # N=64, T=200, V=151,936, H=896: Qwen2.5-0.5B's head
    python benchmarks/logprob_memory.py --backward --n 16    # forward + backward on one micro-batch (64 / accumulation 4)

Each case runs in a fresh child process on random CPU tensors. Its peak extra memory is the rise of the process's
peak RSS (VmHWM, reset through /proc/self/clear_refs after the inputs exist and one warm-up run) above its RSS
before the measured runs. Cases:

- naive:   logits = hidden @ W.T, log_softmax over the whole [N, T, V], gather;
- chunked: the full logits, log-softmax in chunks of 1024 rows (`token_logprobs`, what a plain model forward allows);
- fused:   `head_token_logprobs`, the logits never exist beyond one chunk (the training default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grpo_lightning.algorithm import head_token_logprobs, token_logprobs


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_case(args: argparse.Namespace) -> dict:
    """One case in this process: returns median seconds and peak extra MiB."""
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    hidden = torch.randn(args.n, args.t, args.h, dtype=dtype, requires_grad=args.backward)
    weight = (torch.randn(args.v, args.h, dtype=dtype) * args.h**-0.5).requires_grad_(args.backward)
    tokens = torch.randint(0, args.v, (args.n, args.t))

    def once() -> None:
        if args.case == "naive":
            logits = hidden @ weight.T  # [N, T, V]
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
        elif args.case == "chunked":
            logp = token_logprobs(hidden @ weight.T, tokens, chunk_size=args.chunk)
        else:
            logp = head_token_logprobs(hidden, weight, tokens, chunk_size=args.chunk)
        if args.backward:
            logp.sum().backward()
            hidden.grad = weight.grad = None

    with torch.set_grad_enabled(args.backward):
        once()  # warm-up: first-touch page faults and allocator set-up are not part of the path
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = rss_kib("VmRSS")
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            once()
            seconds.append(time.perf_counter() - start)
    return {"seconds": statistics.median(seconds), "peak_extra_mib": (rss_kib("VmHWM") - base) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="sequences N (default 64: 4 prompts × 16)")
    parser.add_argument("--t", type=int, default=200, help="completion tokens T (default 200)")
    parser.add_argument("--v", type=int, default=151_936, help="vocabulary V (default: Qwen2.5's 151,936)")
    parser.add_argument("--h", type=int, default=896, help="hidden size H (default: Qwen2.5-0.5B's 896)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="hidden/head dtype")
    parser.add_argument("--chunks", default="256,1024,4096", help="chunk sizes (rows of N·T) to try")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median reported)")
    parser.add_argument("--backward", action="store_true", help="time forward + backward instead of forward only")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=1024, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args)))
        return

    torch_threads = torch.get_num_threads()
    print(f"N={args.n} T={args.t} V={args.v} H={args.h} dtype={args.dtype} backward={args.backward} "
          f"threads={torch_threads} repeats={args.repeats}")  # fmt: skip
    chunks = [int(c) for c in args.chunks.split(",")]
    cases = [("naive", 0), ("chunked", 1024), *(("fused", c) for c in chunks)]
    results = {}
    for case, chunk in cases:
        cmd = [sys.executable, __file__, "--case", case, "--chunk", str(chunk or 1), *child_args(args)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[(case, chunk)] = json.loads(out)
        r = results[(case, chunk)]
        label = case if case == "naive" else f"{case}[{chunk}]"
        print(f"{label:16s} {r['seconds']:8.3f} s  peak extra {r['peak_extra_mib']:9.1f} MiB", flush=True)
    naive = results[("naive", 0)]
    for (case, chunk), r in results.items():
        if case == "fused":
            print(f"fused[{chunk}]: memory_ratio={r['peak_extra_mib'] / naive['peak_extra_mib']:.3f} "
                  f"time_ratio={r['seconds'] / naive['seconds']:.2f}")  # fmt: skip


def child_args(args: argparse.Namespace) -> list[str]:
    out = [
        f"--n={args.n}",
        f"--t={args.t}",
        f"--v={args.v}",
        f"--h={args.h}",
        f"--dtype={args.dtype}",
        f"--repeats={args.repeats}",
    ]
    return out + (["--backward"] if args.backward else [])


if __name__ == "__main__":
    main()
