#!/usr/bin/env bash
# The README's main job: set up .venv if needed, then train the offline CPU demo (tiny model, synthetic data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python train.py fit --config configs/cpu-demo.yaml "$@"
