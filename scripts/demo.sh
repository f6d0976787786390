#!/usr/bin/env bash
# The README's main job, offline on CPU: SmolLM2-135M-Instruct (installed from PyPI by setup.sh) learns the notebook's
# answer format and some arithmetic. The recipe configs/smollm2-135m-warm.yaml cut to fit 10 minutes of training:
# a format warm-up on the 256 shortest of the 512 worked GSM8K solutions shipped in data/ (the recipe: all 512), 20
# GRPO steps (the recipe: 50), then greedy answers to 100 held-out problems. Arguments go to train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
recipe=configs/smollm2-135m-warm.yaml
.venv/bin/grpo warmup --config configs/smollm2-135m-cpu.yaml --data data/gsm8k-warmup.jsonl --examples 256 --steps 32 \
  --out runs/smollm2-135m-warm/warmup
.venv/bin/python train.py fit --config "$recipe" --trainer.max_steps 20 "$@"
.venv/bin/grpo evaluate --model runs/smollm2-135m-warm/hf_export --prompt-from "$recipe" --engine vllm \
  --data synthetic --synthetic-operations 2 --held-out-from "$recipe" --limit 100 --max-tokens 128 --batch-size 100 \
  --out runs/smollm2-135m-warm/eval
