"""Data-parallel plumbing, without Lightning: which mesh shards the parameters, FSDP2 sharding, gathering a
sharded tensor, the gradient-sync switch of gradient accumulation, and per-process random state.

Every process runs its own rollouts on its share of the prompts; gradients are averaged across processes once per
optimizer step (the last micro-batch), and with FSDP2 each process keeps 1/W of every weight.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import torch


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP2 DTensor) weight gathered from all processes; a plain tensor unchanged."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def shard(model: Any, mesh: Any) -> Any:
    """FSDP2: each transformer block, then the rest of ``model``, sharded over the processes of ``mesh``.

    Every process keeps 1/W of each weight; a block's full weights exist only while it runs (forward, backward,
    or a sync that asks for ``full_tensor()``).
    """
    from torch.distributed.fsdp import fully_shard

    root = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA: the model peft generates with
    blocks = set(getattr(root, "_no_split_modules", None) or ())
    for module in root.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(root, mesh=mesh)
    return model


def sharding_mesh(strategy: Any, world_size: int) -> Any:
    """The data-parallel device mesh when ``strategy`` shards parameters (Lightning's ModelParallelStrategy: FSDP2);
    None for strategies that keep whole weights. Strategies that wrap the whole module are refused."""
    if type(strategy).__name__ in ("FSDPStrategy", "DeepSpeedStrategy"):
        raise ValueError(
            f"trainer.strategy {type(strategy).__name__} wraps the whole module, but a GRPO step calls the policy "
            "directly (generation, reference, one backward per micro-batch). Shard with FSDP2 instead: "
            "strategy ModelParallelStrategy with data_parallel_size = the number of processes, "
            "tensor_parallel_size 1 (see the README, 'Scaling out')"
        )
    mesh = getattr(strategy, "device_mesh", None)
    if mesh is None:
        return None
    if mesh["tensor_parallel"].size() != 1:
        raise ValueError(
            f"ModelParallelStrategy: GRPO shards parameters over data-parallel processes only; set "
            f"tensor_parallel_size=1 and data_parallel_size={world_size} "
            f"(got {mesh['tensor_parallel'].size()} / {mesh['data_parallel'].size()})"
        )
    return mesh["data_parallel"]


def gradient_sync(model: Any, strategy: Any, sharded: bool, enabled: bool) -> Any:
    """A context for one micro-batch's backward: gradients are averaged across processes only when ``enabled`` (the
    last micro-batch); the others accumulate locally. ``strategy`` None (no Trainer): a plain backward."""
    if sharded:  # FSDP2: Lightning's block_backward_sync is DDP's; FSDP2 modules have their own switch
        fsdp_root = next(m for m in model.modules() if hasattr(m, "set_requires_gradient_sync"))
        fsdp_root.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    block = getattr(strategy, "block_backward_sync", None)
    return contextlib.nullcontext() if enabled or block is None else block()


def gathered_values(values: torch.Tensor) -> torch.Tensor:  # [M] → [ΣM over processes]
    """A 1-D tensor of any length from every process, concatenated in rank order (unchanged without torch.distributed)."""
    return torch.cat([part.to(values.device) for part in all_processes(values.detach().cpu())])


def all_processes(value: Any) -> list[Any]:
    """``value`` from every process, in rank order (``[value]`` without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    values: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def rng_state() -> dict[str, Any]:
    """The random generators rollouts draw from (torch CPU and CUDA, Python's ``random``)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
