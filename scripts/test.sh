#!/usr/bin/env bash
# The README's test command: set up .venv if needed, then run the whole suite offline.
# Extra arguments go to pytest: `-m "not e2e"` runs the fast tier, `-m e2e` the end-to-end tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
exec .venv/bin/python -m pytest "$@"
