"""Reward functions for the bad-input tests, importable as ``reward_fixtures:<name>``."""


def raising_reward(prompts, completions, **kwargs):
    raise RuntimeError("this reward is broken")


def wrong_length_reward(prompts, completions, **kwargs):
    return [1.0]


def inf_reward(prompts, completions, **kwargs):
    return [float("inf")] * len(completions)
