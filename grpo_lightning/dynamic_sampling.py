"""DAPO's dynamic sampling (Yu et al., 2025, arXiv:2503.14476, §3.2), without Lightning.

A group whose rewards are all equal has zero advantages, so it is dropped and its slot refilled with the group of a
new training prompt, over up to ``max_rounds`` extra generation rounds. "Rewards" are the weighted totals, or one
reward function's values (``metric``): DAPO filters on accuracy, so that an all-wrong group whose format rewards
differ still makes way. Slots still without signal after the last round keep their original group. New prompts are
drawn by a generator seeded with (data seed, process, step, round): no state to checkpoint, so a resumed run draws
exactly what the uninterrupted run drew, and the sampler's data order is untouched. Each process refills its own
batch.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from grpo_lightning.algorithm import constant_groups
from grpo_lightning.rewards import RewardBreakdown, reward_name
from grpo_lightning.rollout import Rollout

Sample = Callable[[dict[str, list]], tuple[Rollout, RewardBreakdown, float]]
"""``sample(batch) -> (rollout, rewards, seconds)``: G completions per question of ``batch``, scored."""


def check_dynamic_sampling_metric(metric: str | None, reward_funcs: Sequence[Any]) -> None:
    """Refuse a ``grpo.dynamic_sampling_metric`` that names none of the run's reward functions."""
    names = [reward_name(f) for f in reward_funcs]
    if metric is not None and metric not in names:
        raise ValueError(f"grpo.dynamic_sampling_metric={metric!r} is not one of this run's reward functions "
                         f"(model.rewards.funcs): use one of {names}, or null for the weighted total")  # fmt: skip


def draw_problems(problems: Sequence[Any], k: int, *, seed: int, rank: int, step: int, round_: int) -> list[Any]:
    """``k`` training problems, drawn by a generator seeded with (seed, process, step, round)."""
    rng = random.Random(f"dynamic-sampling/{seed}/{rank}/{step}/{round_}")
    return [rng.choice(problems) for _ in range(k)]


def refill_flat_groups(
    batch: dict[str, list],
    rollout: Rollout,
    rewards: RewardBreakdown,
    *,
    max_rounds: int,
    draw: Callable[[int, int], dict[str, list]],
    sample: Sample,
    metric: str | None = None,
) -> tuple[dict[str, list], Rollout, RewardBreakdown, dict[str, float], float]:
    """The batch, rollout and rewards with flat groups replaced where new prompts gave signal; the round's metrics
    (``groups_dropped``, ``rounds``) and the seconds its extra rollouts took. ``draw(k, round)``: a batch of k new problems;
    ``metric``: the reward function whose values decide (None: the weighted total)."""
    G, B = rollout.group_size, len(batch["question"])

    def flat_groups(scored: RewardBreakdown) -> list[bool]:  # [B]
        values = scored.total if metric is None else scored.per_function[metric]
        return constant_groups(torch.tensor(values), G).tolist()

    parts = [(batch, rollout, rewards)]
    flat = flat_groups(rewards)
    refills: list[tuple[int, int]] = []  # (part, group) of new groups with signal
    seconds, rounds, generated_flat = 0.0, 0, 0
    while len(refills) < sum(flat) and rounds < max_rounds:
        rounds += 1
        extra = draw(sum(flat) - len(refills), rounds)
        extra_rollout, extra_rewards, extra_seconds = sample(extra)
        seconds += extra_seconds
        parts.append((extra, extra_rollout, extra_rewards))
        extra_flat = flat_groups(extra_rewards)
        refills += [(len(parts) - 1, g) for g, no_signal in enumerate(extra_flat) if not no_signal]
        generated_flat += sum(extra_flat)
    queue = iter(refills)
    chosen = [next(queue, (0, g)) if flat[g] else (0, g) for g in range(B)]  # [B] (part, group)
    new_batch = {key: [parts[p][0][key][g] for p, g in chosen] for key in batch}
    new_rollout = Rollout.from_groups([part[1] for part in parts], chosen)
    new_rewards = RewardBreakdown.from_groups([part[2] for part in parts], chosen, G)
    dropped = generated_flat + sum(flat) - sum(1 for p, g in chosen if p == 0 and flat[g])
    return new_batch, new_rollout, new_rewards, {"groups_dropped": float(dropped), "rounds": float(rounds)}, seconds
