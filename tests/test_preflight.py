"""The reward-signal preflight: its report from scripted rollouts, `grpo preflight`, and the check before `fit`."""

from __future__ import annotations

import pytest
from conftest import ScriptedEngine, demo_config

from grpo_lightning.data import Problem, synthetic_rows, to_problems
from grpo_lightning.module import GRPOModule
from grpo_lightning.preflight import preflight, sample_problems
from grpo_lightning.rollout import SamplingConfig

STRICT = "<reasoning>\n2 + 2 = 4\n</reasoning>\n<answer>\n4\n</answer>\n"
PROBLEMS = [Problem("What is 2 + 2?", "4", 0), Problem("What is 3 + 3?", "6", 1)]


def test_report_counts_groups_with_signal_hits_and_samples(tiny_tokenizer):
    # group 1: one strict, correct answer among noise (signal); group 2: all the same (no signal)
    engine = ScriptedEngine([STRICT, "no idea", "no idea", "no idea"] + ["7"] * 4)
    report = preflight(
        engine, tiny_tokenizer, PROBLEMS, GRPOModule().score, num_generations=4, sampling=SamplingConfig()
    )
    assert (report.num_groups, report.groups_with_signal, report.signal_share) == (2, 1, 0.5)
    assert report.reward_hits["correctness_reward_func"] == pytest.approx(1 / 8)
    assert report.reward_hits["strict_format_reward_func"] == pytest.approx(1 / 8)
    assert report.reward_means["correctness_reward_func"] == pytest.approx(2.0 / 8)
    assert report.samples[0]["which"] == "highest" and report.samples[0]["completion"] == STRICT
    table = report.table()
    assert "1/2 (50%)" in table and "correctness_reward_func" in table and "<answer>⏎4⏎</answer>" in table
    assert report.advice(0.5) == []
    assert any("num_generations" in tip for tip in report.advice(0.9))


def test_no_reward_ever_paid_advises_spelling_out_the_format(tiny_tokenizer):
    engine = ScriptedEngine(["just text"] * 8)
    report = preflight(engine, tiny_tokenizer, PROBLEMS, GRPOModule().score, num_generations=4,
                       sampling=SamplingConfig(temperature=0.7))  # fmt: skip
    assert report.signal_share == 0
    advice = " ".join(report.advice(0.25))
    assert "user_template" in advice and "temperature" in advice


def test_sample_problems_is_seeded_and_leaves_the_global_rng_alone():
    import random

    problems = to_problems(synthetic_rows(50))
    state = random.getstate()
    assert sample_problems(problems, 5, seed=3) == sample_problems(problems, 5, seed=3)
    assert random.getstate() == state and len(sample_problems(problems, 99, seed=0)) == 50


def test_grpo_preflight_command_prints_the_table_and_fails_on_thin_signal(tmp_path, capsys):
    from grpo_lightning.cli import grpo

    config = str(demo_config(tmp_path))
    assert grpo(["preflight", "--config", config, "--prompts", "2", "--min-signal", "0", "--engine", "hf"]) == 0
    out = capsys.readouterr().out
    assert "reward-signal preflight: 2 prompts × 8 completions" in out and "xmlcount_reward_func" in out
    assert grpo(["preflight", "--config", config, "--prompts", "2", "--min-signal", "1", "--engine", "hf",
                 "--model.sampling.max_tokens=4"]) == 1  # fmt: skip
    captured = capsys.readouterr()
    assert "4 completions" not in captured.out and "want ≥ 100%" in captured.err and "try:" in captured.err


@pytest.mark.e2e
def test_fit_runs_the_preflight_first(tmp_path):
    from grpo_lightning.cli import main
    from grpo_lightning.preflight import PreflightError

    config = demo_config(tmp_path, trainer={"max_steps": 1}, data={"val_size": 0},
                         model={"rewards.preflight_prompts": 2, "rewards.preflight_min_signal": 1.0})  # fmt: skip
    with pytest.warns(UserWarning, match="preflight: only"):
        main(["fit", "--config", str(config)])
    (table,) = (tmp_path / "run" / "csv").glob("version_*/preflight.txt")
    assert "reward-signal preflight: 2 prompts" in table.read_text()
    with pytest.raises(PreflightError, match="rewards.preflight_min_signal"):
        main(["fit", "--config", str(config), "--model.rewards.preflight", "raise", "--overwrite"])


def test_greedy_training_is_refused():
    with pytest.raises(ValueError, match="sampling.temperature=0 .* identical"):
        GRPOModule(sampling=SamplingConfig(temperature=0.0))
