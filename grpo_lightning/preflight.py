"""Reward-signal preflight: before training, does the recipe's prompt give GRPO anything to learn from?

GRPO learns only from groups whose G rewards differ: a group where every completion scores the same has zero
advantage everywhere. :func:`preflight` samples a few prompts × G with the recipe's prompt, sampling settings
and engine, scores them with its reward functions and reports what share of groups carry signal, how often
each reward pays, truncation and length, with advice when the signal is too thin. No Lightning here: the
module calls it before its first step, and ``grpo preflight --config <recipe>`` runs it alone.
"""

from __future__ import annotations

import math
import random
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpo_lightning.config import PromptConfig
from grpo_lightning.data import Problem, collate_problems, encode_prompt
from grpo_lightning.export import write_atomic
from grpo_lightning.rewards import RewardBreakdown
from grpo_lightning.rollout import Rollout, RolloutEngine, SamplingConfig


class PreflightError(RuntimeError):
    """Too few groups carry reward differences to train on (``rewards.preflight: raise``)."""


@dataclass
class PreflightReport:
    """What a handful of rollouts say about the reward signal."""

    num_groups: int
    group_size: int
    groups_with_signal: int
    """Groups whose G total rewards are not all equal (the only ones with non-zero advantages)."""
    reward_hits: dict[str, float]
    """Per reward function: share of completions it paid anything (> 0)."""
    reward_means: dict[str, float]
    """Per reward function: mean unweighted value."""
    truncated_rate: float
    mean_length: float
    """Mean completion length in tokens."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    """A few completions with their total reward (highest, median, lowest)."""
    settings: dict[str, Any] = field(default_factory=dict)
    """The sampling settings the rollouts used (for the advice)."""

    @property
    def signal_share(self) -> float:
        return self.groups_with_signal / max(1, self.num_groups)

    def advice(self, min_signal: float) -> list[str]:
        """Concrete changes to try when fewer than ``min_signal`` of the groups carry signal (empty otherwise)."""
        if self.signal_share >= min_signal:
            return []
        tips = []
        hits = self.reward_hits
        if all(v == 0 for v in hits.values()):
            tips.append("no reward function ever paid: spell the answer format out in model.prompt.user_template "
                        "(the system prompt alone is often ignored by small models)")  # fmt: skip
        if self.truncated_rate > 0.3:
            tips.append(f"{self.truncated_rate:.0%} of completions hit max_tokens={self.settings.get('max_tokens')}: "
                        "raise model.sampling.max_tokens or ask for shorter reasoning")  # fmt: skip
        if self.settings.get("temperature", 1.0) < 1.0:
            tips.append(
                f"raise model.sampling.temperature (now {self.settings.get('temperature')}) so completions differ more"
            )
        if self.group_size < 16:
            tips.append(
                f"raise model.grpo.num_generations (now {self.group_size}): rarer successes show up in larger groups"
            )
        tips.append("use easier problems first (a curriculum), so correctness is sometimes earned")
        return tips

    def verdict(self, min_signal: float) -> str | None:
        """Why training on these prompts would mostly see zero advantages, with what to try; None if it would not."""
        advice = self.advice(min_signal)
        if not advice:
            return None
        return (f"preflight: only {self.signal_share:.0%} of groups have reward differences (rewards.preflight_min_signal "
                f"= {min_signal:.0%}), so most steps would have zero advantages. Try: " + "; ".join(advice))  # fmt: skip

    def enforce(self, min_signal: float, mode: str = "warn", log_dir: str | Path | None = None) -> None:
        """Before training: keep the table in ``log_dir``, then warn (``mode="warn"``) or raise (``"raise"``) when
        fewer than ``min_signal`` of the groups carry signal."""
        if log_dir:
            write_atomic(Path(log_dir) / "preflight.txt", self.table() + "\n")
        verdict = self.verdict(min_signal)
        if verdict and mode == "raise":
            raise PreflightError(verdict)
        if verdict:
            warnings.warn(verdict, stacklevel=2)

    def table(self) -> str:
        """The report as plain text for the terminal and the run's log."""
        width = max(len(name) for name in self.reward_hits) if self.reward_hits else 8
        lines = [
            f"reward-signal preflight: {self.num_groups} prompts × {self.group_size} completions",
            f"  groups with reward differences  {self.groups_with_signal}/{self.num_groups} ({self.signal_share:.0%})",
            f"  truncated at max_tokens         {self.truncated_rate:.0%}",
            f"  mean completion length          {self.mean_length:.1f} tokens",
            f"  {'reward function':<{width}}  {'hit rate':>8}  {'mean':>7}",
        ]
        lines += [
            f"  {name:<{width}}  {self.reward_hits[name]:>8.0%}  {self.reward_means[name]:>7.3f}"
            for name in self.reward_hits
        ]
        for sample in self.samples:
            text = sample["completion"].replace("\n", "⏎")
            lines.append(
                f"  [{sample['which']}, reward {sample['reward']:.3f}] {text[:300]}{'…' if len(text) > 300 else ''}"
            )
        return "\n".join(lines)


def preflight(
    engine: RolloutEngine,
    tokenizer: Any,
    problems: Sequence[Problem],
    score: Callable[[dict[str, list], Rollout], RewardBreakdown],
    *,
    num_generations: int,
    sampling: SamplingConfig,
    style: PromptConfig = PromptConfig(),  # noqa: B008
    max_prompt_length: int | None = None,
) -> PreflightReport:
    """Sample ``num_generations`` completions for each problem and report the reward signal they carry.

    ``score(batch, rollout)`` is the trainer's own scoring (``GRPOModule.score``), so the preflight pays exactly
    what training would.
    """
    G = num_generations
    prompts = [encode_prompt(tokenizer, p.question, style=style, max_prompt_length=max_prompt_length) for p in problems]
    rollout = engine.generate(prompts, n=G, sampling=sampling)
    scores = score(collate_problems(list(problems)), rollout)
    totals = [[t for t in scores.total[g * G : (g + 1) * G] if not math.isnan(t)] for g in range(len(problems))]
    applicable = {name: [v for v in values if not math.isnan(v)] for name, values in scores.per_function.items()}
    order = sorted(
        range(len(scores.total)), key=lambda i: -math.inf if math.isnan(scores.total[i]) else scores.total[i]
    )
    picks = {"highest": order[-1], "median": order[len(order) // 2], "lowest": order[0]}
    return PreflightReport(
        num_groups=len(problems),
        group_size=G,
        groups_with_signal=sum(bool(t) and max(t) != min(t) for t in totals),
        # None/NaN mean "not applicable" (TRL's convention): left out of hit rates and means
        reward_hits={name: sum(v > 0 for v in values) / max(1, len(values)) for name, values in applicable.items()},
        reward_means={name: statistics.fmean(values) if values else math.nan for name, values in applicable.items()},
        truncated_rate=sum(rollout.truncated) / len(rollout.truncated),
        mean_length=statistics.fmean(len(c) for c in rollout.completion_ids),
        samples=[
            {"which": which, "reward": scores.total[i], "completion": rollout.texts[i]} for which, i in picks.items()
        ],
        settings={"temperature": sampling.temperature, "max_tokens": sampling.max_tokens},
    )


def sample_problems(problems: Sequence[Problem], k: int, seed: int) -> list[Problem]:
    """``k`` problems drawn without replacement by their own seeded generator (the global RNG is untouched)."""
    return random.Random(seed).sample(list(problems), min(k, len(problems)))
