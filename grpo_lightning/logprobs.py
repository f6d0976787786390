"""Log-probabilities of completion tokens, from a step's prompt and completion ids to ``[N, T]`` (no Lightning).

Two questions a GRPO step asks: the policy's log-probs of one micro-batch, with gradient (the policy term), and a
model's log-probs of all N rows without gradient (the reference model; the old policy when μ > 1). Both pack rows
into one padded batch (:func:`grpo_lightning.batch.pack_sequences`), run each distinct prompt once when its
completions can share its keys/values (:mod:`grpo_lightning.shared_prompt`), and, when the output head is a plain
matrix, never hold ``[n, T, V]`` logits (:func:`grpo_lightning.algorithm.head_token_logprobs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from grpo_lightning.algorithm import head_token_logprobs, token_logprobs
from grpo_lightning.batch import SequenceBatch, pack_sequences
from grpo_lightning.config import PerformanceConfig
from grpo_lightning.shared_prompt import has_plain_attention, shared_prompt_outputs

_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def plain_output_head(model: Any) -> torch.Tensor | None:
    """The ``[V, H]`` weight when logits are exactly ``decoder(x) @ weight.T`` (Qwen, Llama, …); else None.

    Models that add a bias, scale or soft-cap their logits need the model's own head (fused log-probs off).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if type(head) is not torch.nn.Linear or head.bias is not None or decoder is None or decoder is model:
        return None
    if any(getattr(model.config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    return head.weight


def micro_batches(n: int, k: int) -> list[slice]:
    """The ``k`` consecutive row slices of ``n`` rows (``k`` divides ``n``: groups stay whole when G is a multiple)."""
    size = n // k
    return [slice(start, start + size) for start in range(0, n, size)]


def pack(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], rows: slice, pad_id: int,
         device: Any) -> SequenceBatch:  # fmt: skip
    """Rows ``rows`` of a step (prompt ids per row, completion ids per row) as one padded batch on ``device``."""
    return pack_sequences(prompts[rows], completions[rows], pad_id).to(device)


def sequence_logprobs(
    model: Any,
    seqs: SequenceBatch,
    *,
    temperature: float = 1.0,
    performance: PerformanceConfig = PerformanceConfig(),  # noqa: B008  frozen
    sharded: bool = False,
    with_entropy: bool = False,
) -> Any:  # [n, T] (, [n, T])
    """Log-probs of the completion tokens; only the positions that predict them reach the output head.

    Padding positions are 0 (the fused head never computes them). ``with_entropy`` also returns the model's entropy at
    each position, from the same chunks (no gradient).
    ``sharded`` (FSDP2): only the root module's forward gathers the head, so the fused path is off.
    """
    T, chunk = seqs.completion_width, performance.logprob_chunk_size
    head = plain_output_head(model) if performance.fused_logprobs and not sharded else None
    decoder = model.get_decoder() if head is not None else None

    def run(input_ids, attention_mask, position_ids, past_key_values=None, keep=T + 1):  # [n, keep, H or V]
        inputs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=False,
        )  # the shared prompt's cache is still used
        if decoder is None:
            return model(**inputs, logits_to_keep=keep).logits
        return decoder(**inputs).last_hidden_state[:, -keep:]

    if performance.share_prompt_forward and seqs.repeats_prompts and has_plain_attention(model):
        outputs = shared_prompt_outputs(model, run, seqs)  # [n, T, H or V]
    else:
        outputs = run(seqs.input_ids, seqs.attention_mask, seqs.position_ids)[:, :-1]  # position t predicts token t
    options, mask = dict(chunk_size=chunk, with_entropy=with_entropy), seqs.completion_mask
    if decoder is None:
        result = token_logprobs(outputs, seqs.completion_ids, temperature or 1.0, **options)
        return tuple(values * mask for values in result) if with_entropy else result * mask
    return head_token_logprobs(outputs, head, seqs.completion_ids, temperature or 1.0, mask=mask, **options)


def completion_logprobs(
    model: Any,
    prompts: Sequence[Sequence[int]],  # N: each row's prompt ids
    completions: Sequence[Sequence[int]],  # N
    *,
    pad_id: int,
    num_micro_batches: int = 1,
    device: Any = "cpu",
    **options: Any,
) -> torch.Tensor:  # [N, T]
    """``model``'s log-probs of every completion token, without gradient, in ``num_micro_batches`` passes
    (``options``: those of :func:`sequence_logprobs`). Padding positions are 0."""
    width = max(1, max(len(c) for c in completions))
    out = torch.zeros(len(completions), width, device=device)
    # inference mode, except under FSDP2, which would then keep inference tensors as its gathered weights
    no_autograd = torch.no_grad() if options.get("sharded") else torch.inference_mode()
    with no_autograd:
        for rows in micro_batches(len(completions), num_micro_batches):
            seqs = pack(prompts, completions, rows, pad_id, device)
            out[rows, : seqs.completion_width] = sequence_logprobs(model, seqs, **options)
    return out
