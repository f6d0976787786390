"""Format warm-up: a short supervised stage on worked solutions written in the answer format, before GRPO.

GRPO can only reinforce what the policy already samples. SmolLM2-135M-Instruct closed ``</reasoning>`` in 0.3 % of
its sampled answers and never wrote the notebook's strict format, so no weighting of the format rewards taught it
(BENCHMARKS §1b, runs A–T). DeepSeek-R1 meets the same problem with a "cold start": a little supervised training on
answers in the wanted format, then RL. This is that stage, kept small: GSM8K's shortest worked solutions (calculator
annotations dropped) as ``<reasoning>`` + ``<answer>``, the recipe's own prompt, the loss on the answer tokens only.
``grpo warmup --config <recipe>`` runs it and writes an HF folder that the recipe's ``model.policy`` then names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from grpo_lightning.batch import pack_sequences
from grpo_lightning.callbacks import StepProgressBar
from grpo_lightning.config import OptimConfig, PromptConfig
from grpo_lightning.data import DataError, encode_prompt
from grpo_lightning.export import check_replaceable, save_hf_folder
from grpo_lightning.logprobs import sequence_logprobs
from grpo_lightning.models import ModelConfig, load_causal_lm, load_tokenizer
from grpo_lightning.optimization import adamw_warmup_cosine

Example = tuple[list[int], list[int]]  # (prompt ids, answer ids ending with the end-of-turn token)


def formatted_solution(answer: str) -> str | None:
    """A GSM8K ``answer`` (worked solution, then ``#### n``) in the notebook's format, ending with the newline after
    ``</answer>`` that its strict pattern asks for; calculator annotations ``<<…>>`` dropped. None without ``####``.

    The solution's lines are joined by spaces: the notebook's strict pattern, read literally (no ``re.DOTALL``),
    accepts only one-line reasoning, and a model warmed up on GSM8K's one-step-per-line layout passes it 1.8 % of
    the time (BENCHMARKS.md §1b, runs W2 and W3)."""
    reasoning, sep, final = answer.rpartition("####")
    final = final.strip().replace(",", "")
    if not sep or not final:
        return None
    steps = re.sub(r"<<[^<>]*>>", "", reasoning).splitlines()
    reasoning = " ".join(step.strip() for step in steps if step.strip())
    return f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{final}\n</answer>\n"


def warmup_examples(
    rows: Iterable[dict[str, Any]],
    tokenizer: Any,
    *,
    count: int,
    max_tokens: int,
    style: PromptConfig,
    source: str = "data",
) -> list[Example]:
    """The ``count`` rows with the shortest formatted solutions that fit ``max_tokens`` (end-of-turn included), as
    (prompt ids, answer ids); ties keep the data's order. Raises when fewer than ``count`` rows qualify."""
    if tokenizer.eos_token_id is None:
        raise ValueError("warm-up: the tokenizer has no eos_token, so an answer could not be taught to end")
    candidates = []
    for index, row in enumerate(rows):
        question, target = row.get("question"), formatted_solution(str(row.get("answer") or ""))
        if not isinstance(question, str) or not question.strip() or target is None:
            continue
        ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) <= max_tokens:
            candidates.append((len(ids), index, question.strip(), ids))
    if len(candidates) < count:
        raise DataError(f"{source}: {len(candidates)} rows have a '#### n' solution of at most {max_tokens} tokens "
                        f"in the answer format; the warm-up asked for {count}")  # fmt: skip
    chosen = sorted(candidates)[:count]
    return [(encode_prompt(tokenizer, q, style=style), ids) for _, _, q, ids in chosen]


class WarmupModule(L.LightningModule):
    """Next-token training of the policy on (prompt, answer) pairs; the loss covers the answer tokens only."""

    def __init__(self, policy: ModelConfig, optim: OptimConfig, total_steps: int) -> None:
        super().__init__()
        self.policy_config, self.optim, self.total_steps = policy, optim, total_steps
        self.policy: Any = None
        self.tokenizer: Any = None
        self.losses: list[float] = []  # one per optimizer step

    def configure_model(self) -> None:
        if self.policy is None:
            self.tokenizer = load_tokenizer(self.policy_config)
            self.policy = load_causal_lm(self.policy_config)

    def training_step(self, batch: list[Example], batch_idx: int) -> torch.Tensor:
        prompts, answers = zip(*batch, strict=True)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        seqs = pack_sequences(prompts, answers, pad).to(self.device)
        logprobs = sequence_logprobs(self.policy, seqs)  # [n, T]
        mask = seqs.completion_mask
        loss = -(logprobs * mask).sum() / mask.sum()
        self.log("warmup/loss", loss, prog_bar=True)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        # the trainer clips (gradient_clip_val), which Lightning refuses for a fused optimizer under mixed precision
        optimizer, scheduler = adamw_warmup_cosine(self.policy, self.optim, self.total_steps, fused=False)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def examples_loader(examples: Sequence[Example], batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    """Shuffled batches of examples, reshuffled every epoch, the same for a seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        list(examples), batch_size=batch_size, shuffle=True, generator=generator, collate_fn=list
    )


def warm_up(policy: ModelConfig, examples: Sequence[Example], out: str | Path, *, steps: int, batch_size: int,
            optim: OptimConfig, precision: str, seed: int = 0, record: dict | None = None,
            overwrite: bool = False) -> Path:  # fmt: skip
    """Train ``policy`` for ``steps`` optimizer steps on ``examples`` and write it, with its tokenizer, as an HF
    folder at ``out`` (atomically; an existing folder of the user's is refused unless ``overwrite``), beside
    ``warmup.json``: ``record`` (how it was made) and the loss of every step."""
    check_replaceable(Path(out), overwrite)  # before minutes of training
    L.seed_everything(seed, verbose=False)
    module = WarmupModule(policy, optim, steps)
    trainer = L.Trainer(devices=1, max_steps=steps, precision=precision, gradient_clip_val=optim.max_grad_norm or None,
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[StepProgressBar()])  # fmt: skip
    trainer.fit(module, examples_loader(examples, batch_size, seed))
    summary = json.dumps({**(record or {}), "losses": [round(x, 4) for x in module.losses]}, indent=1)
    return save_hf_folder(module.policy, module.tokenizer, out, {"warmup.json": summary + "\n"}, overwrite=overwrite)
