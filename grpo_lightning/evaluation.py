"""GSM8K evaluation: greedy answers through a rollout engine, graded as in training.

The prompt (system prompt + chat template) and the answer extraction are the ones training uses, so a
base model and a trained one are compared on equal terms. Each completion gets five grades:

- ``strict_correct``: it has an ``<answer>`` tag and the text inside equals the reference numerically;
- ``lenient_correct``: the last number anywhere in the completion equals the reference;
- ``strict_format`` / ``soft_format``: the notebook's two format checks (multi-line fix applied);
- ``notebook_strict_format``: the notebook's strict check exactly as it runs there (no ``re.DOTALL``: the reasoning
  must be one line);

and two signs of collapse: ``reasoning_tokens`` and ``reasoning_copied`` (the reasoning is empty or a placeholder
copied from the prompt's instructions, such as ``...``).
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from grpo_lightning.config import PromptConfig
from grpo_lightning.data import Problem, encode_prompt
from grpo_lightning.export import write_json, write_jsonl
from grpo_lightning.rewards import (
    answers_match,
    extract_xml_answer,
    lenient_match,
    soft_format_reward_func,
    strict_format_reward_func,
)
from grpo_lightning.rollout import RolloutEngine, SamplingConfig

PROBLEM_METRICS = {  # metric → the per-problem value of a graded record it averages; one name everywhere
    "strict_accuracy": "strict_correct", "lenient_accuracy": "lenient_correct", "strict_format_rate": "strict_format",
    "soft_format_rate": "soft_format", "notebook_strict_format_rate": "notebook_strict_format",
    "completion_length": "completion_tokens", "reasoning_length": "reasoning_tokens",
    "reasoning_copied_rate": "reasoning_copied",
}  # fmt: skip
"""What ``grpo evaluate`` summarises and validation logs (``val/strict_accuracy``, …), from the same records."""


def problem_metrics(record: dict[str, Any]) -> dict[str, float]:
    """One graded record's value of each metric in :data:`PROBLEM_METRICS`."""
    return {name: float(record[field]) for name, field in PROBLEM_METRICS.items()}


@dataclass
class Grade:
    """How one completion scores against its reference answer."""

    answer: str | None
    """Text inside the last <answer> tag (None without a tag)."""
    strict_correct: bool
    lenient_correct: bool
    strict_format: bool
    soft_format: bool
    notebook_strict_format: bool
    """The notebook's strict pattern as it runs there, without ``re.DOTALL``: one-line reasoning only."""
    reasoning: str | None
    """Text inside the first <reasoning> tag (None without one)."""
    reasoning_copied: bool
    """The reasoning is empty or copied from the prompt's instructions (a placeholder such as "...", a sentence of a
    worked example): a collapse sign (:func:`copied_from`)."""


def grade(completion: str, reference: str, instructions: str = "") -> Grade:
    """How ``completion`` scores; ``instructions`` (system prompt and user template) is where placeholders come from."""
    answer = extract_xml_answer(completion) if "<answer>" in completion else None
    reasoning = reasoning_text(completion)
    return Grade(
        answer=answer,
        strict_correct=answer is not None and answers_match(answer, reference),
        lenient_correct=lenient_match(completion, reference),
        strict_format=strict_format_reward_func([completion])[0] > 0,
        soft_format=soft_format_reward_func([completion])[0] > 0,
        notebook_strict_format=strict_format_reward_func([completion], strict_seed_semantics=True)[0] > 0,
        reasoning=reasoning,
        reasoning_copied=reasoning is not None and copied_from(reasoning, instructions),
    )


COPIED_CHARS = 30
"""A run of this many characters shared with the instructions is copied, not a coincidence (a worked example's
sentence, a placeholder line); the instructions hold no question, so real reasoning shares far less."""


def copied_from(reasoning: str, instructions: str) -> bool:
    """``reasoning`` is empty, is part of ``instructions``, or shares ≥ 30 consecutive characters with them."""
    if not reasoning or reasoning in instructions:
        return True
    match = difflib.SequenceMatcher(None, reasoning, instructions, autojunk=False)
    return match.find_longest_match(0, len(reasoning), 0, len(instructions)).size >= COPIED_CHARS


def reasoning_text(completion: str) -> str | None:
    """The stripped text between the first ``<reasoning>`` and the next ``</reasoning>`` (None without both tags)."""
    start = completion.find("<reasoning>")
    end = completion.find("</reasoning>", start + 1)
    if start < 0 or end < 0:
        return None
    return completion[start + len("<reasoning>") : end].strip()


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean of each metric over per-problem records (as :func:`evaluate` returns them)."""
    values = [problem_metrics(r) for r in records]
    return {name: sum(v[name] for v in values) / max(1, len(values)) for name in PROBLEM_METRICS}


def evaluate(
    engine: RolloutEngine,
    tokenizer: Any,
    problems: Sequence[Problem],
    *,
    max_tokens: int = 200,
    batch_size: int = 64,
    max_prompt_length: int | None = None,
    style: PromptConfig = PromptConfig(),  # noqa: B008
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Greedy completions for ``problems`` in batches, one graded record per problem."""
    from tqdm.auto import tqdm

    sampling = SamplingConfig(temperature=0.0, max_tokens=max_tokens)
    instructions = style.system_prompt + "\n" + style.user_template
    records = []
    with tqdm(total=len(problems), desc="evaluating", unit="problem", disable=not progress) as bar:
        for start in range(0, len(problems), batch_size):
            batch = problems[start : start + batch_size]
            prompts = [
                encode_prompt(tokenizer, p.question, style=style, max_prompt_length=max_prompt_length) for p in batch
            ]
            rollout = engine.generate(prompts, n=1, sampling=sampling)
            for problem, text, ids, cut in zip(
                batch, rollout.texts, rollout.completion_ids, rollout.truncated, strict=False
            ):
                graded = grade(text, problem.answer, instructions)
                records.append(
                    {
                        "index": problem.index,
                        "question": problem.question,
                        "reference": problem.answer,
                        "completion": text,
                        **asdict(graded),
                        "completion_tokens": len(ids),
                        "reasoning_tokens": len(tokenizer.encode(graded.reasoning, add_special_tokens=False))
                        if graded.reasoning
                        else 0,
                        "truncated": cut,
                    }
                )
            bar.update(len(batch))
            bar.set_postfix(strict=f"{summarize(records)['strict_accuracy']:.3f}")
    return records


def write_results(out_dir: str | Path, records: Sequence[dict[str, Any]], **about: Any) -> dict[str, Any]:
    """``problems.jsonl`` (one record per problem) and ``summary.json`` (metrics + ``about``) in ``out_dir``."""
    out_dir = Path(out_dir)
    summary = {
        **about,
        "num_problems": len(records),
        "metrics": summarize(records),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_jsonl(out_dir / "problems.jsonl", records)
    write_json(out_dir / "summary.json", summary)
    return summary
