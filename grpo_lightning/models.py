"""Loading a causal LM and its tokenizer from a Hub name, a local folder, a GGUF file, or the tiny builder.

Errors say what to change: a missing local folder, a folder that is not a model, or an unreachable Hub
(with ``HF_HUB_OFFLINE`` and local paths named) never surface as a bare stack trace.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class ModelConfig:
    """Which model is the policy, and how to load it."""

    name_or_path: str = "Qwen/Qwen2.5-0.5B-Instruct"
    """Hub model name or local folder (AutoModelForCausalLM)."""
    gguf_file: str | None = None
    """File name of a GGUF checkpoint inside `name_or_path`, loaded dequantised."""
    build_tiny: bool = False
    """Build a tiny random Qwen2 model and tokenizer at `name_or_path` when the folder is missing (offline demo)."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint to run. Off unless you trust the source."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says what to change."""


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def _check_loadable(cfg: ModelConfig) -> None:
    path = Path(cfg.name_or_path).expanduser()
    if cfg.build_tiny and not path.exists():
        from grpo_lightning.tiny import build_tiny_checkpoint

        build_tiny_checkpoint(path)
    if _looks_local(cfg.name_or_path):
        if not path.is_dir():
            raise ModelLoadError(f"model path {cfg.name_or_path!r} does not exist")
        marker = cfg.gguf_file or "config.json"
        if not (path / marker).exists():
            raise ModelLoadError(f"{cfg.name_or_path!r} is not a model folder: it has no {marker}")


def _hub_error(cfg: ModelConfig, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load {cfg.name_or_path!r} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
        "If the Hugging Face Hub is unreachable here, set HF_HUB_OFFLINE=1 and pass a local folder "
        "(model.name_or_path: /path/to/model) or a model already in the local cache."
    )


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    _check_loadable(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            cfg.name_or_path, gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code
        )
    except OSError as err:
        raise _hub_error(cfg, err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ModelLoadError(f"the tokenizer of {cfg.name_or_path!r} has no chat template; GRPO prompts need one")
    return tokenizer


def load_causal_lm(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> Any:
    """The model in train mode (``from_pretrained`` returns eval mode)."""
    from transformers import AutoModelForCausalLM

    _check_loadable(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path, gguf_file=cfg.gguf_file, dtype=dtype, trust_remote_code=cfg.trust_remote_code
        )
    except OSError as err:
        raise _hub_error(cfg, err) from err
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model.train()
