"""From token-id lists to the padded tensors a causal LM forward needs (pure torch).

Prompts are left-padded and completions right-padded, so every prompt ends at the same column and the
last ``T + 1`` logits predict exactly the completion tokens. Position ids follow the attention mask, as
they do in ``generate``, so log-probs recomputed here match the ones seen while sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class SequenceBatch:
    """n prompt+completion sequences, padded to this batch's own longest prompt (P) and completion (T)."""

    input_ids: torch.Tensor  # [n, P + T]
    attention_mask: torch.Tensor  # [n, P + T]
    position_ids: torch.Tensor  # [n, P + T]
    completion_ids: torch.Tensor  # [n, T]
    completion_mask: torch.Tensor  # [n, T] 1 on real completion tokens
    prompt_group: torch.Tensor  # [n] which distinct prompt each row has, numbered 0 … u-1 by first appearance
    group_rows: torch.Tensor  # [u] the first row of each distinct prompt

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(*(t.to(device) for t in vars(self).values()))

    @property
    def completion_width(self) -> int:
        return self.completion_ids.shape[1]

    @property
    def repeats_prompts(self) -> bool:
        """Some rows continue the same (non-empty) prompt, whose forward they could share."""
        return len(self.group_rows) < len(self.input_ids) and self.input_ids.shape[1] > self.completion_width


def pack_sequences(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
) -> SequenceBatch:
    """Pad ``n`` (prompt, completion) pairs; ``prompts[i]`` belongs to ``completions[i]``."""
    if len(prompts) != len(completions):
        raise ValueError(f"pack_sequences: {len(prompts)} prompts for {len(completions)} completions")
    n = len(prompts)
    p_width = max((len(p) for p in prompts), default=0)
    t_width = max(1, max((len(c) for c in completions), default=0))  # ≥ 1 so empty completions still pack
    ids = torch.full((n, p_width + t_width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, p_width + t_width), dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=False)):
        start = p_width - len(prompt)
        ids[row, start:p_width] = torch.as_tensor(list(prompt), dtype=torch.long)
        ids[row, p_width : p_width + len(completion)] = torch.as_tensor(list(completion), dtype=torch.long)
        attention[row, start : p_width + len(completion)] = 1
    group_of: dict[tuple[int, ...], int] = {}  # distinct prompt → its number, in order of first appearance
    prompt_group = [group_of.setdefault(tuple(prompt), len(group_of)) for prompt in prompts]
    return SequenceBatch(
        input_ids=ids,
        attention_mask=attention,
        position_ids=positions_from_mask(attention),
        completion_ids=ids[:, p_width:],
        completion_mask=attention[:, p_width:],
        prompt_group=torch.as_tensor(prompt_group, dtype=torch.long),
        group_rows=torch.as_tensor([prompt_group.index(g) for g in range(len(group_of))], dtype=torch.long),
    )


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:  # [n, L]
    """Position ids that count only attended tokens, as ``generate`` computes them (left padding gets 0)."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def pad_rows(rows: Sequence[Sequence[float]], width: int, value: float = 0.0) -> torch.Tensor:  # [n, width]
    """Right-pad ragged per-token values (e.g. sampling log-probs) into a float tensor."""
    out = torch.full((len(rows), width), value, dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(list(row)[:width], dtype=torch.float32)
    return out


def completion_mask(completions: Sequence[Sequence[int]], drop: Sequence[bool] | None = None) -> torch.Tensor:  # [N, T]
    """1 at each completion token, 0 at padding and in every row flagged in ``drop`` (e.g. truncated completions)."""
    lengths = torch.tensor([len(c) for c in completions])
    mask = (torch.arange(max(1, int(lengths.max())))[None, :] < lengths[:, None]).float()
    if drop is not None:
        mask = mask * (~torch.tensor(list(drop), dtype=torch.bool))[:, None].float()
    return mask
