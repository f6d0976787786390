#!/usr/bin/env bash
# Create .venv and install grpo-lightning with its test tools. Idempotent: re-runs only when
# pyproject.toml changed. On a machine without an NVIDIA GPU, torch is pinned to the CPU build first.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# pip's stderr without this machine's noise about missing local index folders; pip's exit status is kept
pip_install() { .venv/bin/python -m pip install -q "$@" 2> >(grep -v "is ignored" >&2); }
STAMP=.venv/.grpo-installed
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  .venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true  # optional
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    pip_install "torch==2.13.0"
  fi
  pip_install -e ".[dev]"
  .venv/bin/python -c "import grpo_lightning, torch, lightning, transformers" # fail loudly if the install broke
  echo "$WANT" > "$STAMP"
fi
