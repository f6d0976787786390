"""Callbacks: Hugging Face export of the policy, and a table of sample completions.

bf16 comes from ``trainer.precision``, the cosine schedule from the module, checkpoints from Lightning's
``ModelCheckpoint`` and the learning-rate curve from ``LearningRateMonitor``: no callback of ours needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from grpo_lightning.export import append_jsonl, atomic_open, export_policy, hub_token, push_to_hub, zip_folder


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written beside their final name, flushed to disk, then renamed into place.

    Lightning's own writer stages in the system temp folder and *moves* the file, which is a plain copy when
    that folder is on another filesystem: a kill during the copy would leave a truncated ``last.ckpt``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        with atomic_open(path, "wb") as f:
            torch.save(checkpoint, f)


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with crash-safe writes that also saves ``last.ckpt`` when training ends.

    Lightning saves on every ``every_n_train_steps`` only, so a run stopping at ``max_steps`` = 60 with
    checkpoints every 50 would otherwise resume from step 50. Files are written by :class:`AtomicCheckpointIO`.
    """

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # leave a user's own plugin alone
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class HFExport(L.Callback):
    """Write the policy as a ``save_pretrained`` folder (safetensors, tokenizer, generation config, model card).

    At the end of training into ``dirpath``; with ``every_checkpoint`` also at each checkpoint, into the
    sibling folder ``<dirpath>-step-<N>``. Writes are atomic: a folder is always a complete export. The
    final export can be zipped and pushed to the Hugging Face Hub; the model card then shows the last
    validation results.
    """

    def __init__(self, dirpath: str = "hf_export", every_checkpoint: bool = False, zip: bool = False,
                 push_to_hub: str | None = None, private: bool = False, adapter_only: bool = False) -> None:  # fmt: skip
        """
        Args:
            dirpath: Folder of the final export (relative paths are under the trainer's default_root_dir).
            every_checkpoint: Also export at every checkpoint save, into <dirpath>-step-<N>.
            zip: Also write <dirpath>.zip of the final export.
            push_to_hub: Hub repository "user/name" to upload the final export to (token: HF_TOKEN or `hf auth login`).
            private: Create the Hub repository as private.
            adapter_only: LoRA runs: write the adapter alone instead of the merged model.
        """
        self.dirpath = dirpath
        self.every_checkpoint = every_checkpoint
        self.zip = zip
        self.push_to_hub = push_to_hub
        self.private = private
        self.adapter_only = adapter_only

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        if self.push_to_hub and stage == "fit":
            hub_token()  # no token: fail now, not after hours of training

    def _resolve(self, trainer: L.Trainer) -> Path:
        path = Path(self.dirpath)
        return path if path.is_absolute() else Path(trainer.default_root_dir) / path

    def export(self, trainer: L.Trainer, pl_module: Any, out_dir: Path) -> Path:
        """Called on every process (sharded weights are gathered collectively); rank 0 writes."""
        policy = pl_module.exportable_policy()
        if trainer.is_global_zero:
            export_policy(
                policy, pl_module.tokenizer, out_dir,
                record=pl_module.training_record(), evaluation=self.validation_results(trainer), repo_id=self.push_to_hub,
                adapter_only=self.adapter_only,
            )  # fmt: skip
            rank_zero_info(f"HF export written to {out_dir}")
        return out_dir

    @staticmethod
    def validation_results(trainer: L.Trainer) -> dict[str, Any] | None:
        metrics = {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
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

    def __init__(self, console: bool = True, max_chars: int = 300) -> None:
        """
        Args:
            console: Also print the samples.
            max_chars: Completions longer than this are shortened on the console.
        """
        self.console = console
        self.max_chars = max_chars
        self._seen_step = -1

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        rows = getattr(pl_module, "last_samples", [])
        if not rows or rows[0]["step"] == self._seen_step:
            return
        self._seen_step = rows[0]["step"]
        if self.console:
            rank_zero_info(self.format(rows))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                columns = list(rows[0])
                logger.log_table("samples", columns=columns, data=[[r[c] for c in columns] for r in rows], step=trainer.global_step)
            elif logger.log_dir:
                for row in rows:
                    append_jsonl(Path(logger.log_dir) / "samples.jsonl", row)

    def format(self, rows: list[dict[str, Any]]) -> str:
        lines = [f"── samples at step {rows[0]['step']} " + "─" * 40]
        for r in rows:
            text = r["completion"] if len(r["completion"]) <= self.max_chars else r["completion"][: self.max_chars] + " …"
            lines += [
                f"Q: {r['question']}",
                f"expected: {r['expected']}  extracted: {r['extracted']!r}  reward: {r['reward']:.3f}",
                f"completion: {text!r}",
                "",
            ]
        return "\n".join(lines)
