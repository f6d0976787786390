"""The log-prob passes: a prompt's forward shared by its completions gives the unshared log-probs and gradients;
the passes without gradients (reference, old policy) run in inference mode."""

from __future__ import annotations

import pytest
import torch

from grpo_lightning.batch import pack_sequences
from grpo_lightning.data import encode_prompt
from grpo_lightning.logprobs import completion_logprobs, sequence_logprobs
from grpo_lightning.rollout import Rollout

QUESTIONS = ("Short?", "What is 7 times 8 apples?")


def grouped_batch(tokenizer):
    """Two prompts of different lengths × 3 completions of different lengths (padding on both sides)."""
    prompts = [encode_prompt(tokenizer, q) for q in QUESTIONS]
    completions = [[5, 6, 7], [8], [9, 10, 11, 12], [13, 14], [15], [16, 17, 18]]
    return pack_sequences([prompts[i // 3] for i in range(6)], completions, tokenizer.pad_token_id)


def test_pack_sequences_finds_each_distinct_prompt():
    seqs = pack_sequences([[1, 2], [3], [1, 2], [3], [4]], [[9]] * 5, pad_id=0)
    assert seqs.prompt_group.tolist() == [0, 1, 0, 1, 2]
    assert seqs.group_rows.tolist() == [0, 1, 4]
    assert seqs.repeats_prompts
    assert not pack_sequences([[1], [2]], [[9], [9]], pad_id=0).repeats_prompts  # nothing to share
    assert not pack_sequences([[], []], [[9], [9]], pad_id=0).repeats_prompts  # empty prompts: nothing to run


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompt_forward_equals_the_unshared_one(tiny_model, tiny_tokenizer, fused, checkpointing):
    from grpo_lightning.config import PerformanceConfig

    if checkpointing:
        tiny_model.gradient_checkpointing_enable()
    seqs = grouped_batch(tiny_tokenizer)
    assert seqs.group_rows.tolist() == [0, 3]
    calls = []
    record = lambda m, args, kwargs, out: calls.append(kwargs["input_ids"].shape)  # noqa: E731
    hook = tiny_model.get_decoder().register_forward_hook(record, with_kwargs=True)
    results = []
    for share in (True, False):
        performance = PerformanceConfig(share_prompt_forward=share, fused_logprobs=fused)
        tiny_model.zero_grad()
        logp = sequence_logprobs(tiny_model, seqs, performance=performance)
        (logp * seqs.completion_mask).sum().backward()
        results.append((logp.detach(), [p.grad.clone() for p in tiny_model.parameters()]))
    hook.remove()
    P, T = seqs.input_ids.shape[1] - seqs.completion_width, seqs.completion_width
    assert calls == [torch.Size([2, P]), torch.Size([6, T]), torch.Size([6, P + T])]  # 2 prompts once, then 6 × T
    (shared_logp, shared_grads), (plain_logp, plain_grads) = results
    assert torch.allclose(shared_logp, plain_logp, atol=1e-5)
    for got, want in zip(shared_grads, plain_grads, strict=False):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_no_repeated_prompt_takes_the_single_pass(tiny_model, tiny_tokenizer):
    prompts = [encode_prompt(tiny_tokenizer, q) for q in QUESTIONS]
    seqs = pack_sequences(prompts, [[5, 6], [7]], tiny_tokenizer.pad_token_id)
    calls = []
    tiny_model.get_decoder().register_forward_hook(lambda m, args, out: calls.append(1))
    sequence_logprobs(tiny_model, seqs)
    assert len(calls) == 1


def test_reference_and_old_logprobs_run_in_inference_mode(tiny_model, tiny_tokenizer):
    prompt = encode_prompt(tiny_tokenizer, QUESTIONS[0])
    rollout = Rollout(
        prompt_ids=[prompt], completion_ids=[[5], [6, 7], [8], [9]], texts=[""] * 4, truncated=[False] * 4, group_size=4
    )
    modes = []
    tiny_model.get_decoder().register_forward_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    logp = completion_logprobs(tiny_model, [prompt] * 4, rollout.completion_ids, pad_id=tiny_tokenizer.pad_token_id)
    assert modes and all(modes) and not logp.is_inference()  # usable as a constant in the loss's autograd graph


def test_passes_without_gradient_leave_padding_at_zero(tiny_model, tiny_tokenizer):
    prompt = encode_prompt(tiny_tokenizer, QUESTIONS[1])
    completions = [[5] * 6, [6, 7]]  # one micro-batch: the second row is padded to the first's 6 tokens
    logp = completion_logprobs(tiny_model, [prompt] * 2, completions, pad_id=tiny_tokenizer.pad_token_id)
    assert logp.shape == (2, 6) and (logp[0] < 0).all() and (logp[1, :2] < 0).all()
    assert (logp[1, 2:] == 0).all()  # the log-probs of pad tokens never leave the pass
