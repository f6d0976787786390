"""Inference: chat-templated prompts, reasoning/answer split, JSONL appends that never lose a row."""

from __future__ import annotations

import json
import multiprocessing
from types import SimpleNamespace

import pytest
from conftest import ScriptedEngine

from grpo_lightning.cli import grpo
from grpo_lightning.data import prompt_messages
from grpo_lightning.export import append_jsonl
from grpo_lightning.inference import answer_questions, read_questions, split_completion
from grpo_lightning.rollout import SamplingConfig


@pytest.mark.parametrize(
    "text, reasoning, answer",
    [
        ("<reasoning>\n2 + 2\n</reasoning>\n<answer>\n4\n</answer>\n", "2 + 2", "4"),
        ("<reasoning>cut off mid-thought", "cut off mid-thought", None),
        ("no tags, 4", "no tags, 4", None),
        ("thinking <answer>4</answer>", "thinking", "4"),
        ("<reasoning>a</reasoning><answer>1</answer><answer>2</answer>", "a", "2"),  # the last answer counts
    ],
)
def test_split_completion(text, reasoning, answer):
    assert split_completion(text) == (reasoning, answer)


def test_prompts_use_the_system_prompt_and_chat_template(tiny_tokenizer):
    engine = ScriptedEngine(["<reasoning>r</reasoning><answer>5</answer>"] * 2)
    rows = answer_questions(engine, tiny_tokenizer, ["What is 2+3?"], model_name="m", sampling=SamplingConfig(temperature=0.5),
                            num_samples=2)  # fmt: skip
    expected = tiny_tokenizer.apply_chat_template(prompt_messages("What is 2+3?"), add_generation_prompt=True, tokenize=True,
                                                  return_dict=False)  # fmt: skip
    assert engine.calls[0][0] == [list(expected)]
    assert [(r["answer"], r["sample"]) for r in rows] == [("5", 0), ("5", 1)]
    assert rows[0]["sampling"]["temperature"] == 0.5 and rows[0]["model"] == "m" and rows[0]["timestamp"]


def test_infer_command_appends_rows_from_every_run(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    questions = tmp_path / "questions.txt"
    questions.write_text("How many legs do 3 cats have?\n\nWhat is 10 - 4?\n")
    common = ["infer", "--model", str(tiny_checkpoint), "--engine", "hf", "--max-tokens", "8", "--output", str(out)]
    assert grpo([*common, "What is 2 + 3?"]) == 0
    printed = capsys.readouterr().out
    assert "── question" in printed and "── reasoning" in printed and "── answer" in printed
    assert grpo([*common, "--input", str(questions), "--num-samples", "2", "--temperature", "1.0"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question"] for r in rows] == ["What is 2 + 3?"] + ["How many legs do 3 cats have?"] * 2 + [
        "What is 10 - 4?"
    ] * 2
    assert {"model", "question", "reasoning", "answer", "completion", "sampling", "timestamp"} <= set(rows[0])
    assert rows[0]["sampling"]["temperature"] == 0.0 and rows[1]["sampling"]["temperature"] == 1.0


def test_infer_interactive_reads_until_an_empty_line(tiny_checkpoint, tmp_path, monkeypatch):
    lines = iter(["What is 1 + 1?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt: next(lines))
    out = tmp_path / "a.jsonl"
    assert (
        grpo(["infer", "--model", str(tiny_checkpoint), "--engine", "hf", "--max-tokens", "4", "--output", str(out)])
        == 0
    )
    assert [json.loads(x)["question"] for x in out.read_text().splitlines()] == ["What is 1 + 1?"]


@pytest.mark.parametrize(
    "make, message",
    [(lambda p: None, "does not exist"), (lambda p: p.mkdir(), "is a directory"), (lambda p: p.write_bytes(b"\xff\xfe\x00bad"), "not UTF-8"),
     (lambda p: p.write_text("\n \n"), "has no questions")],
)  # fmt: skip
def test_unreadable_questions_file(tmp_path, make, message, capsys):
    path = tmp_path / "q.txt"
    make(path)
    with pytest.raises((OSError, ValueError), match=message):
        read_questions(path)
    assert grpo(["infer", "--model", "unused", "--input", str(path)]) == 2  # fails before loading any model
    assert message in capsys.readouterr().err


def test_several_greedy_samples_are_refused(capsys):
    assert grpo(["infer", "--model", "unused", "--num-samples", "3", "q"]) == 2
    assert "temperature above 0" in capsys.readouterr().err


def test_append_closes_a_torn_line_and_never_truncates(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"b": 2, "tor')  # a previous writer died mid-line
    append_jsonl(path, {"c": 3})
    lines = path.read_text().splitlines()
    assert lines[0] == '{"a": 1}' and json.loads(lines[-1]) == {"c": 3} and len(lines) == 3


def _append_many(path: str, worker: int) -> None:
    for i in range(200):
        append_jsonl(path, {"worker": worker, "i": i, "pad": "x" * (i * 37 % 5000)})


@pytest.mark.e2e
def test_concurrent_appends_keep_every_line_whole(tmp_path):
    path = str(tmp_path / "rows.jsonl")
    workers = [multiprocessing.get_context("spawn").Process(target=_append_many, args=(path, w)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    rows = [json.loads(line) for line in open(path)]
    assert sorted((r["worker"], r["i"]) for r in rows) == [(w, i) for w in range(4) for i in range(200)]


def _full_disk_after_half(monkeypatch):
    """``os.write`` on a disk that fills up: the JSON line's first half lands, then ENOSPC."""
    import errno
    import os

    write = os.write

    def full(fd, data):
        if bytes(data[:2]) in (b'{"', b"\n{"):  # our JSONL lines only; pytest's own output is left alone
            write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(fd, data)

    monkeypatch.setattr(os, "write", full)


def test_a_full_disk_leaves_no_half_line(tmp_path, monkeypatch):
    path = tmp_path / "rows.jsonl"
    append_jsonl(path, {"a": 1})
    before = path.read_bytes()
    _full_disk_after_half(monkeypatch)
    with pytest.raises(OSError, match=r"could not append to '.*rows\.jsonl': the disk is full") as info:
        append_jsonl(path, {"b": "x" * 1000})
    monkeypatch.undo()
    assert info.value.errno == 28 and path.read_bytes() == before  # whole or absent: absent


def test_infer_stops_at_the_first_failed_write(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "answers.jsonl"
    _full_disk_after_half(monkeypatch)
    code = grpo(["infer", "--model", str(tiny_checkpoint), "--engine", "hf", "--max-tokens", "4", "--output", str(out),
                 "q1", "q2"])  # fmt: skip
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 2 and "grpo infer: error: could not append to" in err and "disk is full" in err
    assert out.read_bytes() == b""  # no half line


def _loaded(tiny_model, tiny_tokenizer):
    from grpo_lightning.models import LoadedModel

    return LoadedModel(tiny_model, tiny_tokenizer, "tiny", folder="tiny")


def test_auto_engine_is_transformers_on_a_cpu_even_with_vllm_installed(tiny_model, tiny_tokenizer, monkeypatch):
    import importlib.util

    import torch

    from grpo_lightning import rollout

    find_spec = importlib.util.find_spec
    installed = lambda name, *args: object() if name == "vllm" else find_spec(name, *args)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", installed)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert isinstance(rollout.open_engine(_loaded(tiny_model, tiny_tokenizer), "auto"), rollout.HFEngine)
    chosen = []
    monkeypatch.setattr(rollout, "make_engine", lambda kind, *a, **kw: chosen.append(kind) or SimpleNamespace())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    rollout.open_engine(_loaded(tiny_model, tiny_tokenizer), "auto")
    assert chosen == ["vllm"]  # on a GPU, vLLM when it is installed


def test_vllm_on_a_cpu_gets_a_bounded_kv_cache_and_quiet_logs(tiny_model, tiny_tokenizer, monkeypatch):
    import logging
    import os

    import torch

    from grpo_lightning import rollout

    for name in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_LOGGING_LEVEL", "VLLM_LOGGING_STREAM"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)  # restored to its state before the test afterwards
    logger = logging.getLogger("vllm")
    monkeypatch.setattr(logger, "level", logger.level)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(rollout, "make_engine", lambda kind, *a, **kw: SimpleNamespace())
    rollout.open_engine(_loaded(tiny_model, tiny_tokenizer), "vllm", quiet=True)
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "2"  # GiB; vLLM-CPU's default took 21 GB for a 0.4 M model
    assert os.environ["VLLM_LOGGING_STREAM"] == "ext://sys.stderr" and logger.getEffectiveLevel() >= logging.WARNING
