"""Ask a model questions: the training prompt and chat template, answers split into reasoning and answer.

Every answer is appended to a JSONL file as one line (model, question, reasoning, answer, completion,
sampling settings, timestamp), so repeated runs accumulate a dataset: with several samples per question
and a temperature above 0 it doubles as a synthetic-data generator.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grpo_lightning.config import PromptConfig
from grpo_lightning.data import encode_prompt
from grpo_lightning.rollout import RolloutEngine, SamplingConfig

_REASONING = re.compile(r"<reasoning>(.*?)(?:</reasoning>|<answer>|$)", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)


def split_completion(text: str) -> tuple[str, str | None]:
    """(reasoning, answer) of a completion; without tags the reasoning is everything before ``<answer>``.

    The answer is None when there is no ``<answer>`` tag: the model did not commit to one.
    """
    answers = _ANSWER.findall(text)
    answer = answers[-1].strip() if answers else None
    reasoning = _REASONING.search(text)
    if reasoning:
        return reasoning.group(1).strip(), answer
    return text.split("<answer>")[0].strip(), answer


def check_samples(num_samples: int, sampling: SamplingConfig) -> None:
    if num_samples < 1:
        raise ValueError(f"the number of samples per question must be ≥ 1, got {num_samples}")
    if num_samples > 1 and sampling.temperature == 0:
        raise ValueError("several samples per question need a temperature above 0 (greedy decoding repeats itself)")


def answer_questions(
    engine: RolloutEngine,
    tokenizer: Any,
    questions: Sequence[str],
    *,
    model_name: str,
    sampling: SamplingConfig,
    num_samples: int = 1,
    style: PromptConfig = PromptConfig(),  # noqa: B008
) -> list[dict[str, Any]]:
    """``num_samples`` answers per question as JSONL-ready rows, grouped by question."""
    check_samples(num_samples, sampling)
    prompts = [encode_prompt(tokenizer, q, style=style) for q in questions]
    rollout = engine.generate(prompts, n=num_samples, sampling=sampling)
    timestamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    rows = []
    for i, text in enumerate(rollout.texts):
        reasoning, answer = split_completion(text)
        rows.append(
            {
                "model": model_name,
                "question": questions[i // num_samples],
                "reasoning": reasoning,
                "answer": answer,
                "completion": text,
                "truncated": rollout.truncated[i],
                "sample": i % num_samples,
                "sampling": dataclasses.asdict(sampling),
                "timestamp": timestamp,
            }
        )
    return rows


def render(row: dict[str, Any]) -> str:
    """A row for the terminal: question, reasoning and answer in clearly separated blocks."""
    rule = lambda title: f"── {title} " + "─" * max(4, 60 - len(title))  # noqa: E731
    answer = row["answer"] if row["answer"] is not None else "(no <answer> tag in the completion)"
    sample = f" (sample {row['sample'] + 1})" if row.get("sample") else ""
    return "\n".join([rule("question" + sample), row["question"], rule("reasoning"), row["reasoning"] or "(none)",
                      rule("answer"), answer, ""])  # fmt: skip


def read_questions(path: str | Path) -> list[str]:
    """One question per non-empty line of a UTF-8 text file; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"questions file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise IsADirectoryError(
            f"questions file {str(path)!r} is a directory; pass a text file with one question per line"
        ) from None
    except PermissionError:
        raise PermissionError(f"questions file {str(path)!r} is not readable (permission denied)") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"questions file {str(path)!r} is not UTF-8 text (byte {err.start})") from None
    questions = [line.strip() for line in text.splitlines() if line.strip()]
    if not questions:
        raise ValueError(f"questions file {str(path)!r} has no questions (one per line expected)")
    return questions
