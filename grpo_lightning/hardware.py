"""What this machine computes fast: the training precision and the CPU thread count that fit it.

bfloat16 is fast only where the hardware has it: on GPUs with bf16 support, and on CPUs with AVX512-BF16 or AMX
(one 2-core machine here ran a bf16 matmul 6.8× faster than float32). On CPUs without them PyTorch emulates it
and it runs tens of times *slower* than float32 (70× measured on a 2-core AMD EPYC without AVX-512). So the
recipes ask for ``precision: auto`` and this module resolves it. No Lightning, no project imports.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

AUTO = "auto"
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags of CPUs that compute bfloat16 in hardware."""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux; empty elsewhere, which counts as 'no native bf16')."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


def cpu_description() -> str:
    """Model name and the bf16-relevant flags, for logs and benchmark tables."""
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="ignore").splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    flags = [f for f in NATIVE_BF16_FLAGS if f in cpu_flags()]
    return f"{name}, {os.cpu_count()} cores, " + (f"native bf16 ({', '.join(flags)})" if flags else "no native bf16")


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str
    """What Lightning gets (``bf16-mixed``, ``32-true``, … as asked or as ``auto`` resolved)."""
    reason: str
    """One sentence for the log ('' when nothing needs saying)."""
    slow: bool = False
    """bf16 was asked for on a CPU that emulates it: warn."""


def resolve_precision(requested: str | int | None, accelerator: str = AUTO) -> PrecisionChoice:
    """The Lightning precision for ``requested`` on this hardware, and why.

    ``auto`` (or None, a recipe without ``trainer.precision``) is ``bf16-mixed`` on a bf16-capable GPU or CPU and
    ``32-true`` elsewhere; anything else is kept as asked (bf16 on a CPU without native bf16 is flagged as slow).
    """
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == AUTO and torch.cuda.is_available())
    if on_gpu:
        native, where = torch.cuda.is_available() and torch.cuda.is_bf16_supported(), "this GPU"
    else:
        native, where = cpu_has_native_bf16(), f"this CPU ({cpu_description()})"
    if requested in (None, AUTO):
        if native:
            return PrecisionChoice("bf16-mixed", f"precision auto → bf16-mixed: {where} computes bfloat16 natively")
        return PrecisionChoice(
            "32-true", f"precision auto → 32-true: {where} would emulate bfloat16, many times slower"
        )
    requested = str(requested)
    if "bf16" in requested and not on_gpu and not native:
        return PrecisionChoice(requested, slow=True, reason=(
            f"trainer.precision {requested} on {where}: a bfloat16 matmul measured {bf16_slowdown():.0f}× slower than "
            "float32 here. Leave trainer.precision out (auto: float32 on this machine) unless you need bf16"))  # fmt: skip
    return PrecisionChoice(requested, "")


def bf16_slowdown(size: int = 256, repeats: int = 3) -> float:
    """How many times slower a ``size``² bfloat16 matmul runs than a float32 one on this CPU (median of repeats)."""

    def seconds(dtype: torch.dtype) -> float:
        a = torch.randn(size, size).to(dtype)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    return seconds(torch.bfloat16) / max(seconds(torch.float32), 1e-9)


def cpu_vllm_dtype(requested: str) -> str:
    """vLLM-CPU's weight dtype: ``auto`` becomes bfloat16 where the CPU computes it natively, else float32."""
    if requested != AUTO or torch.cuda.is_available():
        return requested
    return "bfloat16" if cpu_has_native_bf16() else "float32"
