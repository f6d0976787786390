"""Evaluation: grading, batching, the `grpo evaluate` command, and validation/test inside Lightning."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import ScriptedEngine, metrics

from grpo_lightning.cli import grpo, main
from grpo_lightning.data import Problem
from grpo_lightning.evaluation import evaluate, grade, summarize
from grpo_lightning.rewards import SYSTEM_PROMPT

GOOD = "<reasoning>\n3 + 4 = 7\n</reasoning>\n<answer>\n7\n</answer>\n"


@pytest.mark.parametrize(
    "completion, reference, strict, lenient, strict_fmt, soft_fmt",
    [
        (GOOD, "7", True, True, True, True),
        (GOOD.replace("\n7\n</answer>", "\n$7.00\n</answer>"), "7", True, True, True, True),  # numeric, not string
        ("<reasoning>so</reasoning><answer>1,250</answer>", "1250", True, True, False, True),
        ("The answer is 7", "7", False, True, False, False),  # no tag: only lenient
        ("<answer>7</answer> and later 8", "7", True, False, False, False),  # lenient reads the last number
        (GOOD, "8", False, False, True, True),
        ("", "7", False, False, False, False),
    ],
)  # fmt: skip
def test_grade(completion, reference, strict, lenient, strict_fmt, soft_fmt):
    g = grade(completion, reference)
    assert (g.strict_correct, g.lenient_correct, g.strict_format, g.soft_format) == (
        strict,
        lenient,
        strict_fmt,
        soft_fmt,
    )
    assert g.answer is None if "<answer>" not in completion else g.answer is not None


def test_notebook_strict_format_is_the_pattern_read_literally():
    """The notebook's regex runs without re.DOTALL: multi-line reasoning passes our strict check, not the notebook's."""
    two_lines = GOOD.replace("3 + 4 = 7", "3 + 4 = 7\nso 7")
    assert [grade(t, "7").strict_format for t in (GOOD, two_lines)] == [True, True]
    assert [grade(t, "7").notebook_strict_format for t in (GOOD, two_lines)] == [True, False]


def test_evaluate_batches_greedy_and_summarizes(tiny_tokenizer):
    problems = [Problem(f"What is {k} + 0?", str(k), k) for k in range(7)]
    texts = [GOOD.replace("7", str(k)) if k % 2 == 0 else f"maybe {k}" for k in range(7)]
    engine = ScriptedEngine(texts)
    records = evaluate(engine, tiny_tokenizer, problems, max_tokens=50, batch_size=3, progress=False)
    assert [len(prompts) for prompts, _ in engine.calls] == [3, 3, 1]
    assert all(s.temperature == 0 and s.max_tokens == 50 for _, s in engine.calls)
    assert [r["index"] for r in records] == list(range(7))
    summary = summarize(records)
    assert summary["strict_accuracy"] == pytest.approx(4 / 7)  # the even k answer in format
    assert summary["lenient_accuracy"] == 1.0  # the odd k still end with the right number
    assert summary["strict_format_rate"] == pytest.approx(4 / 7)
    assert summary["notebook_strict_format_rate"] == pytest.approx(4 / 7)  # GOOD's reasoning is one line
    assert summary["completion_length"] == pytest.approx((1 + 2 + 3 + 1 + 2 + 3 + 1) / 7)


def test_evaluate_command_on_the_real_test_file(gsm8k_dir, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    code = grpo(["evaluate", "--model", str(tiny_checkpoint), "--data", str(gsm8k_dir / "test.jsonl"), "--limit", "5",
                 "--engine", "hf", "--max-tokens", "8", "--out", str(out)])  # fmt: skip
    assert code == 0
    records = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3, 4]
    assert records[0]["reference"] == "18"  # GSM8K test row 0: Janet's ducks
    assert all(0 < r["completion_tokens"] <= 8 for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_problems"] == 5 and set(summary["metrics"]) >= {"strict_accuracy", "lenient_accuracy"}
    assert "strict_accuracy" in capsys.readouterr().out


def test_evaluate_command_on_a_checkpoint_matches_its_export(short_run, tmp_path):
    """A .ckpt and the HF folder exported from it are the same model: identical per-problem records (both loaded in
    the dtype that fits the CPU; a barely trained model's greedy choices would differ between bf16 and float32)."""
    args = ["--data", "synthetic", "--limit", "6", "--engine", "hf", "--max-tokens", "8"]
    ckpt = short_run / "run" / "checkpoints" / "last.ckpt"
    assert grpo(["evaluate", "--model", str(ckpt), *args, "--out", str(tmp_path / "a")]) == 0
    assert grpo(["evaluate", "--model", str(short_run / "run" / "hf_export"), *args, "--out", str(tmp_path / "b")]) == 0
    completions = [
        [json.loads(x)["completion"] for x in (tmp_path / d / "problems.jsonl").read_text().splitlines()] for d in "ab"
    ]
    assert completions[0] == completions[1] and len(completions[0]) == 6


@pytest.mark.parametrize(
    "args, message",
    [(["--model", "/nonexistent/model"], "does not exist"), (["--model", "missing.ckpt"], "checkpoint 'missing.ckpt' does not exist"),
     (["--data", "/nonexistent.jsonl"], "does not exist")],
)  # fmt: skip
def test_evaluate_bad_input_is_one_clear_line(args, message, tiny_checkpoint, capsys):
    base = {"--model": str(tiny_checkpoint), "--data": "synthetic"}
    base.update(dict(zip(args[::2], args[1::2], strict=False)))
    code = grpo(["evaluate", *[x for kv in base.items() for x in kv], "--engine", "hf", "--limit", "2"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.e2e
def test_validation_during_fit_is_logged(demo_run):
    """The demo validates 32 held-out problems every 25 steps: at steps 25 and 50 of the 60-step run."""
    rows = [r for r in metrics(demo_run) if r.get("val/strict_accuracy")]
    assert [int(r["step"]) for r in rows] == [24, 49]
    for r in rows:
        rates = ("val/strict_accuracy", "val/lenient_accuracy", "val/strict_format_rate", "val/soft_format_rate")
        assert all(0 <= float(r[k]) <= 1 for k in rates)
        assert 0 < float(r["val/completion_length"]) <= 16
    card = (demo_run / "run" / "hf_export" / "README.md").read_text()
    assert "## Evaluation" in card and "accuracy" in card


@pytest.mark.e2e
def test_test_command_on_a_checkpoint(demo_run):
    cli = main(["test", "--config", str(demo_run / "config.yaml"), "--ckpt_path", str(demo_run / "run" / "checkpoints" / "last.ckpt"),
                "--data.test_size", "8", "--trainer.logger", "false"])  # fmt: skip
    results = cli.trainer.callback_metrics
    assert {"test/strict_accuracy", "test/strict_format_rate", "test/completion_length"} <= set(results)
    assert 0 < float(results["test/completion_length"]) <= 16


def test_evaluate_takes_the_prompt_of_a_recipe(tiny_checkpoint, tmp_path):
    from conftest import REPO

    out = tmp_path / "eval"
    assert grpo(["evaluate", "--model", str(tiny_checkpoint), "--data", "synthetic", "--limit", "2", "--engine", "hf",
                 "--max-tokens", "4", "--out", str(out), "--prompt-from", str(REPO / "configs" / "smollm2-135m-cpu.yaml")]) == 0  # fmt: skip
    prompt = json.loads((out / "summary.json").read_text())["prompt"]
    recipe = yaml.safe_load((REPO / "configs" / "smollm2-135m-cpu.yaml").read_text())["model"]["prompt"]
    assert prompt["user_template"] == recipe["user_template"] != "{question}"
    assert prompt["system_prompt"] == SYSTEM_PROMPT  # the recipe keeps the notebook's system turn


def test_a_recipe_with_the_old_prompt_keys_is_refused_before_loading(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  grpo:\n    user_template: '{question} Think.'\n")
    code = grpo(["evaluate", "--model", "/nonexistent/model", "--data", "synthetic", "--prompt-from", str(old)])
    err = capsys.readouterr().err
    assert code == 2 and "model.grpo.user_template is an old key" in err and "model.prompt.user_template" in err


def test_reasoning_copied_from_the_prompt_is_flagged():
    template = "{question}\n<reasoning>\n(your step-by-step reasoning)\n</reasoning>\n<answer>\n(the final number)\n</answer>\n"
    copied = grade("<reasoning>\n(your step-by-step reasoning)\n</reasoning>\n<answer>\n5\n</answer>\n", "5", template)
    real = grade("<reasoning>\n3 + 2 = 5\n</reasoning>\n<answer>\n5\n</answer>\n", "5", template)
    empty = grade("<reasoning></reasoning><answer>5</answer>", "5", template)
    untagged = grade("The answer is 5.", "5", template)
    assert (copied.reasoning_copied, real.reasoning_copied, empty.reasoning_copied, untagged.reasoning_copied) == (
        True, False, True, False)  # fmt: skip
    example = (
        "{question}\nExample:\n<reasoning>\nA box holds 4 pens and Mia buys 3 boxes, so 4 * 3 = 12 pens.\n</reasoning>"
    )
    borrowed = "<reasoning>\nA box holds 4 pens and Mia buys 3 boxes.\nSo 3 + 6 = 9.\n</reasoning>"
    assert grade(borrowed, "9", example).reasoning_copied  # a sentence of the worked example
    assert not grade("<reasoning>\nMia has 4 pens, so 4 + 5 = 9.\n</reasoning>", "9", example).reasoning_copied
    assert real.reasoning == "3 + 2 = 5" and untagged.reasoning is None


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--limit", "0"), ("--limit", "-3"), ("--max-tokens", "0")])  # fmt: skip
def test_counts_below_one_are_refused_by_the_parser(flag, value, capsys):
    with pytest.raises(SystemExit) as info:
        grpo(["evaluate", "--model", "any", "--data", "synthetic", flag, value])
    assert info.value.code == 2
    assert f"argument {flag}: must be ≥ 1, got {value}" in capsys.readouterr().err


def test_a_mistyped_model_path_fails_at_once_without_the_hub(tmp_path, monkeypatch, capsys):
    import time

    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as for a new user: the Hub would be tried
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    start = time.perf_counter()
    for model in ("runs/nope", "./nope", "nope/model.safetensors", "runs/v/checkpoints/x"):
        assert grpo(["evaluate", "--model", model, "--data", "synthetic", "--limit", "1", "--engine", "hf"]) == 2
        assert f"model path '{model}' does not exist (no such file or folder)" in capsys.readouterr().err
    assert time.perf_counter() - start < 10  # no Hub retries
