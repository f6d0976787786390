"""Fuzzing the inputs users control: data rows, JSONL files, prompts, completions (thousands of cases, seeded).

Each property says what may happen to hostile input: a clear ``DataError`` (or a skipped-row warning) and
nothing else; prompts always fit their budget; grading and splitting never raise. The reward functions
have their own 3,000-case property in ``test_rewards.py``.
"""

from __future__ import annotations

import json
import warnings

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grpo_lightning.data import DataError, encode_prompt, load_rows, to_problems
from grpo_lightning.evaluation import grade
from grpo_lightning.inference import split_completion
from grpo_lightning.rewards import extract_hash_answer

FUZZ = settings(
    max_examples=1000, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
values = st.one_of(
    st.text(),
    st.text(alphabet="#0123456789,.-$ \n"),
    st.integers(),
    st.floats(),
    st.none(),
    st.lists(st.text(), max_size=2),
)
rows = st.one_of(
    st.dictionaries(st.sampled_from(["question", "answer", "other"]), values), st.text(), st.integers(), st.none()
)


@FUZZ
@given(st.lists(rows, max_size=8))
def test_rows_become_problems_or_a_clear_error(batch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped rows are reported by a warning
        try:
            problems = to_problems(batch, source="fuzz")
        except DataError as err:
            assert "fuzz" in str(err)
            return
    for p in problems:
        row = batch[p.index]
        assert p.question == row["question"].strip() and p.question
        assert p.answer == extract_hash_answer(row["answer"]) and p.answer


@FUZZ
@given(
    st.lists(
        st.one_of(st.text(), st.builds(json.dumps, st.one_of(values, st.dictionaries(st.text(), values)))), max_size=6
    )
)
def test_jsonl_files_load_or_name_the_line(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    path.write_text("\n".join(line.replace("\n", " ") for line in lines), encoding="utf-8")
    try:
        loaded = load_rows(str(path))
    except DataError as err:
        assert str(path) in str(err) and "line" in str(err)
        return
    assert all(isinstance(row, dict) for row in loaded)


@FUZZ
@given(st.text(max_size=2000), st.integers(min_value=16, max_value=128))
def test_prompts_always_fit_their_budget(tiny_tokenizer, question, budget):
    full = encode_prompt(tiny_tokenizer, question)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = encode_prompt(tiny_tokenizer, question, max_prompt_length=budget)
    assert len(ids) == min(len(full), budget) and ids == full[-len(ids) :]  # left-truncated: the header survives


@FUZZ
@given(st.lists(st.one_of(st.sampled_from(["<reasoning>", "</reasoning>", "<answer>", "</answer>", "\n", "7", "$", ","]),
                          st.characters()), max_size=120).map("".join), st.text(max_size=12))  # fmt: skip
def test_grading_and_splitting_never_raise(completion, reference):
    g = grade(completion, reference)
    reasoning, answer = split_completion(completion)
    assert isinstance(reasoning, str) and (answer is None) == ("<answer>" not in completion)
    assert not g.strict_correct or g.answer is not None
