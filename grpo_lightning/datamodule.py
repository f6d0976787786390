"""The LightningDataModule that serves GSM8K (or synthetic) problems: B prompts per training step in a resumable
seeded order, and held-out problems for validation and test. Rows, problems and prompts: :mod:`grpo_lightning.data`."""

from __future__ import annotations

import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader

from grpo_lightning.data import (
    SYNTHETIC,
    DataError,
    OnBadRow,
    Problem,
    ProblemDataset,
    ResumableSampler,
    collate_problems,
    load_rows,
    synthetic_rows,
    to_problems,
)


class GSM8KDataModule(L.LightningDataModule):
    """GSM8K (or synthetic) problems: ``batch_size`` prompts per training step, shuffled with a seed, and
    held-out problems for validation during ``fit`` and for ``validate``/``test``."""

    def __init__(
        self,
        source: str = "openai/gsm8k",
        split: str = "train",
        batch_size: int = 4,
        limit: int | None = None,
        synthetic_size: int = 512,
        synthetic_operations: int = 1,
        seed: int = 0,
        on_bad_row: OnBadRow = "skip",
        shuffle: bool = True,
        num_workers: int = 0,
        eval_source: str | None = None,
        eval_split: str = "test",
        val_size: int = 0,
        test_size: int | None = None,
        eval_batch_size: int = 64,
    ) -> None:
        """
        Args:
            source: Hub dataset name, local .jsonl/.parquet file or a folder of them per split, or "synthetic".
            split: Split to read from a Hub dataset ("train" or "test").
            batch_size: Prompts per training step and process (B); each gets G completions. Global batch: B × processes.
            limit: Use only the first `limit` problems (None: all).
            synthetic_size: Number of generated problems when source is "synthetic".
            synthetic_operations: Synthetic problems need 1 arithmetic operation, or (2) one or two.
            seed: Seed of the shuffling order (and of synthetic problems).
            on_bad_row: Rows without a question or '####' answer are skipped with a warning, or raise.
            shuffle: Shuffle the problems each epoch.
            num_workers: DataLoader worker processes.
            eval_source: Problems for validation and test: Hub name (read at eval_split), file or "synthetic" (None: unseen synthetic problems for a synthetic source, else the last val_size problems of source, removed from training).
            eval_split: Split of a Hub eval_source.
            val_size: Problems evaluated at each validation during fit (0: no validation); the interval is trainer.val_check_interval.
            test_size: Problems evaluated by `test` (None: all of eval_source).
            eval_batch_size: Prompts per generate call during validation and test.
        """
        super().__init__()
        # Resuming mid-epoch is handled by ResumableSampler; Lightning's generic warning does not apply.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be ≥ 1, got {batch_size}")
        if val_size < 0 or eval_batch_size < 1:
            raise ValueError(
                f"data.val_size must be ≥ 0 and data.eval_batch_size ≥ 1, got {val_size}/{eval_batch_size}"
            )
        self.save_hyperparameters()
        self.problems: list[Problem] = []
        self.eval_problems: list[Problem] = []

    def setup(self, stage: str | None = None) -> None:
        if self.problems:
            return
        hp = self.hparams
        problems = self._load(hp.source, hp.split, hp.synthetic_size, hp.seed)
        problems = problems[: hp.limit] if hp.limit else problems
        if hp.eval_source is not None:
            self.eval_problems = self._load(
                hp.eval_source, hp.eval_split, max(hp.val_size, hp.test_size or 0, 1), hp.seed + 1
            )
        elif hp.source == SYNTHETIC:
            self.eval_problems = self._unseen_synthetic(problems, max(hp.val_size, hp.test_size or 0))
        elif hp.val_size:
            if hp.val_size >= len(problems):
                raise DataError(f"data.val_size={hp.val_size} leaves no training problems out of {len(problems)}")
            problems, self.eval_problems = problems[: -hp.val_size], problems[-hp.val_size :]
        self.problems = problems

    def _load(self, source: str, split: str, synthetic_size: int, seed: int) -> list[Problem]:
        if source == SYNTHETIC:
            rows = synthetic_rows(synthetic_size, seed=seed, operations=self.hparams.synthetic_operations)
        else:
            rows = load_rows(source, split)
        return to_problems(rows, on_bad_row=self.hparams.on_bad_row, source=source)

    def _unseen_synthetic(self, train: list[Problem], n: int) -> list[Problem]:
        seen = {p.question for p in train}
        fresh = [p for p in self._load(SYNTHETIC, "", 4 * n + 16, self.hparams.seed + 1) if p.question not in seen]
        return fresh[:n]

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(len(self.problems), self.hparams.seed, self.hparams.shuffle, world, rank)
        if trainer is not None:  # after a restart: skip the batches this epoch already trained on
            trained = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            sampler.resume_at(trainer.current_epoch, trained * self.hparams.batch_size * world)
        return DataLoader(
            ProblemDataset(self.problems),
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            generator=torch.Generator().manual_seed(self.hparams.seed),  # workers' seeds never touch the global RNG
            collate_fn=collate_problems,
            num_workers=self.hparams.num_workers,
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader(self.hparams.val_size) if self.hparams.val_size else []

    def test_dataloader(self) -> DataLoader:
        if not self.eval_problems:
            raise DataError(
                "`test` needs problems: set data.eval_source (e.g. openai/gsm8k or a test .jsonl) or data.val_size"
            )
        return self._eval_loader(self.hparams.test_size)

    def _eval_loader(self, size: int | None) -> DataLoader:
        problems = self.eval_problems[:size] if size else self.eval_problems
        return DataLoader(
            ProblemDataset(problems), batch_size=self.hparams.eval_batch_size, collate_fn=collate_problems
        )
