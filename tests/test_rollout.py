"""The HF rollout engine: grouping, EOS handling, sampling log-probs and weight updates."""

from __future__ import annotations

import pytest
import torch

from grpo_lightning.algorithm import token_logprobs
from grpo_lightning.batch import pack_sequences
from grpo_lightning.data import encode_prompt
from grpo_lightning.rollout import HFEngine, SamplingConfig, cut_at_eos


def test_cut_at_eos():
    assert cut_at_eos([5, 6, 2, 7, 2], [2]) == ([5, 6, 2], False)
    assert cut_at_eos([5, 6], [2]) == ([5, 6], True)
    assert cut_at_eos([], [2]) == ([], True)


def test_generate_groups_n_samples_per_prompt(tiny_model, tiny_tokenizer):
    engine = HFEngine(tiny_model, tiny_tokenizer)
    prompts = [encode_prompt(tiny_tokenizer, q) for q in ("What is 1+1?", "A longer question about 12 apples?")]
    torch.manual_seed(0)
    out = engine.generate(prompts, n=5, sampling=SamplingConfig(temperature=1.0, max_tokens=8))
    assert len(out.completion_ids) == len(out.texts) == len(out.truncated) == 10
    assert out.group_size == 5 and out.prompt_ids == prompts
    for ids, truncated in zip(out.completion_ids, out.truncated, strict=False):
        assert 1 <= len(ids) <= 8
        assert truncated == (tiny_tokenizer.eos_token_id not in ids)
    assert tiny_model.training  # generation does not leave the policy in eval mode


def test_greedy_is_deterministic_and_min_tokens_forces_length(tiny_model, tiny_tokenizer):
    engine = HFEngine(tiny_model, tiny_tokenizer)
    prompt = [encode_prompt(tiny_tokenizer, "What is 1+1?")]
    greedy = SamplingConfig(temperature=0.0, max_tokens=6, min_tokens=6)
    a, b = engine.generate(prompt, 2, greedy), engine.generate(prompt, 2, greedy)
    assert a.completion_ids == b.completion_ids and a.completion_ids[0] == a.completion_ids[1]
    assert all(len(c) == 6 for c in a.completion_ids)


def test_each_prompt_is_prefilled_once_and_generation_is_unchanged(tiny_model, tiny_tokenizer):
    from transformers import GenerationConfig

    engine = HFEngine(tiny_model, tiny_tokenizer)
    prompts = [encode_prompt(tiny_tokenizer, q) for q in ("Short?", "What is 7 times 8 apples?")]
    rows = []
    hook = tiny_model.register_forward_hook(
        lambda m, args, kwargs, out: rows.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    out = engine.generate(prompts, n=3, sampling=SamplingConfig(temperature=0.0, max_tokens=6, min_tokens=6))
    hook.remove()
    width = max(map(len, prompts))
    assert rows[:2] == [torch.Size([2, width - 1]), torch.Size([6, 1])]  # 2 prompts once, then 6 rows token by token
    seqs = pack_sequences([prompts[i // 3] for i in range(6)], [[]] * 6, tiny_tokenizer.pad_token_id)
    plain = tiny_model.eval().generate(  # transformers' own prefill of all 6 rows
        input_ids=seqs.input_ids[:, :width], attention_mask=seqs.attention_mask[:, :width],
        generation_config=GenerationConfig(do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=engine.pad_id),
    )  # fmt: skip
    assert out.completion_ids == [row[width:].tolist() for row in plain]


def test_sampling_logprobs_match_the_trainers_recomputation(tiny_model, tiny_tokenizer):
    engine = HFEngine(tiny_model, tiny_tokenizer)
    prompts = [encode_prompt(tiny_tokenizer, q) for q in ("Short?", "What is 7 times 8 apples?")]
    torch.manual_seed(1)
    sampling = SamplingConfig(temperature=0.7, max_tokens=10, logprobs=True)
    out = engine.generate(prompts, n=3, sampling=sampling)
    rows = [prompts[i // 3] for i in range(6)]
    seqs = pack_sequences(rows, out.completion_ids, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        logits = tiny_model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask,
                            position_ids=seqs.position_ids, logits_to_keep=seqs.completion_width + 1).logits[:, :-1]  # fmt: skip
    recomputed = token_logprobs(logits, seqs.completion_ids, temperature=0.7)
    for i, lp in enumerate(out.logprobs):
        assert torch.allclose(recomputed[i, : len(lp)], torch.tensor(lp), atol=1e-4)


def test_update_weights_copies_into_a_separate_engine_model(tiny_checkpoint, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    engine = HFEngine(AutoModelForCausalLM.from_pretrained(tiny_checkpoint), tiny_tokenizer)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    prompt = [encode_prompt(tiny_tokenizer, "What is 1+1?")]
    greedy = SamplingConfig(temperature=0.0, max_tokens=8)
    stale = engine.generate(prompt, 1, greedy).completion_ids
    engine.update_weights(policy.named_parameters())
    synced = engine.generate(prompt, 1, greedy).completion_ids
    assert synced == HFEngine(policy, tiny_tokenizer).generate(prompt, 1, greedy).completion_ids
    assert synced != stale


def test_vllm_weight_sync_sends_the_engines_dtype_and_the_tied_head(tiny_model):
    """vLLM's loader warns once per tensor when it narrows float32 into a bf16 engine: the sync casts first (the same
    round-to-nearest), so the engine gets bf16 values and half the bytes; the tied head is sent under its own name."""
    from types import SimpleNamespace

    from grpo_lightning.rollout import VLLMEngine

    sent = {}
    engine = VLLMEngine.__new__(VLLMEngine)  # the sync's logic, without starting vLLM (tests/test_vllm.py does that)
    engine.llm = SimpleNamespace(
        model_config=SimpleNamespace(dtype=torch.bfloat16),
        collective_rpc=lambda method, kwargs: sent.update(kwargs["weights_iterator"]),
        reset_prefix_cache=lambda: None,
    )
    engine._asleep, engine.threads = False, torch.get_num_threads()
    engine.update_weights(tiny_model.named_parameters())
    params = dict(tiny_model.named_parameters())
    assert {t.dtype for t in sent.values()} == {torch.bfloat16}
    assert all(torch.equal(sent[name], p.detach().to(torch.bfloat16)) for name, p in params.items())
    assert torch.equal(sent["lm_head.weight"], sent["model.embed_tokens.weight"]) and "lm_head.weight" not in params


def test_pack_sequences_left_pads_prompts_and_right_pads_completions():
    seqs = pack_sequences([[1, 2, 3], [4]], [[5], [6, 7]], pad_id=0)
    assert seqs.input_ids.tolist() == [[1, 2, 3, 5, 0], [0, 0, 4, 6, 7]]
    assert seqs.attention_mask.tolist() == [[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert seqs.position_ids.tolist() == [[0, 1, 2, 3, 3], [0, 0, 0, 1, 2]]
    assert seqs.completion_mask.tolist() == [[1, 0], [1, 1]]


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_sequence_logprobs_equal_the_logits_path(tiny_model, tiny_tokenizer, autocast):
    from grpo_lightning.config import PerformanceConfig
    from grpo_lightning.logprobs import plain_output_head, sequence_logprobs

    assert plain_output_head(tiny_model) is tiny_model.lm_head.weight
    prompts = [encode_prompt(tiny_tokenizer, q) for q in ("Short?", "What is 7 times 8 apples?")]
    seqs = pack_sequences(prompts, [[5, 6, 7], [8]], tiny_tokenizer.pad_token_id)
    results = []
    for fused in (True, False):
        performance = PerformanceConfig(fused_logprobs=fused, logprob_chunk_size=3)
        tiny_model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logp = sequence_logprobs(tiny_model, seqs, performance=performance)
        (logp * seqs.completion_mask).sum().backward()
        results.append((logp.detach(), [p.grad.clone() for p in tiny_model.parameters()]))
    (fused_logp, fused_grads), (plain_logp, plain_grads) = results
    tol = 2e-2 if autocast else 1e-5  # bf16 matmuls: same inputs, different summation order
    assert torch.allclose(fused_logp, plain_logp, atol=tol)  # padding is 0 on both paths
    for got, want in zip(fused_grads, plain_grads, strict=False):
        assert torch.allclose(got, want, atol=tol, rtol=tol)


class _FakeLLM:
    """Stands in for vllm.LLM: every request yields one sample ending in ``tokens``."""

    tokens: list[int] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def generate(self, requests, params, use_tqdm=False):
        from types import SimpleNamespace

        sample = SimpleNamespace(index=0, token_ids=list(self.tokens), logprobs=None)
        return [SimpleNamespace(outputs=[sample]) for _ in requests]


@pytest.fixture
def fake_vllm(monkeypatch):
    import sys
    import types

    module = types.ModuleType("vllm")
    module.LLM = _FakeLLM
    module.SamplingParams = lambda **kwargs: types.SimpleNamespace(**kwargs)
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_vllm_engine_ends_completions_at_the_generation_configs_eos_ids_too(fake_vllm, tiny_tokenizer, tmp_path):
    # Qwen2.5-Instruct: vLLM stops on <|im_end|> and <|endoftext|> (generation_config.json), not only on the tokenizer's
    from transformers import GenerationConfig

    from grpo_lightning.rollout import VLLMEngine

    other_eos = tiny_tokenizer.pad_token_id
    assert other_eos != tiny_tokenizer.eos_token_id
    GenerationConfig(eos_token_id=[tiny_tokenizer.eos_token_id, other_eos]).save_pretrained(tmp_path)
    _FakeLLM.tokens = [5, 6, other_eos]  # what vLLM returns when it stopped on the second EOS id
    engine = VLLMEngine(str(tmp_path), tiny_tokenizer)
    assert other_eos in engine.eos_ids
    out = engine.generate([[1, 2]], n=1, sampling=SamplingConfig(max_tokens=8))
    assert out.completion_ids == [[5, 6, other_eos]] and out.truncated == [False]  # ended properly, not truncated


def test_both_engines_use_the_policys_eos_set(fake_vllm, tiny_model, tiny_tokenizer, tmp_path):
    from grpo_lightning.rollout import make_engine

    tiny_model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, 7]
    hf = make_engine("hf", tiny_model, tiny_tokenizer)
    vllm = make_engine("vllm", tiny_model, tiny_tokenizer, model_path=str(tmp_path))  # no generation config there
    assert hf.eos_ids == vllm.eos_ids == sorted({tiny_tokenizer.eos_token_id, 7})
    _FakeLLM.tokens = [5, 7, 9]
    assert vllm.generate([[1]], n=1, sampling=SamplingConfig(max_tokens=8)).completion_ids == [[5, 7]]
