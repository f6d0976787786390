"""Precision and vLLM dtype chosen for the hardware: bf16 only where the CPU computes it natively."""

from __future__ import annotations

import pytest

from grpo_lightning import hardware

AMX = {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
NO_BF16 = {"avx2", "fma"}  # e.g. a 2-core AMD EPYC without AVX-512


@pytest.fixture(params=[AMX, NO_BF16], ids=["native-bf16", "no-bf16"])
def flags(request, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: request.param)
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: False)
    return request.param


def test_auto_precision_is_bf16_only_where_native(flags):
    native = flags is AMX
    for requested in (None, "auto"):
        choice = hardware.resolve_precision(requested, "cpu")
        assert choice.precision == ("bf16-mixed" if native else "32-true")
        assert not choice.slow and ("natively" if native else "slower") in choice.reason


def test_explicit_bf16_is_kept_and_flagged_where_emulated(flags, monkeypatch):
    monkeypatch.setattr(hardware, "bf16_slowdown", lambda: 70.0)
    choice = hardware.resolve_precision("bf16-mixed", "cpu")
    assert choice.precision == "bf16-mixed"
    assert choice.slow == (flags is NO_BF16)
    if choice.slow:
        assert "70× slower" in choice.reason and "trainer.precision" in choice.reason
    assert hardware.resolve_precision("32-true", "cpu") == hardware.PrecisionChoice("32-true", "")


def test_vllm_cpu_dtype(flags):
    assert hardware.cpu_vllm_dtype("auto") == ("bfloat16" if flags is AMX else "float32")
    assert hardware.cpu_vllm_dtype("float32") == "float32"


def test_the_cli_resolves_a_recipe_without_precision(tmp_path, monkeypatch, flags):
    from conftest import demo_config

    from grpo_lightning.cli import main

    cli = main(["--config", str(demo_config(tmp_path))], run=False)
    assert cli.trainer.precision == ("bf16-mixed" if flags is AMX else "32-true")


@pytest.mark.parametrize("recipe", ["cpu-demo.yaml", "smollm2-135m-cpu.yaml", "smollm2-135m-warm.yaml"])
def test_cpu_recipes_leave_both_precisions_to_the_hardware(recipe):
    """A CPU without native bf16 must get float32 from every CPU recipe: in training and in vLLM-CPU's weights."""
    import yaml
    from conftest import REPO

    config = yaml.safe_load((REPO / "configs" / recipe).read_text())
    assert "precision" not in config["trainer"]
    assert config["model"].get("vllm", {}).get("dtype", "auto") == "auto"
