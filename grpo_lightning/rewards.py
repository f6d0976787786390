"""The OneShotGRPO notebook's answer parsing and reward functions, with its defects fixed.

Strings in, floats out: no torch, no project imports. Every reward follows TRL's GRPOTrainer calling
convention, so reward functions written for TRL work here unchanged and ours work in TRL:

    fn(prompts, completions, answer, **kwargs) -> list[float]   # one float per completion

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

import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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

RewardFunc = Callable[..., list[float]]

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


def xmlcount_reward_func(completions: Sequence[Any], *, strict_seed_semantics: bool = False, **kwargs: Any) -> list[float]:
    """Dense format reward: partial credit for each XML tag (see :func:`count_xml`)."""
    return [count_xml(t, strict_seed_semantics=strict_seed_semantics) for t in _texts(completions)]


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
    """Weighted total reward per completion, and each function's unweighted values for logging."""

    total: list[float]
    per_function: dict[str, list[float]]


def combine_rewards(
    funcs: Sequence[RewardFunc],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    weights: Sequence[float] | None = None,
    on_error: str = "raise",
    **columns: Any,
) -> RewardBreakdown:
    """Call every reward function TRL-style and sum their values with ``weights`` (default all 1).

    ``columns`` are the dataset columns, one value per completion (e.g. ``answer``), plus any extra
    keyword the functions accept. A function that raises, returns the wrong number of values or a
    non-finite value raises :class:`RewardError` naming it; with ``on_error="zero"`` those values become
    0 and a warning is emitted instead.
    """
    if on_error not in ("raise", "zero"):
        raise ValueError(f"on_error must be 'raise' or 'zero', got {on_error!r}")
    weights = [1.0] * len(funcs) if weights is None else list(weights)
    if len(weights) != len(funcs):
        raise ValueError(f"{len(weights)} reward weights for {len(funcs)} reward functions")
    n = len(completions)
    total = [0.0] * n
    per_function: dict[str, list[float]] = {}
    for fn, weight in zip(funcs, weights):
        values = _call_reward(fn, prompts, completions, n, on_error, columns)
        per_function[reward_name(fn)] = values
        total = [t + weight * v for t, v in zip(total, values)]
    return RewardBreakdown(total=total, per_function=per_function)


def _call_reward(
    fn: RewardFunc, prompts: Sequence[Any], completions: Sequence[Any], n: int, on_error: str, columns: dict
) -> list[float]:
    name = reward_name(fn)
    try:
        raw = fn(prompts=prompts, completions=completions, **columns)
    except Exception as err:  # a user's reward function may raise anything
        if on_error == "raise":
            raise RewardError(f"reward function {name!r} raised {type(err).__name__}: {err}") from err
        warnings.warn(f"reward function {name!r} raised {type(err).__name__}: {err}; scoring 0", stacklevel=3)
        return [0.0] * n
    try:
        values = [float(v) if v is not None else math.nan for v in raw]
    except (TypeError, ValueError) as err:
        raise RewardError(f"reward function {name!r} must return a list of numbers, got {type(raw).__name__}") from err
    if len(values) != n:
        if on_error == "raise":
            raise RewardError(f"reward function {name!r} returned {len(values)} values for {n} completions")
        warnings.warn(f"reward function {name!r} returned {len(values)} values for {n} completions; scoring 0", stacklevel=3)
        return [0.0] * n
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        if on_error == "raise":
            raise RewardError(f"reward function {name!r} returned non-finite values at completions {bad[:10]}")
        warnings.warn(f"reward function {name!r} returned non-finite values at {bad[:10]}; scoring them 0", stacklevel=3)
        values = [0.0 if not math.isfinite(v) else v for v in values]
    return values


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
            f"{[reward_name(f) for f in NOTEBOOK_REWARDS]} or an import path 'package.module:function'"
        ) from err
    if not callable(fn):
        raise RewardError(f"reward {spec!r} is not callable")
    return fn
