"""The notebook's reward functions, their fixed defects, the TRL calling convention and a fuzz run."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo_lightning import rewards as R
from grpo_lightning.evaluation import grade

GOOD = "<reasoning>\nShe sells 48 + 24.\nSo 72.\n</reasoning>\n<answer>\n72\n</answer>\n"
ONE_LINE = "<reasoning>\nsum\n</reasoning>\n<answer>\n72\n</answer>\n"


def conv(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def test_system_prompt_is_the_notebooks_text():
    assert (
        R.SYSTEM_PROMPT
        == "\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"
    )


def test_extractors():
    assert R.extract_xml_answer(GOOD) == "72"
    assert R.extract_xml_answer("no tags at all") == "no tags at all"
    assert R.extract_xml_answer("<answer> 5 ") == "5"
    assert R.extract_hash_answer("48/2 = 24\n#### 72") == "72"
    assert R.extract_hash_answer("#### 2,125") == "2,125"
    assert R.extract_hash_answer("no marker") is None


@pytest.mark.parametrize(
    "predicted, reference, fixed",
    [("2125", "2,125", 2.0), ("$18", "18", 2.0), ("18.00", "18", 2.0), ("-3", "-3", 2.0), ("18", "18", 2.0),
     ("17", "18", 0.0), ("eighteen", "18", 0.0), ("18.", "18", 2.0), ("1,000,000", "1000000", 2.0)],
)  # fmt: skip
def test_correctness_compares_numbers_and_seed_semantics_compares_strings(predicted, reference, fixed):
    completion = f"<reasoning>\nx\n</reasoning>\n<answer>\n{predicted}\n</answer>"
    assert R.correctness_reward_func(["p"], [conv(completion)], [reference]) == [fixed]
    seed = R.correctness_reward_func(["p"], [conv(completion)], [reference], strict_seed_semantics=True)
    assert seed == [2.0 if predicted == reference else 0.0]


def test_int_reward_accepts_negative_integers_unless_seed_semantics():
    completions = [conv(f"<answer>\n{a}\n</answer>") for a in ("42", "-42", "4.5", "x", "1,000")]
    assert R.int_reward_func(completions) == [0.5, 0.5, 0.0, 0.0, 0.5]
    assert R.int_reward_func(completions, strict_seed_semantics=True) == [0.5, 0.0, 0.0, 0.0, 0.0]


def test_soft_format_matches_multiline_only_with_the_fix():
    # Defect (a): without DOTALL the notebook's soft regex never matches the format its prompt asks for.
    assert R.soft_format_reward_func([conv(GOOD)]) == [0.5]
    assert R.soft_format_reward_func([conv(GOOD)], strict_seed_semantics=True) == [0.0]
    assert R.soft_format_reward_func(
        [conv("<reasoning>a</reasoning> <answer>1</answer>")], strict_seed_semantics=True
    ) == [0.5]
    assert R.soft_format_reward_func([conv("answer first <reasoning>a</reasoning><answer>1</answer>")]) == [0.0]


def test_strict_format():
    assert R.strict_format_reward_func([conv(ONE_LINE)]) == [0.5]
    assert R.strict_format_reward_func([conv(ONE_LINE)], strict_seed_semantics=True) == [0.5]
    assert R.strict_format_reward_func([conv(GOOD)]) == [0.5]  # multi-line reasoning
    assert R.strict_format_reward_func([conv(GOOD)], strict_seed_semantics=True) == [0.0]
    assert R.strict_format_reward_func([conv(ONE_LINE.rstrip())]) == [0.0]  # the final newline is required


def test_xmlcount():
    assert R.xmlcount_reward_func([GOOD]) == [pytest.approx(0.5)]
    assert R.xmlcount_reward_func([GOOD.rstrip("\n")]) == [pytest.approx(0.5)]
    assert R.xmlcount_reward_func([GOOD + "extra"]) == [pytest.approx(0.5 - 0.005)]
    assert R.xmlcount_reward_func(["<reasoning>\n<reasoning>\n"]) == [0.0]  # twice is not once
    # Defect (d): the notebook subtracts the whole text's length when "\n</answer>\n" is missing.
    no_final_newline = GOOD.rstrip("\n")
    seed = R.xmlcount_reward_func([no_final_newline], strict_seed_semantics=True)[0]
    assert seed == pytest.approx(0.5 - len(no_final_newline) * 0.001 + 0.001)


def test_plain_string_and_conversational_completions_score_the_same():
    for fn in R.NOTEBOOK_REWARDS:
        assert fn(prompts=["p"], completions=[GOOD], answer=["72"]) == fn(
            prompts=["p"], completions=[conv(GOOD)], answer=["72"]
        )
    assert R.correctness_reward_func(["p"], [GOOD], ["72"]) == [2.0]


def test_combine_rewards_weights_and_keeps_each_function():
    out = R.combine_rewards(
        R.NOTEBOOK_REWARDS, ["p", "p"], [GOOD, "junk"], answer=["72", "72"], weights=[1, 1, 1, 1, 0.5]
    )
    assert out.total[0] == pytest.approx(0.5 + 0.5 + 0.5 + 0.5 + 0.5 * 2.0)
    assert out.total[1] == 0.0
    assert set(out.per_function) == {R.reward_name(f) for f in R.NOTEBOOK_REWARDS}
    assert out.per_function["correctness_reward_func"] == [2.0, 0.0]  # unweighted for logging


def broken(prompts, completions, **kw):
    raise RuntimeError("boom")


def short(prompts, completions, **kw):
    return [1.0]


def infinite(prompts, completions, **kw):
    return [math.inf] * len(completions)


@pytest.mark.parametrize(
    "fn, message", [(broken, "raised RuntimeError: boom"), (short, "returned 1 values for 2"), (infinite, "non-finite")]
)
def test_bad_reward_functions_are_named(fn, message):
    with pytest.raises(R.RewardError, match=rf"'{fn.__name__}'.*{message}"):
        R.combine_rewards([fn], ["p", "p"], ["a", "b"])
    with pytest.warns(UserWarning, match=fn.__name__):
        out = R.combine_rewards([fn, R.xmlcount_reward_func], ["p", "p"], [GOOD, "b"], on_error="zero")
    assert out.per_function[fn.__name__] == [0.0, 0.0]
    assert out.total[0] == pytest.approx(0.5)


def test_resolve_reward_by_name_and_import_path():
    assert R.resolve_reward("int_reward_func") is R.int_reward_func
    assert R.resolve_reward("grpo_lightning.rewards:xmlcount_reward_func") is R.xmlcount_reward_func
    with pytest.raises(R.RewardError, match="unknown reward function 'nope'"):
        R.resolve_reward("nope")


def test_parse_number_and_last_number():
    assert R.parse_number("2,125") == 2125 and R.parse_number("$1,000.50") == R.parse_number("1000.5")
    assert R.parse_number("12,34") is None and R.parse_number("") is None and R.parse_number("1e5") is None
    assert R.last_number("so 3 + 4 = 7 apples.") == 7
    assert R.last_number("loss of -12 dollars") == -12
    assert R.last_number("nothing") is None


@settings(max_examples=3000, deadline=None, derandomize=True)
@given(st.one_of(st.text(), st.text(alphabet="<>/\n reasoninganswer0123456789,.$-#")))
def test_rewards_and_extractors_never_raise(text):
    assert isinstance(R.extract_xml_answer(text), str)
    R.extract_hash_answer(text)
    R.parse_number(text)
    R.last_number(text)
    gated = (R.last_number_reward_func, R.format_when_right_reward_func, R.grounded_format_reward_func)
    for fn in (*R.NOTEBOOK_REWARDS, *gated):
        for seed in (False, True):
            kwargs = dict(answer=[text], question=[text], strict_seed_semantics=seed)
            (value,) = fn(prompts=[text], completions=[conv(text)], **kwargs)
            assert math.isfinite(value)


# --- TRL 1.16's calling convention: token ids, trainer state, logging hooks, None, async -------------------------


def only_short(completions, **kw):
    """Applies to completions under 5 characters only (None: not applicable)."""
    return [1.0 if len(R.completion_text(c)) < 5 else None for c in completions]


def test_none_means_not_applicable_and_is_left_out_of_the_sum_and_the_mean():
    funcs = [only_short, R.xmlcount_reward_func]
    out = R.combine_rewards(funcs, ["p"] * 3, ["ok", GOOD, "no tags here"], weights=[2.0, 1.0])
    assert math.isnan(out.per_function["only_short"][1])  # kept as "missing", never a silent 0
    assert out.total == [pytest.approx(2.0), pytest.approx(0.5), 0.0]  # NaN-ignoring sum, as TRL's nansum
    alone = R.combine_rewards([only_short], ["p"] * 2, ["ok", GOOD])
    assert alone.total[0] == 1.0 and math.isnan(alone.total[1])  # no function applied: the total is missing too


def test_trl_keywords_reach_the_reward_functions():
    seen = {}

    def spy(prompts, completions, completion_ids, trainer_state, log_extra, log_metric, answer, **kw):
        seen.update(ids=completion_ids, step=trainer_state.global_step, answer=answer)
        log_metric("spy/calls", 1.0)
        log_extra("note", [f"row {i}" for i in range(len(completions))])
        return [0.0] * len(completions)

    out = R.score_groups([spy], ["q1"], ["a", "b"], 2, columns={"answer": ["7"]}, completion_ids=[[1], [2, 3]],
                         trainer_state=R.RewardState(global_step=5))  # fmt: skip
    assert seen == {"ids": [[1], [2, 3]], "step": 5, "answer": ["7", "7"]}
    assert out.metrics == {"spy/calls": [1.0]} and out.extra == {"note": ["row 0", "row 1"]}


def test_async_reward_functions_run_and_raise_with_their_name():
    async def slow_len(completions, **kw):
        return [float(len(R.completion_text(c))) for c in completions]

    class AsyncScorer:  # a callable object whose __call__ is async counts as async too
        __name__ = "async_scorer"

        async def __call__(self, completions, **kw):
            return [1.0] * len(completions)

    async def failing(completions, **kw):
        raise RuntimeError("async boom")

    out = R.combine_rewards([slow_len, AsyncScorer(), R.xmlcount_reward_func], ["p", "p"], ["ab", "abcd"])
    assert out.per_function["slow_len"] == [2.0, 4.0] and out.per_function["async_scorer"] == [1.0, 1.0]
    assert out.total == [3.0, 5.0]
    with pytest.raises(R.RewardError, match="'failing' raised RuntimeError: async boom"):
        R.combine_rewards([failing], ["p"], ["x"])


def test_last_number_reward_pays_the_lenient_answer_with_or_without_tags():
    completions = ["3 + 4 = 7 apples.", conv("<answer>\n7\n</answer>\n"), "7 apples, then 8", "$1,200.00", "no number"]
    values = R.last_number_reward_func(completions=completions, answer=["7", "7", "7", "1200", "7"])
    assert values == [1.0, 1.0, 0.0, 1.0, 0.0]  # the last number counts, not the first; garbage scores 0
    assert R.resolve_reward("last_number_reward_func") is R.last_number_reward_func
    graded = [grade(c, "7").lenient_correct for c in ("3 + 4 = 7 apples.", "7 apples, then 8")]
    assert graded == [True, False]  # the same rule as the evaluation's lenient accuracy


def test_format_when_right_pays_the_format_rewards_only_on_right_answers():
    strict, copied = (
        "<reasoning>\n3 + 4 = 7\n</reasoning>\n<answer>\n7\n</answer>\n",
        "<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n",
    )
    completions = [strict, strict, copied, "<reasoning>\n3 + 4 = 7", "3 + 4 = 7"]
    values = R.format_when_right_reward_func(
        completions=[conv(c) for c in completions], answer=["7", "8", "7", "7", "7"]
    )
    assert values == [1.5, 0.0, 0.0, 0.125, 0.0]  # full format when right; nothing when wrong or when no number
    assert values[0] == sum(
        f([strict])[0] for f in (R.xmlcount_reward_func, R.soft_format_reward_func, R.strict_format_reward_func)
    )
    assert R.resolve_reward("format_when_right_reward_func") is R.format_when_right_reward_func


def test_grounded_format_pays_the_format_only_when_the_question_numbers_appear():
    question = "Chen has 24 marbles, finds 4 more and then gives 15 to a friend. How many marbles are left?"
    wrong = "<reasoning>\n24 + 4 = 28, 28 - 15 = 12\n</reasoning>\n<answer>\n12\n</answer>\n"
    example = "<reasoning>\nA box holds 4 pens and Mia buys 3 boxes, so 4 * 3 = 12 pens.\n</reasoning>\n<answer>\n12\n</answer>\n"
    restated = "Chen has 24, finds 4, gives 15.\n" + example
    completions = [wrong, example, restated, "<reasoning>\n24, 4 and 15", "24 + 4 - 15 = 13"]
    values = R.grounded_format_reward_func(completions=[conv(c) for c in completions], question=[question] * 5)
    assert values == [1.5, 0.0, 0.0, 0.125, 0.0]  # a wrong answer in the format is paid, a copied example is not,
    # even after restating the question's numbers before the reasoning tag
    assert R.resolve_reward("grounded_format_reward_func") is R.grounded_format_reward_func


def test_soft_overlong_punishment_is_dapos_and_equals_trls():
    from trl.rewards import get_soft_overlong_punishment

    ids = [[1] * length for length in (0, 60, 80, 81, 90, 100, 120)]
    ours = R.soft_overlong_punishment(ids, max_completion_len=100, soft_cache_len=20)
    assert ours == [0.0, 0.0, 0.0, -0.05, -0.5, -1.0, -1.0]  # DAPO Eq. 13: 0, linear to −1 over the cache, −1
    assert ours == get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)(ids)
    assert R.resolve_reward("soft_overlong_punishment") is R.soft_overlong_punishment


def test_trls_own_reward_helpers_run_unchanged():
    from trl.rewards import get_soft_overlong_punishment, think_format_reward

    overlong = get_soft_overlong_punishment(max_completion_len=4, soft_punish_cache=2)
    out = R.score_groups([overlong, think_format_reward], [[{"role": "user", "content": "q"}]],
                         ["<think>\nx\n</think>\nok", "no"], 2, columns={"answer": ["1"]},
                         completion_ids=[[5, 6, 7, 8], [5]], trainer_state=R.RewardState())  # fmt: skip
    assert out.per_function["soft_overlong_punishment_reward"] == [-1.0, 0.0]
    assert out.per_function["think_format_reward"] == [1.0, 0.0]
    assert out.total == [0.0, 0.0]
