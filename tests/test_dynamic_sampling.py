"""DAPO dynamic sampling: groups whose rewards are all equal make way for new prompts' groups, deterministically."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import ScriptedEngine

from grpo_lightning.config import GRPOConfig, RewardConfig
from grpo_lightning.data import Problem, collate_problems
from grpo_lightning.dynamic_sampling import check_dynamic_sampling_metric, refill_flat_groups
from grpo_lightning.module import GRPOModule

PROBLEMS = [Problem(f"question {i}?", str(i), i) for i in range(50)]


def good(completions, **kwargs):
    return [1.0 if completion[-1]["content"] == "good" else 0.0 for completion in completions]


def module_with(texts: list[str], tokenizer, max_rounds: int, step: int = 3, rank: int = 0) -> GRPOModule:
    module = GRPOModule(grpo=GRPOConfig(num_generations=2, dynamic_sampling_max_rounds=max_rounds))
    module.reward_funcs = [good]
    module.tokenizer, module.rollout.engine = tokenizer, ScriptedEngine(texts)
    datamodule = SimpleNamespace(problems=PROBLEMS, hparams={"seed": 0})
    module._trainer = SimpleNamespace(datamodule=datamodule, max_steps=10, global_step=step, global_rank=rank,
                                      current_epoch=0, world_size=1)  # fmt: skip
    return module


def first_round(module):
    batch = collate_problems(PROBLEMS[:2])
    rollout, _ = module.generate(batch["question"])
    return batch, rollout, module.score(batch, rollout)


def refill(module, batch, rollout, rewards, metric=None):
    """What training_step does with them: (batch, rollout, rewards, metrics), the seconds dropped."""
    max_rounds = module.grpo.dynamic_sampling_max_rounds
    *result, _ = refill_flat_groups(
        batch, rollout, rewards, max_rounds=max_rounds, draw=module.draw_problems, sample=module.sample, metric=metric
    )
    return result


def test_flat_groups_are_replaced_by_new_prompts_with_signal(tiny_tokenizer):
    texts = ["good", "bad", "bad", "bad"]  # step's own batch: group 0 has signal, group 1 (all "bad") has none
    texts += ["bad", "bad"]  # round 1: the new prompt's group is flat too, dropped
    texts += ["bad", "good"]  # round 2: signal, it takes group 1's slot
    module = module_with(texts, tiny_tokenizer, max_rounds=3)
    batch, rollout, rewards = first_round(module)
    new_batch, new_rollout, new_rewards, metrics = refill(module, batch, rollout, rewards)
    assert metrics["rounds"] == 2 and metrics["groups_dropped"] == 2
    assert new_rollout.texts == ["good", "bad", "bad", "good"] and new_rewards.total == [1.0, 0.0, 0.0, 1.0]
    assert new_batch["question"][0] == "question 0?"
    drawn = module.draw_problems(1, 2)  # the same (seed, process, step, round): the same problem, as on resume
    assert new_batch["question"][1] == drawn["question"][0] and new_batch["answer"][1] == drawn["answer"][0]
    assert new_rollout.prompt_ids[1] == module.rollout.engine.calls[2][0][0]  # the prompt that was generated for
    assert new_rewards.per_function["good"] == new_rewards.total


def test_after_the_last_round_a_slot_keeps_its_flat_group(tiny_tokenizer):
    module = module_with(["good", "bad", "bad", "bad", "good", "good"], tiny_tokenizer, max_rounds=1)
    batch, rollout, rewards = first_round(module)
    new_batch, new_rollout, _, metrics = refill(module, batch, rollout, rewards)
    assert metrics == {"groups_dropped": 1.0, "rounds": 1.0}
    assert new_batch == batch and new_rollout.texts == ["good", "bad", "bad", "bad"]  # B groups, batch size unchanged


def test_draws_depend_on_step_round_and_process_only(tiny_tokenizer):
    draw = lambda **kw: module_with([], tiny_tokenizer, 1, **kw).draw_problems(8, 1)["index"]  # noqa: E731
    assert draw(step=3) == draw(step=3)  # no hidden state: a resumed run draws what the uninterrupted one drew
    assert draw(step=3) != draw(step=4) and draw(rank=0) != draw(rank=1)  # each process fills its own batch


def test_a_batch_with_signal_everywhere_generates_nothing_more(tiny_tokenizer):
    module = module_with(["good", "bad", "bad", "good"], tiny_tokenizer, max_rounds=4)
    batch, rollout, rewards = first_round(module)
    _, new_rollout, _, metrics = refill(module, batch, rollout, rewards)
    assert len(module.rollout.engine.calls) == 1 and metrics["rounds"] == 0
    assert new_rollout.texts == rollout.texts


def length(completions, **kwargs):
    return [float(len(completion[-1]["content"])) for completion in completions]


def test_a_metric_drops_groups_flat_in_that_reward_whatever_the_others_do(tiny_tokenizer):
    texts = ["good", "bad", "bad", "bad!"]  # group 1: all wrong, but its lengths differ
    texts += ["good", "bad"]  # the refill, when group 1 counts as flat
    module = module_with(texts, tiny_tokenizer, max_rounds=1)
    module.reward_funcs = [good, length]
    batch, rollout, rewards = first_round(module)
    _, kept, _, metrics = refill(module, batch, rollout, rewards)  # on the total, group 1 has signal
    assert metrics["rounds"] == 0 and kept.texts == texts[:4]
    _, refilled, _, metrics = refill(module, batch, rollout, rewards, metric="good")  # on correctness, it has none
    assert metrics == {"groups_dropped": 1.0, "rounds": 1.0} and refilled.texts == ["good", "bad", "good", "bad"]


def test_a_metric_must_name_one_of_the_runs_reward_functions():
    check_dynamic_sampling_metric(None, [good])
    check_dynamic_sampling_metric("good", [good, length])
    with pytest.raises(ValueError, match=r"dynamic_sampling_metric='accuracy'.*\['last_number_reward_func'\]"):
        GRPOModule(
            grpo=GRPOConfig(dynamic_sampling_metric="accuracy"), rewards=RewardConfig(funcs=["last_number_reward_func"])
        )
