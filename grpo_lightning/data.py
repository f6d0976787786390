"""GSM8K problems and prompts, without Lightning (:mod:`grpo_lightning.datamodule` serves them to the Trainer).

A row is ``{"question": str, "answer": str}`` where the answer ends with ``#### <number>`` (GSM8K's
format). Rows come from the Hub (``openai/gsm8k``, config ``main``), a local JSONL/Parquet file with the
same fields, or a seeded synthetic generator for offline demos. Each becomes a :class:`Problem` whose
``answer`` is the reference number (``extract_hash_answer``) the reward functions compare against.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from grpo_lightning.config import OnLongPrompt, PromptConfig
from grpo_lightning.rewards import extract_hash_answer

OnBadRow = Literal["skip", "raise"]
SYNTHETIC = "synthetic"
HUB_OFFLINE_HELP = (
    "The Hugging Face Hub is unreachable (or HF_HUB_OFFLINE=1 is set). Pass a local path instead "
    "(e.g. ../shared/data/gsm8k/train.jsonl or a downloaded folder), or unset HF_HUB_OFFLINE when online."
)


@dataclass(frozen=True)
class Problem:
    """One question with its reference answer (the number after ``####``)."""

    question: str
    answer: str
    index: int


class DataError(ValueError):
    """Unusable input data; the message names the file and row."""


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
"""File types ``load_rows`` reads (JSON: one object per line)."""


def load_rows(source: str, split: str = "train") -> list[dict[str, Any]]:
    """Rows from a local ``.jsonl``/``.json``/``.parquet`` file, a folder holding a split's files (a downloaded
    dataset: ``test.jsonl``, or ``main/test-00000-of-00001.parquet``), or a Hub dataset name (config ``main``).

    A name that can only be a path (``./x``, ``data/train`` where ``data/`` exists, ``x.jsonl``) that does not exist
    fails at once with "no such file or folder" rather than after a minute of Hub retries.
    """
    from grpo_lightning.export import looks_like_path

    path = Path(source).expanduser()
    if path.is_dir():
        return [row for file in _split_files(path, split) for row in _load_local(file)]
    if looks_like_path(source, (*DATA_SUFFIXES, ".csv", ".tsv", ".txt", ".arrow")):
        return _load_local(path)
    try:
        import datasets

        return [dict(row) for row in datasets.load_dataset(source, "main", split=split)]
    except Exception as err:
        if _is_offline_error(err):
            raise DataError(f"cannot load dataset {source!r} (split {split!r}): no such file or folder here, and not "
                            f"from the Hub. {HUB_OFFLINE_HELP}") from err  # fmt: skip
        raise


def _split_files(folder: Path, split: str) -> list[Path]:
    """The files of ``split`` in a dataset folder (two levels deep), GSM8K's ``main`` configuration first."""
    names = [f"{split}{suffix}" for suffix in DATA_SUFFIXES] + [f"{split}-*{suffix}" for suffix in DATA_SUFFIXES]
    files = sorted({p for name in names for p in [*folder.glob(name), *folder.glob(f"[!.]*/{name}")] if p.is_file()})
    configs = sorted({p.parent for p in files})
    if len(configs) > 1:
        files = [p for p in files if p.parent.name == "main"] or files
        configs = sorted({p.parent for p in files})
    if len(configs) > 1:
        shown = ", ".join(str(c.relative_to(folder)) for c in configs)
        raise DataError(f"data folder {str(folder)!r} holds {split!r} files in several folders ({shown}): pass one")
    if not files:
        raise DataError(
            f"{str(folder)!r} is a folder without {split!r} data: pass a .jsonl, .json or .parquet file, or a folder "
            f"holding {split}.jsonl or {split}-*.parquet (a downloaded dataset such as openai/gsm8k's main/ folder)"
        )
    return files


def _is_offline_error(err: Exception) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return any(word in text for word in ("offline", "connection", "resolve", "couldn't reach", "network", "timed out"))


def _load_local(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist (no such file or folder)")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {line_no} is not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {line_no} is a JSON {type(row).__name__}, expected an object")
            rows.append(row)
    return rows


def to_problems(
    rows: Iterable[dict[str, Any]], *, on_bad_row: OnBadRow = "skip", source: str = "data"
) -> list[Problem]:
    """Keep rows with a non-empty question and a ``####`` answer; report the others by row index.

    ``on_bad_row="skip"`` warns once with every bad row's index; ``"raise"`` stops at the first one.
    """
    problems, bad = [], []
    for index, row in enumerate(rows):
        question = row.get("question") if isinstance(row, dict) else None
        answer_text = row.get("answer") if isinstance(row, dict) else None
        reason = None
        if not isinstance(question, str) or not question.strip():
            reason = "missing or empty 'question'"
        elif not isinstance(answer_text, str) or extract_hash_answer(answer_text) in (None, ""):
            reason = "'answer' has no '#### <number>'"
        if reason:
            if on_bad_row == "raise":
                raise DataError(f"{source}: row {index}: {reason}")
            bad.append((index, reason))
            continue
        problems.append(Problem(question=question.strip(), answer=extract_hash_answer(answer_text), index=index))
    if bad:
        shown = ", ".join(f"row {i} ({r})" for i, r in bad[:20])
        warnings.warn(f"{source}: skipped {len(bad)} bad rows: {shown}{' …' if len(bad) > 20 else ''}", stacklevel=2)
    if not problems:
        raise DataError(f"{source}: no usable rows (need 'question' and an 'answer' ending with '#### <number>')")
    return problems


_NAMES = ("Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo")
_ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "shells")


def synthetic_rows(n: int, seed: int = 0, max_value: int = 20, operations: int = 1) -> list[dict[str, str]]:
    """``n`` GSM8K-style word problems with integer answers, deterministic for a seed (offline demos).

    ``operations=1``: one addition, subtraction or multiplication. ``operations=2``: half of the problems chain two
    of them (e.g. buy, then give away).
    """
    if operations not in (1, 2):
        raise ValueError(f"synthetic problems have 1 or 2 operations, got {operations}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        a, b = rng.randint(1, max_value), rng.randint(1, max_value)
        kind = rng.randrange(3 * operations)
        if kind == 0:
            q, steps, ans = (
                f"{name} has {a} {item} and finds {b} more. How many {item} does {name} have now?",
                f"{a}+{b}",
                a + b,
            )
        elif kind == 1:
            a, b = max(a, b), min(a, b)
            q, steps, ans = f"{name} had {a} {item} and gave away {b}. How many {item} are left?", f"{a}-{b}", a - b
        elif kind == 2:
            q, steps, ans = f"{name} buys {a} bags with {b} {item} in each. How many {item} is that?", f"{a}*{b}", a * b
        else:
            c = rng.randint(1, max_value)
            if kind == 3:
                a, c = a + c, c  # never negative
                q = f"{name} has {a} {item}, finds {b} more and then gives {c} to a friend. How many {item} does {name} have now?"
                steps, ans = f"{a}+{b}-{c}", a + b - c
            elif kind == 4:
                q = f"{name} buys {a} bags with {b} {item} in each and already had {c}. How many {item} does {name} have?"
                steps, ans = f"{a}*{b}+{c}", a * b + c
            else:
                q = f"{name} and a friend each have {a} {item}, and each finds {b} more. How many {item} do they have together?"
                steps, ans = f"2*({a}+{b})", 2 * (a + b)
        rows.append({"question": q, "answer": f"{steps} = <<{steps}={ans}>>{ans}\n#### {ans}"})
    return rows


def prompt_messages(question: str, style: PromptConfig = PromptConfig()) -> list[dict[str, str]]:  # noqa: B008
    """The conversation a question becomes: the system prompt, then the question as the user turn."""
    user = style.user_template.replace("{question}", question)
    return [{"role": "system", "content": style.system_prompt}, {"role": "user", "content": user}]


def encode_prompt(
    tokenizer: Any,
    question: str,
    *,
    style: PromptConfig = PromptConfig(),  # noqa: B008
    max_prompt_length: int | None = None,
    on_long_prompt: OnLongPrompt = "truncate",
) -> list[int]:
    """Token ids of the chat-templated prompt, ending with the assistant turn's header.

    A prompt longer than ``max_prompt_length`` keeps its last tokens (the question's end and the
    assistant header, which generation needs) with a warning, or raises with ``on_long_prompt="raise"``.
    """
    ids = tokenizer.apply_chat_template(
        prompt_messages(question, style), add_generation_prompt=True, tokenize=True, return_dict=False
    )
    ids = list(ids)
    if max_prompt_length and len(ids) > max_prompt_length:
        message = f"prompt of {len(ids)} tokens exceeds max_prompt_length={max_prompt_length}: {question[:60]!r}…"
        if on_long_prompt == "raise":
            raise DataError(message)
        warnings.warn(message + " (left-truncated)", stacklevel=2)
        ids = ids[-max_prompt_length:]
    return ids


class ProblemDataset(Dataset):
    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, i: int) -> Problem:
        return self.problems[i]


class ResumableSampler(DistributedSampler):
    """Problem order fixed by ``(seed, epoch)``, so a resumed run sees exactly the uninterrupted run's order.

    With ``num_replicas`` processes, process ``rank`` takes every ``num_replicas``-th problem of that one
    global order: the union of the processes' batches is the batch a single process would train on with
    ``num_replicas`` times the batch size. (A ``DistributedSampler``, so Lightning does not wrap it again.)
    Lightning calls :meth:`set_epoch` at every epoch start; after a restart, :meth:`resume_at` makes the
    first pass over that epoch skip the problems already trained on by all processes.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.size = size
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, consumed: int) -> None:
        """Start ``epoch`` after its first ``consumed`` problems (counted over all processes)."""
        self.epoch, self._resume = epoch, (epoch, consumed)

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.size))
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start, self._resume = self._resume[1], None
        order = order[start:]
        usable = len(order) - len(order) % self.num_replicas  # every process gets the same number of problems
        return iter(order[self.rank : usable : self.num_replicas])

    def __len__(self) -> int:
        return self.size // self.num_replicas


def collate_problems(problems: list[Problem]) -> dict[str, list]:
    """A batch is columns, as TRL passes them to reward functions."""
    return {
        "question": [p.question for p in problems],
        "answer": [p.answer for p in problems],
        "index": [p.index for p in problems],
    }
