"""LoRA through peft: only adapters train, the base model is the reference, engines get merged weights, export
merges or writes the adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import demo_config
from safetensors.torch import load_file

pytest.importorskip("peft", reason="LoRA needs peft (pip install 'grpo-lightning[lora]')")

from grpo_lightning.cli import grpo, main
from grpo_lightning.export import export_policy
from grpo_lightning.models import LoRAConfig, apply_lora, merged_weights

LORA = {"lora.rank": 4, "lora.alpha": 8.0, "lora.dropout": 0.0, "optim.lr": 0.01, "sampling.max_tokens": 8}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """Four LoRA steps of the CPU demo (transformers engine); returns the fitted CLI and its folder."""
    tmp_path = tmp_path_factory.mktemp("lora")
    config = demo_config(tmp_path, trainer={"max_steps": 4}, model=LORA)
    return main(["fit", "--config", str(config)]), tmp_path


@pytest.mark.e2e
def test_only_adapters_train_and_there_is_no_reference_copy(lora_run):
    cli, tmp_path = lora_run
    module = cli.model
    assert module.reference is None  # β > 0, yet no second model
    initial = load_file(tmp_path / "tiny-qwen2" / "model.safetensors")
    trainable = [n for n, p in module.policy.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    own = dict(merged_weights(module.policy.get_base_model()))  # the frozen weights (adapters left out)
    own = {n.replace(".base_layer.", "."): p for n, p in own.items() if ".lora_" not in n}
    assert own.keys() == initial.keys()
    for name, value in initial.items():
        assert torch.equal(own[name], value), name  # frozen, bit for bit
    lora_b = [p for n, p in module.policy.named_parameters() if "lora_B" in n]
    assert all(p.abs().max() > 0 for p in lora_b)  # B starts at zero: it moved


@pytest.mark.e2e
def test_reference_is_the_base_model_with_adapters_off(lora_run, tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    module = lora_run[0].model
    rollout, _ = module.generate(["What is 2 + 3?", "Ava has 3 apples and finds 4 more."])
    prompts = [rollout.prompt_ids[i // rollout.group_size] for i in range(len(rollout.completion_ids))]
    reference = module.reference_logprobs(prompts, rollout)
    base = AutoModelForCausalLM.from_pretrained(lora_run[1] / "tiny-qwen2").train()
    expected = module.logprobs_without_grad(base, prompts, rollout)
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=0)
    assert (
        module.logprobs_without_grad(module.policy, prompts, rollout) - expected
    ).abs().max() > 1e-3  # adapters matter


def test_merged_weights_equal_peft_merge_and_leave_the_base_untouched(tiny_model):
    model = apply_lora(tiny_model, LoRAConfig(rank=4, alpha=8.0, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    before = {n: p.clone() for n, p in model.named_parameters()}
    merged = {n: t.clone() for n, t in merged_weights(model)}
    reference = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    assert merged.keys() == reference.keys()  # the plain model's names: what vLLM and HF loaders expect
    for name, value in reference.items():
        torch.testing.assert_close(merged[name], value, atol=1e-6, rtol=0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.e2e
def test_export_merged_or_adapter_only(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    module, run = lora_run[0].model, lora_run[1]
    policy = module.policy.eval()
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    with torch.no_grad():
        expected = policy(input_ids=ids).logits
    merged = export_policy(policy, module.tokenizer, tmp_path / "merged")
    assert not (merged / "adapter_config.json").exists()
    with torch.no_grad():
        torch.testing.assert_close(
            AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits, expected, atol=1e-4, rtol=0
        )
    adapter = export_policy(policy, module.tokenizer, tmp_path / "adapter", adapter_only=True)
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()
    assert "library_name: peft" in (adapter / "README.md").read_text()
    base = AutoModelForCausalLM.from_pretrained(run / "tiny-qwen2")
    with torch.no_grad():
        torch.testing.assert_close(
            PeftModel.from_pretrained(base, adapter)(input_ids=ids).logits, expected, atol=1e-4, rtol=0
        )

    # the same from the checkpoint, through the command line
    ckpt = str(run / "run" / "checkpoints" / "last.ckpt")
    assert grpo(["export", ckpt, "--out", str(tmp_path / "from-ckpt")]) == 0
    assert grpo(["export", ckpt, "--out", str(tmp_path / "from-ckpt-adapter"), "--adapter-only"]) == 0
    assert (tmp_path / "from-ckpt-adapter" / "adapter_model.safetensors").is_file()
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tmp_path / "from-ckpt")(input_ids=ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_unknown_target_module_is_named(tiny_model):
    with pytest.raises(ValueError, match="lora.target_modules"):
        apply_lora(tiny_model, LoRAConfig(rank=4, target_modules=["no_such_proj"]))
