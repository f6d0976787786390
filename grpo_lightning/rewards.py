"""The OneShotGRPO notebook's answer parsing and reward functions, with its defects fixed.

Strings in, floats out: no torch, no project imports. Every reward follows TRL's GRPOTrainer calling
convention (1.16), so reward functions written for TRL work here unchanged and ours work in TRL:

    fn(prompts, completions, completion_ids, answer, trainer_state, log_extra, log_metric, **kwargs)
        -> list[float | None]   # one value per completion; None: "does not apply to this completion"

A function may be ``async``; all async functions of a step run concurrently. A ``None`` value is left out of that
function's mean and counts as missing in the weighted sum (TRL's ``nansum``); a completion no function scored gets
a NaN total, which the advantages leave out of its group and give advantage 0 (as TRL does).

A completion is either a string or a conversational list of messages
(``[{"role": "assistant", "content": "..."}]``). Rewards never evaluate model text and never raise on
any string: garbage scores 0.

Defects of the notebook fixed here (pass ``strict_seed_semantics=True`` to get its exact behaviour):

(a) the format regexes lack ``re.DOTALL``, so ``soft_format_reward_func`` never matches the multi-line
    format the system prompt asks for;
(b) ``correctness_reward_func`` compares strings, so ``2125`` vs the reference ``2,125``, ``$18`` vs
    ``18`` and ``18.00`` vs ``18`` score 0; we compare numbers after normalising those;
(c) ``int_reward_func`` uses ``str.isdigit``, which rejects negative integers;
(d) ``xmlcount_reward_func`` subtracts 0.001 per character of the *whole* completion when
    ``"\\n</answer>\\n"`` is missing; we subtract only for characters after the closing tag.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

SYSTEM_PROMPT = """
Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>
"""

RewardFunc = Callable[..., list[float | None]]

_STRICT_FORMAT = r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$"
_SOFT_FORMAT = r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>"
_NUMBER = re.compile(r"[-+]?\$?\s*\d[\d,]*(?:\.\d+)?|[-+]?\$?\s*\.\d+")
_INTEGER = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+|[-+]?\d+")


def completion_text(completion: Any) -> str:
    """The text of a completion given as a string or as TRL's conversational message list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, Sequence) and completion:
        return completion_text(completion[-1])
    return ""


def extract_xml_answer(text: str) -> str:
    """The text between the last ``<answer>`` and the next ``</answer>`` (the notebook's parser)."""
    answer = text.split("<answer>")[-1]
    answer = answer.split("</answer>")[0]
    return answer.strip()


def extract_hash_answer(text: str) -> str | None:
    """GSM8K's reference answer: what follows ``####``, or None when the marker is missing."""
    if "####" not in text:
        return None
    return text.split("####")[1].strip()


def parse_number(text: str) -> Fraction | None:
    """A number written as GSM8K answers are: ``2,125``, ``$18``, ``18.00``, ``-3``, ``7.`` → exact value.

    Returns None unless the whole string (after trimming spaces, a trailing period and a unit-free
    ``$``/``%``) is one number. Fractions keep ``0.1 + 0.2``-style float noise out of comparisons.
    """
    s = text.strip().rstrip(".").strip()
    if len(s) > 64:
        return None
    s = s.replace("$", "").replace("%", "").replace(" ", "")
    if s.startswith(("+", "-")):
        sign, s = s[0], s[1:]
    else:
        sign = ""
    if re.fullmatch(r"\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if not re.fullmatch(r"\d+(\.\d+)?|\.\d+", s):
        return None
    return Fraction(sign + s)


def last_number(text: str) -> Fraction | None:
    """The last number anywhere in the text (lenient answer extraction)."""
    for match in reversed(_NUMBER.findall(text[-10_000:])):
        value = parse_number(match)
        if value is not None:
            return value
    return None


def lenient_match(text: str, reference: str) -> bool:
    """The last number anywhere in ``text`` equals the reference (False when the reference is not a number)."""
    value = parse_number(reference)
    return value is not None and last_number(text) == value


def answers_match(predicted: str, reference: str, *, strict_seed_semantics: bool = False) -> bool:
    """Numeric equality after normalisation (string equality when either side is not a number)."""
    if strict_seed_semantics:
        return predicted == reference
    p, r = parse_number(predicted), parse_number(reference)
    if p is None or r is None:
        return predicted.strip() == reference.strip()
    return p == r


def _texts(completions: Sequence[Any]) -> list[str]:
    return [completion_text(c) for c in completions]


def correctness_reward_func(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    answer: Sequence[str],
    *,
    strict_seed_semantics: bool = False,
    **kwargs: Any,
) -> list[float]:
    """2.0 when the answer inside ``<answer>`` equals the reference (numerically, unless seed semantics)."""
    return [
        2.0 if answers_match(extract_xml_answer(t), str(a), strict_seed_semantics=strict_seed_semantics) else 0.0
        for t, a in zip(_texts(completions), answer, strict=True)
    ]


def last_number_reward_func(completions: Sequence[Any], answer: Sequence[str], **kwargs: Any) -> list[float]:
    """1.0 when the last number anywhere in the completion equals the reference, tags or not.

    Not one of the notebook's five: the correctness that ``grpo evaluate`` calls lenient, as a reward. A weak model
    that writes no ``<answer>`` tag yet is right in free text far more often than in the format, so this keeps a
    correctness signal in its groups where the notebook's ``correctness_reward_func`` pays nothing (BENCHMARKS.md
    §1b, runs H–K).
    """
    return [1.0 if lenient_match(t, str(a)) else 0.0 for t, a in zip(_texts(completions), answer, strict=True)]


def format_when_right_reward_func(completions: Sequence[Any], answer: Sequence[str], **kwargs: Any) -> list[float]:
    """The notebook's three format rewards summed (xmlcount + soft + strict, at most 1.5), paid only when the last
    number of the completion equals the reference.

    Not one of the notebook's five. Paid unconditionally, the format rewards made a small model copy the prompt's
    layout or worked example, which earns them with no arithmetic at all (BENCHMARKS.md §1b, runs A–H); gated by the
    answer, a copy earns nothing and the format is learned only on completions that are right.
    """
    texts = _texts(completions)
    return [v if lenient_match(t, str(a)) else 0.0 for v, t, a in zip(_layout(texts), texts, answer, strict=True)]


def grounded_format_reward_func(completions: Sequence[Any], question: Sequence[str], **kwargs: Any) -> list[float]:
    """The notebook's three format rewards summed (at most 1.5), paid only when the reasoning mentions every number
    of the question.

    Not one of the notebook's five. A copy of the prompt's layout or worked example holds the example's numbers, not
    the question's, so it earns nothing; unlike :func:`format_when_right_reward_func` a wrong answer in the format
    is still paid, which keeps a format signal for a model that is rarely right. The reasoning is what follows
    ``<reasoning>`` up to ``</reasoning>`` (the whole completion without the tag): numbers restated before the tag
    do not count, or a model learns to restate the question and then copy the example (run P, BENCHMARKS.md §1b).
    SmolLM2-135M still earned it by echoing the prompt's "inside <reasoning>" and learned no format (runs Q–T).
    """
    texts = _texts(completions)
    grounded = [_numbers(str(q)) <= _numbers(_reasoning_part(t)) for q, t in zip(question, texts, strict=True)]
    return [v if g else 0.0 for v, g in zip(_layout(texts), grounded, strict=True)]


def _reasoning_part(text: str) -> str:
    start = text.find("<reasoning>")
    if start < 0:
        return text
    end = text.find("</reasoning>", start)
    return text[start : end if end >= 0 else len(text)]


def _layout(texts: list[str]) -> list[float]:
    soft, strict = soft_format_reward_func(texts), strict_format_reward_func(texts)
    return [count_xml(t) + a + b for t, a, b in zip(texts, soft, strict, strict=True)]


def _numbers(text: str) -> set[Fraction]:
    """Magnitudes (in ``28 - 15`` the number is 15, not -15), a list's commas dropped (``24, 4``)."""
    values = (parse_number(m.rstrip(",")) for m in _NUMBER.findall(text))
    return {abs(v) for v in values if v is not None}


def int_reward_func(completions: Sequence[Any], *, strict_seed_semantics: bool = False, **kwargs: Any) -> list[float]:
    """0.5 when the extracted answer is an integer (negative and ``1,000``-style included, unless seed semantics)."""
    answers = [extract_xml_answer(t) for t in _texts(completions)]
    if strict_seed_semantics:
        return [0.5 if a.isdigit() else 0.0 for a in answers]
    return [0.5 if _INTEGER.fullmatch(a) else 0.0 for a in answers]


def _format_reward(pattern: str, completions: Sequence[Any], strict_seed_semantics: bool) -> list[float]:
    flags = 0 if strict_seed_semantics else re.DOTALL
    return [0.5 if re.match(pattern, t, flags) else 0.0 for t in _texts(completions)]


def strict_format_reward_func(
    completions: Sequence[Any], *, strict_seed_semantics: bool = False, **kwargs: Any
) -> list[float]:
    """0.5 for exactly ``<reasoning>\\n…\\n</reasoning>\\n<answer>\\n…\\n</answer>\\n`` (multi-line bodies allowed)."""
    return _format_reward(_STRICT_FORMAT, completions, strict_seed_semantics)


def soft_format_reward_func(
    completions: Sequence[Any], *, strict_seed_semantics: bool = False, **kwargs: Any
) -> list[float]:
    """0.5 when the completion starts with ``<reasoning>…</reasoning>`` followed by ``<answer>…</answer>``."""
    return _format_reward(_SOFT_FORMAT, completions, strict_seed_semantics)


def count_xml(text: str, *, strict_seed_semantics: bool = False) -> float:
    """0.125 per tag that appears exactly once, minus 0.001 per character after the closing answer tag."""
    count = 0.0
    if text.count("<reasoning>\n") == 1:
        count += 0.125
    if text.count("\n</reasoning>\n") == 1:
        count += 0.125
    if text.count("\n<answer>\n") == 1:
        count += 0.125
        if strict_seed_semantics:
            count -= len(text.split("\n</answer>\n")[-1]) * 0.001
    if text.count("\n</answer>") == 1:
        count += 0.125
        trailing = len(text.split("\n</answer>")[-1])
        if strict_seed_semantics:
            count -= (trailing - 1) * 0.001
        else:
            count -= max(trailing - 1, 0) * 0.001  # one newline after the tag is part of the format
    return count


def xmlcount_reward_func(
    completions: Sequence[Any], *, strict_seed_semantics: bool = False, **kwargs: Any
) -> list[float]:
    """Dense format reward: partial credit for each XML tag (see :func:`count_xml`)."""
    return [count_xml(t, strict_seed_semantics=strict_seed_semantics) for t in _texts(completions)]


def soft_overlong_punishment(
    completion_ids: Sequence[Sequence[int]],
    *,
    max_completion_len: int,
    soft_cache_len: int | None = None,
    **kwargs: Any,
) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al., 2025, arXiv:2503.14476, Eq. 13), TRL's
    ``get_soft_overlong_punishment`` as a named function: 0 up to ``L_max − L_cache`` tokens, then falling linearly
    to −1 at ``L_max`` (a completion cut at the token limit gets −1). Training passes ``max_completion_len`` =
    ``sampling.max_tokens``; ``soft_cache_len`` (L_cache) comes from ``rewards.kwargs`` and defaults to a fifth
    of ``L_max`` (DAPO: 4,096 of 20,480 tokens).
    """
    cache = max_completion_len // 5 if soft_cache_len is None else soft_cache_len
    free = max_completion_len - cache  # lengths up to here are not punished
    values = []
    for ids in completion_ids:
        length = len(ids)
        if length <= free:
            values.append(0.0)
        elif length <= max_completion_len:
            values.append((free - length) / cache)
        else:
            values.append(-1.0)
    return values


NOTEBOOK_REWARDS: tuple[RewardFunc, ...] = (
    xmlcount_reward_func,
    soft_format_reward_func,
    strict_format_reward_func,
    int_reward_func,
    correctness_reward_func,
)
"""The notebook's five reward functions, in its order."""


class RewardError(ValueError):
    """A reward function failed or returned something unusable; the message names the function."""


def reward_name(fn: RewardFunc) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


@dataclass
class RewardBreakdown:
    """Weighted total reward per completion, and each function's unweighted values for logging.

    NaN marks "not applicable": in ``per_function`` where that function returned None, in ``total`` where every
    function did. ``metrics`` and ``extra`` hold what the functions logged through TRL's ``log_metric`` and
    ``log_extra`` hooks.
    """

    total: list[float]
    per_function: dict[str, list[float]]
    metrics: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, list[Any]] = field(default_factory=dict)

    @staticmethod
    def from_groups(parts: Sequence[RewardBreakdown], chosen: Sequence[tuple[int, int]], group_size: int):
        """Group ``g`` of ``parts[p]`` for each ``(p, g)`` in ``chosen``; logged metrics of every part are kept."""
        rows = [(p, g * group_size + i) for p, g in chosen for i in range(group_size)]
        pick = lambda values_of: [values_of(parts[p])[i] for p, i in rows]  # noqa: E731
        metrics: dict[str, list[float]] = {}
        for part in parts:
            for name, values in part.metrics.items():
                metrics.setdefault(name, []).extend(values)
        columns = {c for part in parts for c in part.extra}
        extra = {c: [_at(parts[p].extra.get(c, []), i) for p, i in rows] for c in sorted(columns)}
        return RewardBreakdown(
            total=pick(lambda part: part.total),
            per_function={name: pick(lambda part, n=name: part.per_function[n]) for name in parts[0].per_function},
            metrics=metrics,
            extra=extra,
        )


def _at(values: Sequence[Any], i: int) -> Any:
    return values[i] if i < len(values) else None


@dataclass
class RewardState:
    """What reward functions get as ``trainer_state`` (the fields of TRL's TrainerState they use to shape rewards
    by training progress)."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0


def combine_rewards(
    funcs: Sequence[RewardFunc],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    weights: Sequence[float] | None = None,
    on_error: str = "raise",
    completion_ids: Sequence[Sequence[int]] | None = None,
    trainer_state: Any = None,
    **columns: Any,
) -> RewardBreakdown:
    """Call every reward function TRL-style and sum their values with ``weights`` (default all 1).

    ``columns`` are the dataset columns, one value per completion (e.g. ``answer``), plus any extra
    keyword the functions accept. Each function also gets ``completion_ids`` (when given), ``trainer_state``
    and the ``log_extra`` / ``log_metric`` hooks, as in TRL 1.16; ``async`` functions run concurrently. A value
    of None (or NaN) means "not applicable" and is summed as missing (NaN-ignoring sum; NaN only if every function
    returned None). A function that raises, returns the wrong number of values or an infinite value raises
    :class:`RewardError` naming it; with ``on_error="zero"`` those values become 0 and a warning is emitted instead.
    """
    if on_error not in ("raise", "zero"):
        raise ValueError(f"on_error must be 'raise' or 'zero', got {on_error!r}")
    weights = [1.0] * len(funcs) if weights is None else list(weights)
    if len(weights) != len(funcs):
        raise ValueError(f"{len(weights)} reward weights for {len(funcs)} reward functions")
    n = len(completions)
    out = RewardBreakdown(total=[], per_function={})
    kwargs = dict(columns, trainer_state=trainer_state, log_extra=_log_extra(out), log_metric=_log_metric(out))
    if completion_ids is not None:
        kwargs["completion_ids"] = completion_ids
    raw = _call_all(funcs, prompts, completions, kwargs)
    for fn, result in zip(funcs, raw, strict=False):
        out.per_function[reward_name(fn)] = _values(reward_name(fn), result, n, on_error)
    for i in range(n):
        row = [
            w * values[i]
            for w, values in zip(weights, out.per_function.values(), strict=False)
            if not math.isnan(values[i])
        ]
        out.total.append(math.fsum(row) if row else math.nan)
    return out


def _log_extra(out: RewardBreakdown) -> Callable[[str, list], None]:
    def log_extra(column: str, values: list) -> None:
        """Add a column (one value per completion) to the logged sample table."""
        out.extra.setdefault(column, []).extend(values)

    return log_extra


def _log_metric(out: RewardBreakdown) -> Callable[[str, float], None]:
    def log_metric(name: str, value: float) -> None:
        """Log a scalar (averaged over the calls of one step) as ``train/<name>``."""
        out.metrics.setdefault(name, []).append(float(value))

    return log_metric


def is_async_reward(fn: RewardFunc) -> bool:
    """Whether calling ``fn`` returns a coroutine: an ``async def``, or a callable object with an async ``__call__``."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(fn.__call__)


def _call_all(funcs: Sequence[RewardFunc], prompts, completions, kwargs: dict) -> list[Any]:
    """Each function's raw result, or the exception it raised; async functions run together on one event loop."""
    results: list[Any] = [None] * len(funcs)
    pending = []
    for i, fn in enumerate(funcs):
        if is_async_reward(fn):
            pending.append(i)
            continue
        try:
            results[i] = fn(prompts=prompts, completions=completions, **kwargs)
        except Exception as err:  # a user's reward function may raise anything
            results[i] = err
    if pending:
        gathered = _run_coroutines([funcs[i](prompts=prompts, completions=completions, **kwargs) for i in pending])
        for i, result in zip(pending, gathered, strict=False):
            results[i] = result
    return results


def _run_coroutines(coroutines: list) -> list[Any]:
    async def gather():
        return await asyncio.gather(*coroutines, return_exceptions=True)

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # the usual case: no loop runs in this thread
        return asyncio.run(gather())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # called from inside a loop (a notebook): use another thread
        return pool.submit(asyncio.run, gather()).result()


def score_groups(
    funcs: Sequence[RewardFunc],
    prompts: Sequence[Any],
    texts: Sequence[str],
    group_size: int,
    *,
    columns: dict[str, Sequence[Any]],
    weights: Sequence[float] | None = None,
    on_error: str = "raise",
    **options: Any,
) -> RewardBreakdown:
    """Rewards of B groups of G completions, with TRL's calling convention.

    ``prompts`` (B conversations) and each dataset column (B values) are repeated once per completion;
    completions are passed as conversational messages, as TRL does for chat prompts. ``options`` reach
    :func:`combine_rewards` as they are: ``completion_ids`` (N token lists), ``trainer_state``, or any keyword.
    """
    repeat = lambda column: [v for v in column for _ in range(group_size)]  # noqa: E731
    completions = [[{"role": "assistant", "content": text}] for text in texts]
    repeated = {name: repeat(values) for name, values in columns.items()}
    return combine_rewards(
        funcs, repeat(prompts), completions, weights=weights, on_error=on_error, **repeated, **options
    )


def _values(name: str, raw: Any, n: int, on_error: str) -> list[float]:
    """One function's result as n floats (None → NaN, "not applicable"), or its failure raised or scored 0."""
    if isinstance(raw, BaseException):
        return _failed(name, f"raised {type(raw).__name__}: {raw}", n, on_error, raw)
    try:
        values = [math.nan if v is None else float(v) for v in raw]
    except (TypeError, ValueError) as err:
        what = f"must return a list of numbers or None, got {type(raw).__name__}"
        raise RewardError(f"reward function {name!r} {what}") from err
    if len(values) != n:
        return _failed(name, f"returned {len(values)} values for {n} completions", n, on_error)
    bad = [i for i, v in enumerate(values) if math.isinf(v)]
    if bad:
        if on_error == "raise":
            raise RewardError(f"reward function {name!r} returned non-finite values at completions {bad[:10]}")
        warnings.warn(f"reward function {name!r} returned non-finite values at {bad[:10]}; scoring 0", stacklevel=4)
        values = [0.0 if math.isinf(v) else v for v in values]
    return values


def _failed(name: str, what: str, n: int, on_error: str, cause: BaseException | None = None) -> list[float]:
    if on_error == "raise":
        raise RewardError(f"reward function {name!r} {what}") from cause
    warnings.warn(f"reward function {name!r} {what}; scoring 0", stacklevel=4)
    return [0.0] * n


EXTRA_REWARDS = (
    last_number_reward_func,
    format_when_right_reward_func,
    grounded_format_reward_func,
    soft_overlong_punishment,
)
"""Reward functions of this module beyond the notebook's five (:func:`resolve_reward` resolves them by name)."""


def resolve_reward(spec: str | RewardFunc) -> RewardFunc:
    """A reward function from a name in this module or an import path ``package.module:function``."""
    if callable(spec):
        return spec
    import importlib

    module_name, _, attr = spec.rpartition(":") if ":" in spec else (__name__, "", spec)
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise RewardError(
            f"unknown reward function {spec!r}: use one of "
            f"{[reward_name(f) for f in (*NOTEBOOK_REWARDS, *EXTRA_REWARDS)]} or an import path "
            "'package.module:function'"
        ) from err
    if not callable(fn):
        raise RewardError(f"reward {spec!r} is not callable")
    return fn
