"""The format warm-up: worked solutions in the answer format, the shortest chosen, and `grpo warmup` end to end."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import REPO, demo_config

from grpo_lightning.cli import grpo
from grpo_lightning.config import OptimConfig, PromptConfig
from grpo_lightning.data import DataError, synthetic_rows
from grpo_lightning.models import ModelConfig, load_model
from grpo_lightning.rewards import correctness_reward_func, strict_format_reward_func
from grpo_lightning.warmup import formatted_solution, warm_up, warmup_examples

GSM8K_ANSWER = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 1,072"
)


def test_formatted_solution_is_the_literal_strict_format_with_annotations_dropped():
    text = formatted_solution(GSM8K_ANSWER)
    assert text == (
        "<reasoning>\nNatalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether in April and May."
        "\n</reasoning>\n<answer>\n1072\n</answer>\n"
    )
    assert strict_format_reward_func([text], strict_seed_semantics=True) == [0.5]  # the notebook's regex, literally
    assert correctness_reward_func(["?"], [text], ["1072"]) == [2.0]
    assert formatted_solution("no final answer here") is None
    assert formatted_solution("steps\n#### ") is None


def test_warmup_examples_are_the_shortest_and_end_the_turn(tiny_tokenizer):
    rows = [{"question": "long?", "answer": "a b c d e f g h i j k l m n o p\n#### 3"},
            {"question": "short?", "answer": "2+1\n#### 3"}, {"question": "", "answer": "1\n#### 1"},
            {"question": "no answer?", "answer": "3"}, {"question": "middle?", "answer": "1+1+1 = 3\n#### 3"}]  # fmt: skip
    examples = warmup_examples(rows, tiny_tokenizer, count=2, max_tokens=64, style=PromptConfig())
    prompts = [tiny_tokenizer.decode(p) for p, _ in examples]
    assert ["short?" in prompts[0], "middle?" in prompts[1]] == [True, True]
    assert all(ids[-1] == tiny_tokenizer.eos_token_id for _, ids in examples)
    assert tiny_tokenizer.decode(examples[0][1][:-1]) == formatted_solution("2+1\n#### 3")
    with pytest.raises(DataError, match=r"train.jsonl: 3 rows .* at most 64 tokens .* asked for 4"):
        warmup_examples(rows, tiny_tokenizer, count=4, max_tokens=64, style=PromptConfig(), source="train.jsonl")


def test_warm_up_lowers_the_loss_and_writes_a_loadable_model(tiny_checkpoint, tiny_tokenizer, tmp_path):
    examples = warmup_examples(
        synthetic_rows(64, seed=3), tiny_tokenizer, count=16, max_tokens=64, style=PromptConfig()
    )
    out = warm_up(ModelConfig(name_or_path=str(tiny_checkpoint)), examples, tmp_path / "warm", steps=12, batch_size=8,
                  optim=OptimConfig(lr=3e-3, warmup_ratio=0.0, weight_decay=0.0), precision="32-true",
                  record={"data": "synthetic"})  # fmt: skip
    summary = json.loads((out / "warmup.json").read_text())
    losses = summary["losses"]
    assert summary["data"] == "synthetic" and len(losses) == 12
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])  # two epochs over 16 examples: the answers are being learnt
    loaded = load_model(str(out))
    assert loaded.folder == str(out) and loaded.tokenizer.eos_token_id == tiny_tokenizer.eos_token_id


def test_grpo_warmup_command_writes_the_model_and_refuses_a_foreign_folder(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in synthetic_rows(40, seed=5)))
    args = ["warmup", "--config", str(demo_config(tmp_path)), "--data", str(data), "--examples", "8", "--steps", "2",
            "--batch-size", "4"]  # fmt: skip
    assert grpo([*args, "--out", str(tmp_path / "warm")]) == 0
    assert "--model.policy.name_or_path" in capsys.readouterr().out
    record = json.loads((tmp_path / "warm" / "warmup.json").read_text())
    assert (record["examples"], record["steps"], len(record["losses"])) == (8, 2, 2)
    assert record["command"].startswith("grpo warmup --config ") and "--examples 8" in record["command"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert grpo([*args, "--out", str(foreign)]) == 2
    assert "mine" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "keep me"


def test_the_warm_recipe_trains_on_the_prompt_the_warm_up_used():
    """`grpo warmup --config configs/smollm2-135m-cpu.yaml` then `train.py fit --config configs/smollm2-135m-warm.yaml`
    (README, scripts/demo.sh): the warm-up must have taught the prompt and the length that GRPO samples with."""
    cpu, warm = (
        yaml.safe_load((REPO / "configs" / f"smollm2-135m-{n}.yaml").read_text())["model"] for n in ("cpu", "warm")
    )
    assert warm["prompt"] == cpu["prompt"] and warm["sampling"] == cpu["sampling"]
    assert warm["policy"]["name_or_path"] == "runs/smollm2-135m-warm/warmup"
    assert "runs/smollm2-135m-warm/warmup" in (REPO / "scripts" / "demo.sh").read_text()
