"""Each distinct prompt's forward computed once and shared by its G completions (exact, not an approximation).

A GRPO micro-batch holds several completions of the same prompt. Run as n independent sequences, the prompt's
P tokens go through the model n times, forward and backward; here they go through once per distinct prompt,
and the completions attend to that one copy of its keys and values:

    prompt pass      u distinct prompts [u, P]              → keys/values of every layer, last hidden state
    completion pass  n completions [n, T] + their prompt's keys/values → outputs at the completion tokens

Gradients flow back into the prompt pass through the shared keys/values, so the loss and every gradient equal
the unshared computation's (checked in tests/test_shared_prompt.py). Transformers' cache objects append on every
call, which gradient checkpointing's recomputation would repeat; the cache layers here are idempotent instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from grpo_lightning.batch import SequenceBatch

RunModel = Callable[..., torch.Tensor]
"""``run(input_ids, attention_mask, position_ids, past_key_values, keep) -> [rows, keep, X]``: the model's outputs
(hidden states or logits) at the last ``keep`` positions."""


def has_plain_attention(model: Any) -> bool:
    """True for decoders whose every layer is plain causal attention over a key/value cache (Qwen2, Llama, …): a
    prompt's keys/values can then be computed once and shared by every sequence that continues it."""
    config = getattr(model, "config", None)
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return hasattr(config, "num_hidden_layers") and set(layer_types) == {"full_attention"}


class _PromptLayer(DynamicLayer):
    """One layer's prompt keys/values. Collecting: ``update`` stores the given states (replacing, never appending).
    Serving: ``update`` returns prompt + new states and stores nothing. Both are safe to call again on recompute."""

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        super().__init__()
        if keys is not None:
            self.keys, self.values, self.is_initialized = keys, values, True
        self.serving = keys is not None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if self.serving:
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)
        self.keys, self.values, self.is_initialized = key_states, value_states, True
        return key_states, value_states


@contextlib.contextmanager
def _checkpointing_keeps_cache(model: Any) -> Iterator[None]:
    """Transformers drops the cache in checkpointed layers (its caches are not idempotent); ours are, keep them."""
    layers = [m for m in model.modules() if hasattr(m, "_can_checkpoint_with_cache")]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # back to the class attribute


def shared_prompt_outputs(model: Any, run: RunModel, seqs: SequenceBatch) -> torch.Tensor:  # [n, T, X]
    """The outputs that predict each completion token, with every distinct prompt computed once.

    ``seqs.prompt_group[i]`` is row i's distinct prompt and ``seqs.group_rows`` each distinct prompt's first row
    (prompts are left-padded to one width P, so equal prompts have equal rows).
    """
    T = seqs.completion_width
    P = seqs.input_ids.shape[1] - T
    ids, mask, positions = seqs.input_ids, seqs.attention_mask, seqs.position_ids
    first, group = seqs.group_rows, seqs.prompt_group
    collected = Cache(layers=[_PromptLayer() for _ in range(model.config.num_hidden_layers)])
    with _checkpointing_keeps_cache(model):
        last = run(ids[first, :P], mask[first, :P], positions[first, :P], collected, keep=1)  # [u, 1, X]
        served = Cache(layers=[_PromptLayer(layer.keys[group], layer.values[group]) for layer in collected.layers])
        outputs = run(ids[:, P:], mask, positions[:, P:], served, keep=T)  # [n, T, X]
    return torch.cat([last[group], outputs[:, :-1]], dim=1)  # position P-1 predicts token 0, P+t-1 token t
