"""The command line: ``python train.py fit --config configs/<recipe>.yaml`` (a LightningCLI)."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from grpo_lightning.data import GSM8KDataModule
from grpo_lightning.module import GRPOModule


def wandb_offline_without_credentials() -> None:
    """Never block on a W&B login prompt: log offline when no API key or netrc entry is configured."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    os.environ["WANDB_MODE"] = "offline"


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Start the CLI (``fit``, ``validate``, ``test``); every config field is documented in ``--help``."""
    from jsonargparse import set_parsing_settings

    wandb_offline_without_credentials()
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    return LightningCLI(GRPOModule, GSM8KDataModule, args=args, run=run, save_config_kwargs={"overwrite": True})
