"""Loading GSM8K (real files when ../shared is present), bad rows, synthetic problems and prompts."""

from __future__ import annotations

import json

import pytest

from grpo_lightning.data import (
    DataError,
    encode_prompt,
    load_rows,
    prompt_messages,
    synthetic_rows,
    to_problems,
)
from grpo_lightning.datamodule import GSM8KDataModule
from grpo_lightning.rewards import SYSTEM_PROMPT


def test_real_test_split(gsm8k_dir):
    problems = to_problems(load_rows(str(gsm8k_dir / "test.jsonl")), on_bad_row="raise")
    assert len(problems) == 1319
    with_commas = [p for p in problems if "," in p.answer]
    assert len(with_commas) == 14
    assert all(p.answer.replace(",", "").lstrip("-").isdigit() for p in with_commas)
    assert problems[0].index == 0 and problems[0].question.startswith("Janet")


def test_real_train_split(gsm8k_dir):
    assert len(to_problems(load_rows(str(gsm8k_dir / "train.jsonl")))) == 7473


def test_bad_rows_are_reported_with_their_index(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"question": "q0", "answer": "x #### 1"}, {"question": "", "answer": "#### 2"},
            {"question": "q2", "answer": "no marker"}, {"question": "q3", "answer": "#### 3"}, {"answer": "#### 4"}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match=r"skipped 3 bad rows: row 1 .*row 2 .*row 4"):
        problems = to_problems(load_rows(str(path)), source=str(path))
    assert [(p.index, p.answer) for p in problems] == [(0, "1"), (3, "3")]
    with pytest.raises(DataError, match=r"d.jsonl: row 1: missing or empty 'question'"):
        to_problems(load_rows(str(path)), on_bad_row="raise", source=str(path))


def test_unreadable_files_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(DataError, match="bad.jsonl: line 2 is not valid JSON"):
        load_rows(str(bad))
    with pytest.raises(DataError, match="no usable rows"):
        to_problems([{"question": "q", "answer": "none"}], source="x")


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "#### 7"}]), tmp_path / "d.parquet")
    assert to_problems(load_rows(str(tmp_path / "d.parquet")))[0].answer == "7"


def test_synthetic_rows_are_seeded_and_well_formed():
    assert synthetic_rows(50, seed=3) == synthetic_rows(50, seed=3)
    assert synthetic_rows(50, seed=3) != synthetic_rows(50, seed=4)
    for p in to_problems(synthetic_rows(200), on_bad_row="raise"):
        assert int(p.answer) >= 0


def test_prompt_goes_through_the_chat_template(tiny_tokenizer):
    ids = encode_prompt(tiny_tokenizer, "What is 2+3?")
    text = tiny_tokenizer.decode(ids)
    assert text == tiny_tokenizer.apply_chat_template(
        prompt_messages("What is 2+3?"), add_generation_prompt=True, tokenize=False
    )
    assert SYSTEM_PROMPT in text and text.endswith("<|im_start|>assistant\n")


def test_long_prompts_are_left_truncated_or_rejected(tiny_tokenizer):
    question = "How many? " * 100
    full = encode_prompt(tiny_tokenizer, question)
    with pytest.warns(UserWarning, match="left-truncated"):
        cut = encode_prompt(tiny_tokenizer, question, max_prompt_length=50)
    assert cut == full[-50:]
    with pytest.raises(DataError, match="exceeds max_prompt_length=50"):
        encode_prompt(tiny_tokenizer, question, max_prompt_length=50, on_long_prompt="raise")


def test_datamodule_batches_are_columns():
    dm = GSM8KDataModule(source="synthetic", synthetic_size=10, batch_size=4)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 2  # drop_last
    assert set(batches[0]) == {"question", "answer", "index"} and len(batches[0]["question"]) == 4


def test_user_template_puts_instructions_in_the_user_turn(tiny_tokenizer):
    from grpo_lightning.config import PromptConfig

    style = PromptConfig(user_template="{question}\nAnswer inside <answer> tags.")
    messages = prompt_messages("What is 2+3?", style)
    assert messages[1] == {"role": "user", "content": "What is 2+3?\nAnswer inside <answer> tags."}
    assert messages[0]["content"] == SYSTEM_PROMPT
    text = tiny_tokenizer.decode(encode_prompt(tiny_tokenizer, "What is 2+3?", style=style))
    assert "What is 2+3?\nAnswer inside" in text


@pytest.mark.parametrize(
    "name, local",
    [("openai/gsm8k", False), ("Qwen/Qwen2.5-0.5B-Instruct", False), ("./x", True), ("../x", True), ("/x", True),
     ("~/x", True), ("x.jsonl", True), ("a/b/c", True), ("data/train", True), ("nothere/train", False)],
)  # fmt: skip
def test_what_looks_like_a_path(name, local, tmp_path, monkeypatch):
    from grpo_lightning.export import looks_like_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # a local folder: data/<anything> is a path
    assert looks_like_path(name, (".jsonl",)) is local


def test_a_mistyped_data_path_is_no_such_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for source in ("data/train", "./train", "train.parquet"):
        with pytest.raises(DataError, match=r"does not exist \(no such file or folder\)"):
            load_rows(source)


def test_a_downloaded_dataset_folder_loads_its_split(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for config, answer in (("main", "#### 7"), ("socratic", "#### 8")):  # the Hub's openai/gsm8k layout
        (tmp_path / "gsm8k" / config).mkdir(parents=True)
        for split in ("train", "test"):
            table = pa.Table.from_pylist([{"question": f"{split} q", "answer": answer}])
            pq.write_table(table, tmp_path / "gsm8k" / config / f"{split}-00000-of-00001.parquet")
    assert load_rows(str(tmp_path / "gsm8k"), "test") == [{"question": "test q", "answer": "#### 7"}]
    (tmp_path / "flat").mkdir()  # a folder like ../shared/data/gsm8k: train.jsonl, test.jsonl
    (tmp_path / "flat" / "train.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    assert load_rows(str(tmp_path / "flat"))[0]["answer"] == "#### 1"
    with pytest.raises(DataError, match=r"is a folder without 'test' data: pass a \.jsonl, \.json or \.parquet file"):
        load_rows(str(tmp_path / "flat"), "test")
