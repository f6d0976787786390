"""Callbacks: Hugging Face export of the policy, and a table of sample completions.

bf16 comes from ``trainer.precision``, the cosine schedule from the module, checkpoints from Lightning's
``ModelCheckpoint`` and the learning-rate curve from ``LearningRateMonitor``: no callback of ours needed.
"""

from __future__ import annotations

import errno
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from grpo_lightning.config import plain
from grpo_lightning.distributed import all_processes, rng_state, set_rng_state
from grpo_lightning.export import (
    OutputExistsError,
    append_jsonl,
    atomic_open,
    check_replaceable,
    export_policy,
    hub_token,
    push_to_hub,
    remove_stale_temporaries,
    zip_folder,
)
from grpo_lightning.metrics import sample_rows
from grpo_lightning.models import whole_model
from grpo_lightning.preflight import preflight, sample_problems


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written beside their final name, flushed to disk, then renamed into place.

    Lightning's own writer stages in the system temp folder and *moves* the file, which is a plain copy when
    that folder is on another filesystem: a kill during the copy would leave a truncated ``last.ckpt``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        try:
            with atomic_open(path, "wb") as f:
                torch.save(checkpoint, f)
        except (OSError, RuntimeError) as err:
            if not _disk_full(err):
                raise
            free = shutil.disk_usage(Path(path).parent).free / 2**20
            error = OSError(f"could not write checkpoint {str(path)!r}: the disk is full ({free:.0f} MiB free "
                            "there). Free space or point the checkpoint dirpath elsewhere; the previous checkpoint of "
                            "that name is intact")  # fmt: skip
            error.errno = errno.ENOSPC
            raise error from err


def _disk_full(err: BaseException | None) -> bool:
    """Out of space or quota somewhere in the chain: torch's zip writer reports a failed write as "unexpected pos"."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    return False


class CheckpointsExistError(OutputExistsError):
    """A fresh run would mix its checkpoints with an earlier run's; the message says how to resume or replace them."""


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with crash-safe writes that also saves ``last.ckpt`` when training ends.

    Lightning saves on every ``every_n_train_steps`` only, so a run stopping at ``max_steps`` = 60 with
    checkpoints every 50 would otherwise resume from step 50. Files are written by :class:`AtomicCheckpointIO`.

    One run per folder: a fresh ``fit`` (no ``ckpt_path``) refuses a folder holding an earlier run's checkpoints,
    which Lightning would keep beside the new ones (its ``last.ckpt`` too, the new one becoming ``last-v1.ckpt``),
    unless ``overwrite`` (``train.py fit --overwrite``) removes them first. ``ckpt_path="last"`` resumes from the
    newest complete checkpoint, also when a kill came between a step checkpoint and ``last.ckpt``.
    """

    overwrite: bool = False
    """Remove an earlier run's checkpoints from dirpath when a fresh run starts (set by ``fit --overwrite``)."""

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # leave a user's own plugin alone
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if trainer.is_global_zero and stage == "fit":
            for leftover in remove_stale_temporaries(self.dirpath, r".+\.ckpt"):
                rank_zero_info(f"removed {leftover.name}, left by a save that was killed")

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.strategy.restore_checkpoint_after_setup:  # trainer.ckpt_path is known from here on
            self._one_run_per_folder(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.strategy.restore_checkpoint_after_setup:  # FSDP, ModelParallelStrategy: only from here on
            self._one_run_per_folder(trainer)

    def _one_run_per_folder(self, trainer: L.Trainer) -> None:
        """A fresh run (no ``ckpt_path``) needs a folder without checkpoints: refuse, or delete with ``overwrite``."""
        if trainer.ckpt_path is not None:
            return
        earlier = trainer.strategy.broadcast(self._checkpoint_files(trainer) if trainer.is_global_zero else None)
        if not earlier:
            return
        if not self.overwrite:
            more = f" and {len(earlier) - 4} more" if len(earlier) > 4 else ""
            shown = ", ".join(p.name for p in earlier[:4]) + more
            raise CheckpointsExistError(
                f"{self.dirpath} holds checkpoints of an earlier run ({shown}). Resume it with --ckpt_path last, "
                "start fresh in another folder (trainer.default_root_dir and the checkpoint dirpath), or pass "
                "--overwrite to delete them"
            )
        if trainer.is_global_zero:
            for path in earlier:
                path.unlink(missing_ok=True)
            rank_zero_warn(f"--overwrite: deleted {len(earlier)} checkpoints of an earlier run from {self.dirpath}")

    def _checkpoint_files(self, trainer: L.Trainer) -> list[Path]:
        # Lightning's private resolver: the folder its own "last" lookup searches (dirpath, or one under the logger's)
        folder = Path(self._ModelCheckpoint__resolve_ckpt_dir(trainer))
        files = folder.glob(f"*{self.FILE_EXTENSION}") if folder.is_dir() else ()
        return sorted(p for p in files if not p.name.startswith("."))  # hidden: temporaries, never checkpoints

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        """``ckpt_path="last"``: the checkpoint with the most optimizer steps, ``last.ckpt`` on a tie.

        Lightning picks the newest ``last*.ckpt`` by time, which falls a whole save interval back (to nothing on the
        first save) when a run was killed after writing a step checkpoint but before ``last.ckpt``.
        """
        candidates = super()._find_last_checkpoints(trainer) | {str(p) for p in self._checkpoint_files(trainer)}
        is_last = {path: Path(path).name.startswith(self.CHECKPOINT_NAME_LAST) for path in candidates}
        keys = {path: (_global_step(path), is_last[path]) for path in candidates}
        complete = {path: key for path, key in keys.items() if key[0] >= 0}
        return {max(complete, key=complete.get)} if complete else candidates

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def _global_step(path: str) -> int:
    """The optimizer steps a checkpoint holds, read without loading its tensors; -1 if it is unreadable."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(checkpoint.get("global_step", -1))
    except Exception:  # a file of someone else's, or damaged: never chosen for resuming
        return -1


class HFExport(L.Callback):
    """Write the policy as a ``save_pretrained`` folder (safetensors, tokenizer, generation config, model card).

    At the end of training into ``dirpath``; with ``every_checkpoint`` also at each checkpoint, into the
    sibling folder ``<dirpath>-step-<N>``. Writes are atomic: a folder is always a complete export. The
    final export can be zipped and pushed to the Hugging Face Hub; the model card then shows the last
    validation results.
    """

    def __init__(self, dirpath: str = "hf_export", every_checkpoint: bool = False, zip: bool = False,
                 push_to_hub: str | None = None, private: bool = False, adapter_only: bool = False,
                 overwrite: bool = False) -> None:  # fmt: skip
        """
        Args:
            dirpath: Folder of the final export (relative paths are under the trainer's default_root_dir).
            every_checkpoint: Also export at every checkpoint save, into <dirpath>-step-<N>.
            zip: Also write <dirpath>.zip of the final export.
            push_to_hub: Hub repository "user/name" to upload the final export to (token: HF_TOKEN or `hf auth login`).
            private: Create the Hub repository as private.
            adapter_only: LoRA runs: write the adapter alone instead of the merged model.
            overwrite: Replace dirpath even when it holds files grpo-lightning did not write (default: refuse).
        """
        self.dirpath = dirpath
        self.every_checkpoint = every_checkpoint
        self.zip = zip
        self.push_to_hub = push_to_hub
        self.private = private
        self.adapter_only = adapter_only
        self.overwrite = overwrite

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        final = self._resolve(trainer)
        check_replaceable(final, self.overwrite)  # fail now, not after hours of training
        if self.push_to_hub:
            hub_token()
        if trainer.is_global_zero:  # exports (and zips) of this folder that a kill interrupted
            remove_stale_temporaries(final.parent, re.escape(final.name) + r"(-step-\d+)?")

    def _resolve(self, trainer: L.Trainer) -> Path:
        path = Path(self.dirpath)
        return path if path.is_absolute() else Path(trainer.default_root_dir) / path

    def export(self, trainer: L.Trainer, pl_module: Any, out_dir: Path) -> Path:
        """Called on every process (sharded weights are gathered collectively); rank 0 writes."""
        # FSDP2: every process gathers its shards (a collective), rank 0 builds the whole model
        policy = (
            whole_model(pl_module.policy, pl_module.lora, keep=trainer.is_global_zero)
            if pl_module.sharded
            else pl_module.policy
        )
        if trainer.is_global_zero:
            export_policy(
                policy, pl_module.tokenizer, out_dir,
                record=training_record(trainer, pl_module), evaluation=self.validation_results(trainer), repo_id=self.push_to_hub,
                adapter_only=self.adapter_only, overwrite=self.overwrite,
            )  # fmt: skip
            rank_zero_info(f"HF export written to {out_dir}")
        return out_dir

    @staticmethod
    def validation_results(trainer: L.Trainer) -> dict[str, Any] | None:
        metrics = {
            k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")
        }
        if not metrics:
            return None
        data = getattr(trainer.datamodule, "hparams", {})
        source = data.get("eval_source") or f"held out from {data.get('source')}"
        return {"metrics": metrics, "data": source, "num_problems": data.get("val_size"), "step": trainer.global_step}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict) -> None:
        if self.every_checkpoint:
            final = self._resolve(trainer)
            self.export(trainer, pl_module, final.with_name(f"{final.name}-step-{trainer.global_step}"))

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        folder = self.export(trainer, pl_module, self._resolve(trainer))
        if not trainer.is_global_zero:
            return
        if self.zip:
            rank_zero_info(f"zipped to {zip_folder(folder)}")
        if self.push_to_hub:
            rank_zero_info(f"pushed to {push_to_hub(folder, self.push_to_hub, private=self.private)}")


class SampleTable(L.Callback):
    """Show the module's latest sample completions on the console and send them to the logger.

    Weights & Biases gets a table; other loggers get ``samples.jsonl`` in their log directory.
    """

    def __init__(
        self, every_n_steps: int = 10, per_prompt: int = 2, console: bool = True, max_chars: int = 300
    ) -> None:
        """
        Args:
            every_n_steps: Show the samples of every N-th step (0: never).
            per_prompt: Completions shown per prompt.
            console: Also print the samples.
            max_chars: Completions longer than this are shortened on the console.
        """
        self.every_n_steps, self.per_prompt = every_n_steps, per_prompt
        self.console, self.max_chars = console, max_chars

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        record = getattr(pl_module, "last_step", None)
        if not self.every_n_steps or record is None or record.step % self.every_n_steps:
            return
        rows = sample_rows(record, self.per_prompt)
        if self.console:
            rank_zero_info(self.format(rows))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                columns = list(rows[0])
                logger.log_table(
                    "samples", columns=columns, data=[[r[c] for c in columns] for r in rows], step=trainer.global_step
                )
            elif logger.log_dir:
                for row in rows:
                    append_jsonl(Path(logger.log_dir) / "samples.jsonl", row)

    def format(self, rows: list[dict[str, Any]]) -> str:
        lines = [f"── samples at step {rows[0]['step']} " + "─" * 40]
        for r in rows:
            text = (
                r["completion"] if len(r["completion"]) <= self.max_chars else r["completion"][: self.max_chars] + " …"
            )
            lines += [
                f"Q: {r['question']}",
                f"expected: {r['expected']}  extracted: {r['extracted']!r}  reward: {r['reward']:.3f}",
                f"completion: {text!r}",
                "",
            ]
        return "\n".join(lines)


def training_record(trainer: L.Trainer | None, module: Any) -> dict[str, Any]:
    """How ``module``'s policy was trained, as plain data: base model, data, command, settings, rewards."""
    data = plain(getattr(trainer.datamodule if trainer else None, "hparams", {}))
    return {
        "base_model": module.policy_config.name_or_path,
        "dataset": data.get("source"),
        "command": module.launch_command or shlex.join(["python", *sys.argv]),
        "global_step": module.global_step,
        "reward_funcs": list(module.rewards.funcs),
        "hyperparameters": {"model": plain(module.hparams), "data": data,
                            "precision": str(trainer.precision) if trainer else None},
    }  # fmt: skip


class ResumeState(L.Callback):
    """What a checkpoint holds besides weights and optimizer, so that a resumed run continues exactly: each process's
    random state (restored before the next rollout), the policy's architecture and how it was trained (for
    ``grpo export``). The reference model is the initial policy: reloaded, never stored. ``GRPOModule`` installs it.
    """

    def __init__(self) -> None:
        self._rng_to_restore: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("reference.")]:
            del state[key]
        checkpoint["hf_config"] = pl_module.policy.config.to_dict()
        checkpoint["grpo_lightning"] = training_record(trainer, pl_module)
        checkpoint["rng_state"] = all_processes(rng_state())  # one per process

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_state")
        states = [states] if isinstance(states, dict) else states or []
        rank = trainer.global_rank
        self._rng_to_restore = states[rank] if rank < len(states) else None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is not None:  # resumed: sample exactly as the uninterrupted run would have
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None


class RewardPreflight(L.Callback):
    """Before the first step, the reward-signal preflight (:mod:`grpo_lightning.preflight`) on the run's own prompts,
    engine and rewards: the table goes to the log and ``preflight.txt``; too little signal warns or raises
    (``model.rewards.preflight``). ``GRPOModule`` installs it unless the preflight is off."""

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.global_step:
            return  # resumed: it ran before the first step
        pl_module.start_rollout()
        data, cfg = trainer.datamodule, pl_module.rewards
        problems = sample_problems(data.problems, cfg.preflight_prompts, data.hparams.get("seed", 0))
        with torch.random.fork_rng(devices=[]):  # training samples exactly as it would without the preflight
            report = preflight(pl_module.rollout.engine, pl_module.tokenizer, problems, pl_module.score,
                               num_generations=pl_module.grpo.num_generations, sampling=pl_module.sampling,
                               style=pl_module.prompt, max_prompt_length=pl_module.prompt.max_prompt_length)  # fmt: skip
        log_dir = trainer.log_dir if trainer.loggers else None  # a collective under DDP: every process asks
        if trainer.is_global_zero:
            rank_zero_info(report.table())
            report.enforce(cfg.preflight_min_signal, cfg.preflight, log_dir)


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, without the "Epoch 0/-2" it shows when ``max_steps`` bounds training.

    Lightning sets ``max_epochs`` to -1 when only ``max_steps`` is given and prints ``max_epochs - 1`` as the
    last epoch; here the description names the step budget instead. (The CLI installs it as the default bar.)
    """

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}" + (f" (max_steps {trainer.max_steps})" if trainer.max_steps > 0 else "")
        return f"{description:{len(self.validation_description)}}"  # as Lightning pads it: no flicker
