"""Hugging Face folders: write a model + tokenizer atomically so a crash never leaves a half-written one.

A leaf module (no project imports): it takes any ``save_pretrained``-capable model and tokenizer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def save_hf_folder(model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """``save_pretrained`` model (safetensors), tokenizer and generation config into ``out_dir``.

    Everything is written to a temporary sibling folder first, then swapped in with renames, so
    ``out_dir`` is at every moment either the previous complete export or the new complete one.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _swap_in(new: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
