"""What a training step reports, as plain data and pure functions (no Lightning): the step's record, the statistics
the optimizer pass measured, the logged metrics computed from them, and the sample rows shown to the user.

Every name here is the one logged (``train/…``, ``rollout/…``); validation and ``grpo evaluate`` share theirs
through :func:`grpo_lightning.evaluation.problem_metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from grpo_lightning.algorithm import constant_groups, group_std
from grpo_lightning.rewards import RewardBreakdown, extract_xml_answer
from grpo_lightning.rollout import Rollout

PROGRESS_BAR = ("train/reward", "train/kl")


@dataclass
class StepStats:
    """What the optimizer pass measured: token-weighted means over the step's micro-batches, unless stated."""

    loss: float = 0.0
    """Sum of the micro-batch losses (each already normalised by its share of the step)."""
    kl: float = 0.0
    clip_ratio_low: float = 0.0
    clip_ratio_high: float = 0.0
    is_ratio: float = 0.0
    """Mean mismatch-correction weight π_old/π_rollout (only with grpo.importance_sampling_cap)."""
    entropy: float = 0.0
    logprob_diff_mean: float = 0.0
    """Mean |log π_old − log π_rollout| over tokens: how far the engine's numbers are from the trainer's."""
    logprob_diff_max: float = 0.0
    grad_norm: float = 0.0
    lr: float = 0.0
    """The learning rate this update used."""
    dynamic_sampling: dict[str, float] = field(default_factory=dict)
    tokens: float = 0.0
    """Completion tokens the means are over."""

    def add(self, loss: torch.Tensor, values: dict[str, Any], mask: torch.Tensor, entropy: torch.Tensor,
            mismatch: torch.Tensor | None, old_logp: torch.Tensor, engine_logp: torch.Tensor | None) -> None:  # fmt: skip
        """One micro-batch: its loss, :func:`policy_loss`'s ``values``, and, over its ``mask`` ([n, T]), the
        policy's entropy, the mismatch weights ([n, T] or [n, 1]) and the engine's log-prob gap."""
        n = float(values["num_tokens"])
        means = {key: float(values.get(key, 0.0)) for key in ("kl", "clip_ratio_low", "clip_ratio_high")}
        means["entropy"] = float((entropy * mask).sum()) / max(n, 1.0)
        if mismatch is not None:
            means["is_ratio"] = float((mismatch.expand_as(mask) * mask).sum()) / max(n, 1.0)
        if engine_logp is not None:  # the engine's log-probs against the trainer's, corrected or not
            gap = (old_logp - engine_logp).abs() * mask
            means["logprob_diff_mean"] = float(gap.sum()) / max(n, 1.0)
            self.logprob_diff_max = max(self.logprob_diff_max, float(gap.max()))
        total = self.tokens + n
        for key, value in means.items():  # token-weighted running mean
            setattr(self, key, (getattr(self, key) * self.tokens + value * n) / max(total, 1.0))
        self.tokens, self.loss = total, self.loss + float(loss)


@dataclass
class StepRecord:
    """One training step's inputs and outcome, kept for callbacks (the sample table)."""

    step: int
    batch: dict[str, list]
    rollout: Rollout
    rewards: RewardBreakdown


def step_metrics(rollout: Rollout, rewards: RewardBreakdown, stats: StepStats, *, rollout_seconds: float,
                 sync_seconds: float, step_seconds: float, mismatch_correction: bool) -> dict[str, float]:  # fmt: skip
    """This process's metrics of one step (names as logged); the module averages them over processes."""
    G = rollout.group_size
    total = torch.tensor(rewards.total)  # [N]; NaN: no reward function applied
    lengths = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float32)  # [N]
    values = {
        "train/reward": float(total.nanmean().nan_to_num(0.0)),
        "train/reward_std": float(group_std(total, G).mean()),
        "train/frac_reward_zero_std": float(constant_groups(total, G).float().mean()),
        "train/entropy": stats.entropy,
        "train/completion_length": float(lengths.mean()),
        "train/truncated_fraction": sum(rollout.truncated) / max(1, len(rollout.truncated)),
        "train/kl": stats.kl,
        "train/clip_ratio/low": stats.clip_ratio_low,
        "train/clip_ratio/high": stats.clip_ratio_high,
        "train/loss": stats.loss,
        "train/grad_norm": stats.grad_norm,
        "train/lr": stats.lr,
        "train/tokens_per_second": rollout.num_tokens / max(step_seconds, 1e-9),
        "rollout/seconds": rollout_seconds,
        "rollout/sync_seconds": sync_seconds,
    }
    if mismatch_correction:
        values["rollout/is_ratio"] = stats.is_ratio
    if rollout.logprobs is not None:
        values["rollout/logprob_diff_mean"] = stats.logprob_diff_mean
    values.update({f"train/dynamic_sampling/{name}": value for name, value in stats.dynamic_sampling.items()})
    for name, per_fn in rewards.per_function.items():  # None ("not applicable") is NaN: left out of the mean
        values[f"train/rewards/{name}"] = float(torch.tensor(per_fn, dtype=torch.float32).nanmean().nan_to_num(0.0))
    for name, logged in rewards.metrics.items():  # what reward functions logged through log_metric
        values[f"train/{name}"] = sum(logged) / len(logged)
    return values


def sample_rows(record: StepRecord, per_prompt: int = 2) -> list[dict[str, Any]]:
    """A few completions per prompt of one step, with their rewards, for the sample table."""
    rollout, rewards, rows = record.rollout, record.rewards, []
    for g, (question, answer) in enumerate(zip(record.batch["question"], record.batch["answer"], strict=False)):
        for i in range(g * rollout.group_size, g * rollout.group_size + min(per_prompt, rollout.group_size)):
            rows.append({
                "step": record.step, "question": question, "expected": answer, "completion": rollout.texts[i],
                "extracted": extract_xml_answer(rollout.texts[i]), "reward": rewards.total[i],
                **{name: values[i] for name, values in rewards.per_function.items()},
                **{column: values[i] for column, values in rewards.extra.items() if i < len(values)},
            })  # fmt: skip
    return rows
