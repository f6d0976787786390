"""GRPO's mathematics against hand-computed values, gradcheck and the direct computations."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_lightning.algorithm import (
    LOSS_TYPES,
    MISMATCH_MODES,
    group_advantages,
    head_token_logprobs,
    high_entropy_mask,
    importance_ratio,
    kl_k3,
    loss_weights,
    mismatch_weights,
    policy_loss,
    token_logprobs,
)


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 3.0, 0.0, 0.0])  # two groups of 2
    adv = group_advantages(rewards, group_size=2, eps=0.0)
    std = math.sqrt(2.0)  # Bessel-corrected std of (1, 3)
    assert torch.allclose(adv, torch.tensor([-1 / std, 1 / std, 0.0, 0.0]))


def test_group_advantages_zero_mean_per_group_and_equal_rewards_give_zero():
    torch.manual_seed(0)
    rewards = torch.rand(8 * 16)
    rewards[:16] = 2.0  # one group with equal rewards
    for scale in ("group", "batch", "none"):
        adv = group_advantages(rewards, 16, scale=scale).view(8, 16)
        assert torch.allclose(adv.mean(dim=1), torch.zeros(8), atol=1e-6)
        assert torch.equal(adv[0], torch.zeros(16))
        assert torch.isfinite(adv).all()


def test_group_advantages_scales():
    rewards = torch.tensor([0.0, 2.0, 0.0, 4.0])
    none = group_advantages(rewards, 2, scale="none")
    assert torch.equal(none, torch.tensor([-1.0, 1.0, -2.0, 2.0]))
    batch = group_advantages(rewards, 2, scale="batch", eps=0.0)
    assert torch.allclose(batch, none / rewards.std())


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="group_size=3 does not divide .* N=8"):
        group_advantages(torch.zeros(8), 3)


def test_token_logprobs_matches_direct_and_chunks():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    tokens = torch.randint(0, 11, (3, 5))
    for temperature in (1.0, 0.7):
        direct = torch.log_softmax(logits / temperature, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
        for chunk in (1, 4, 1000):
            assert torch.allclose(token_logprobs(logits, tokens, temperature, chunk_size=chunk), direct, atol=1e-6)


def test_token_logprobs_bf16_is_computed_in_float32():
    logits = torch.randn(2, 3, 7).bfloat16()
    tokens = torch.randint(0, 7, (2, 3))
    out = token_logprobs(logits, tokens)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None]).squeeze(-1))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_head_token_logprobs_equals_the_direct_path_values_and_gradients(temperature):
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 37, (3, 5))
    upstream = torch.randn(3, 5, dtype=torch.float64)
    direct = torch.log_softmax((hidden @ weight.T) / temperature, -1).gather(-1, tokens[..., None]).squeeze(-1)
    direct_grads = torch.autograd.grad((direct * upstream).sum(), (hidden, weight))
    for chunk in (1, 4, 7, 1000):  # chunks that split rows unevenly, and one chunk for everything
        fused = head_token_logprobs(hidden, weight, tokens, temperature, chunk_size=chunk)
        assert fused.dtype == torch.float32 and fused.shape == (3, 5)
        assert torch.allclose(fused.double(), direct, atol=1e-5)
        grads = torch.autograd.grad((fused * upstream).sum(), (hidden, weight))
        for got, want in zip(grads, direct_grads, strict=False):
            assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("with_entropy", [False, True])
def test_head_token_logprobs_masked_positions_are_zero_and_the_rest_unchanged(with_entropy):
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 37, (3, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    full = head_token_logprobs(hidden, weight, tokens, 0.7, chunk_size=4, with_entropy=with_entropy)
    masked = head_token_logprobs(hidden, weight, tokens, 0.7, chunk_size=4, with_entropy=with_entropy, mask=mask)
    for got, want in zip(masked, full, strict=True) if with_entropy else [(masked, full)]:
        assert torch.equal(got, want * mask)
    logp, full_logp = (masked[0], full[0]) if with_entropy else (masked, full)
    grads = torch.autograd.grad(logp.sum(), (hidden, weight))
    want = torch.autograd.grad((full_logp * mask).sum(), (hidden, weight))
    for got, expected in zip(grads, want, strict=True):
        assert torch.allclose(got, expected, atol=1e-12)


def test_head_token_logprobs_autocast_matches_bf16_head():
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 4, 32), torch.randn(50, 32)
    tokens = torch.randint(0, 50, (2, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = head_token_logprobs(hidden, weight, tokens)
        logits = torch.nn.functional.linear(hidden, weight)  # what lm_head computes under autocast
    assert logits.dtype == torch.bfloat16
    assert torch.allclose(fused, token_logprobs(logits, tokens), atol=1e-6)


def test_head_token_logprobs_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"head_token_logprobs: hidden \(2, 3, 8\)"):
        head_token_logprobs(torch.zeros(2, 3, 8), torch.zeros(10, 9), torch.zeros(2, 3, dtype=torch.long))


def test_kl_k3_values_and_finiteness():
    logp = torch.tensor([[0.0, -1.0, -100.0]])
    ref = torch.tensor([[0.0, -2.0, 0.0]])
    kl = kl_k3(logp, ref)
    d = -1.0
    assert kl[0, 0] == 0.0
    assert kl[0, 1].item() == pytest.approx(math.exp(d) - d - 1)
    assert torch.isfinite(kl).all() and (kl >= 0).all()


def test_policy_loss_hand_computed_clipping():
    # One sequence, two tokens, A = +1: the ratio e^0.5 ≈ 1.65 is clipped to 1.2; e^-0.5 is not clipped.
    logp = torch.tensor([[0.5, -0.5]])
    old = torch.zeros(1, 2)
    adv = torch.tensor([1.0])
    mask = torch.ones(1, 2)
    loss, stats = policy_loss(logp, old, adv, mask, beta=0.0)
    expected = -(1.2 + math.exp(-0.5)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["clip_ratio_high"].item() == pytest.approx(0.5)
    assert stats["clip_ratio_low"].item() == 0.0
    _, stats = policy_loss(logp, old, -adv, mask, beta=0.0)  # A < 0: the low token is the clipped one
    assert stats["clip_ratio_low"].item() == pytest.approx(0.5)


def test_loss_value_is_beta_kl_at_step_one_but_gradient_is_not_zero():
    torch.manual_seed(0)
    logp = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(4, 6, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.float64)
    beta = 0.04
    loss, stats = policy_loss(logp, logp.detach(), adv, mask, ref_logp=ref, beta=beta)
    weights = loss_weights(mask, "grpo")
    assert loss.item() == pytest.approx(beta * (kl_k3(logp, ref) * weights).sum().item())
    loss.backward()
    # d/dlogp of -A·exp(logp - old) at logp = old is -A; the KL term adds β·(1 − exp(ref − logp)).
    expected = (-adv[:, None] + beta * (1 - torch.exp(ref - logp.detach()))) * weights
    assert torch.allclose(logp.grad, expected)
    assert logp.grad.abs().sum() > 0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_policy_loss_gradcheck(loss_type):
    torch.manual_seed(1)
    logp = (torch.randn(4, 5, dtype=torch.float64) * 0.1).requires_grad_()
    old = torch.randn(4, 5, dtype=torch.float64) * 0.1
    ref = torch.randn(4, 5, dtype=torch.float64) * 0.1
    adv = torch.randn(4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float64)

    def f(x):
        return policy_loss(x, old, adv, mask, ref_logp=ref, beta=0.1, epsilon_low=0.5, epsilon_high=0.5,
                           loss_type=loss_type, max_completion_length=5)[0]  # fmt: skip

    assert torch.autograd.gradcheck(f, (logp,))


def test_loss_weights_normalisations():
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    grpo = loss_weights(mask, "grpo")
    assert torch.allclose(grpo[0], torch.tensor([0.25, 0.25, 0.0, 0.0]))  # 1 / (N=2 · len 2)
    assert torch.allclose(grpo[1], torch.full((4,), 0.125))
    assert torch.allclose(loss_weights(mask, "bnpo"), mask / 6)
    assert torch.allclose(loss_weights(mask, "dr_grpo", max_completion_length=10), mask / 20)
    assert torch.allclose(loss_weights(mask, "dapo", num_tokens=60), mask / 60)
    with pytest.raises(ValueError, match="max_completion_length"):
        loss_weights(mask, "dr_grpo")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        loss_weights(mask, "ppo")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batches_with_step_weights_equal_the_full_batch(loss_type):
    torch.manual_seed(2)
    logp = torch.randn(8, 6, requires_grad=True)
    old, ref, adv = torch.randn(8, 6), torch.randn(8, 6), torch.randn(8)
    mask = (torch.rand(8, 6) > 0.3).float()
    kwargs = dict(ref_logp=ref, beta=0.04, loss_type=loss_type, max_completion_length=6)
    full, _ = policy_loss(logp, old, adv, mask, **kwargs)
    weights = loss_weights(mask, loss_type, max_completion_length=6)
    parts = sum(
        policy_loss(logp[s], old[s], adv[s], mask[s], weights=weights[s], **{**kwargs, "ref_logp": ref[s]})[0]
        for s in (slice(0, 4), slice(4, 8))
    )
    assert torch.allclose(full, parts, atol=1e-6)


def test_equal_rewards_give_finite_zero_policy_gradient():
    logp = torch.randn(4, 3, requires_grad=True)
    adv = group_advantages(torch.ones(4), 4)
    loss, _ = policy_loss(logp, logp.detach(), adv, torch.ones(4, 3), beta=0.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.equal(logp.grad, torch.zeros(4, 3))


def test_beta_without_reference_is_an_error():
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), beta=0.1)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("eps", [0.0, 1e-4])
def test_equal_rewards_give_exactly_zero_for_any_eps(scale, eps):
    # float32 leaves [0.1] * 16 a std of ≈ 8e-9: through the std, eps = 0 gave every member ≈ −0.97
    rewards = torch.tensor([0.1] * 16 + [0.0, 1.0] * 8)
    adv = group_advantages(rewards, 16, scale=scale, eps=eps)
    assert torch.equal(adv[:16], torch.zeros(16))
    assert adv[16:].abs().min() > 0.1


def test_unscored_completions_are_left_out_of_their_group_and_get_zero():
    rewards = torch.tensor([1.0, math.nan, 3.0, 2.0, math.nan, math.nan, math.nan, 5.0])  # TRL: every function None
    adv = group_advantages(rewards, 4, eps=0.0)
    scored = torch.tensor([1.0, 3.0, 2.0])
    assert torch.allclose(adv[[0, 2, 3]], (scored - scored.mean()) / scored.std())
    assert adv[1] == 0 and torch.equal(adv[4:], torch.zeros(4))  # one scored member: no signal


def test_sequence_level_ratio_is_gspos_length_normalised_one():
    logp = torch.tensor([[0.2, 0.4, 9.0], [0.0, 0.0, 0.0]])
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert torch.allclose(importance_ratio(logp, old, mask, "sequence"), torch.tensor([[math.exp(0.3)], [1.0]]))
    assert torch.equal(importance_ratio(logp, old, mask, "token"), torch.exp(logp))


def test_sequence_level_clips_whole_sequences():
    logp = torch.tensor([[0.5, -0.1], [0.1, 0.1]], requires_grad=True)
    old, mask, adv = torch.zeros(2, 2), torch.ones(2, 2), torch.tensor([1.0, 1.0])
    loss, stats = policy_loss(logp, old, adv, mask, beta=0.0, importance_sampling_level="sequence")
    loss.backward()
    assert torch.equal(logp.grad[0], torch.zeros(2))  # mean log-ratio 0.2: ratio e^0.2 > 1.2, clipped as a whole
    assert (logp.grad[1] != 0).all()  # ratio e^0.1 < 1.2: every token gets gradient (not only the unclipped ones)
    assert stats["clip_ratio_high"].item() == pytest.approx(0.5)


def test_kl_times_ratio_has_the_unbiased_gradient():
    # ∇(w·k3) at w = 1 is ∇k3 + k3·∇logπθ: the score-function term that makes it follow KL(πθ ‖ πref)
    logp = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(3, 4, dtype=torch.float64)
    mask, zeros = torch.ones(3, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    grads = {}
    for corrected in (False, True):
        logp.grad = None
        loss, _ = policy_loss(logp, logp.detach(), zeros, mask, ref_logp=ref, beta=1.0, kl_times_ratio=corrected)
        loss.backward()
        grads[corrected] = logp.grad.clone()
    weights = loss_weights(mask, "grpo")
    assert torch.allclose(grads[True] - grads[False], kl_k3(logp, ref).detach() * weights)


def test_bnpo_per_micro_batch_is_trls_mean_of_micro_batch_means():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    per_token = torch.rand(4, 3)
    trl = sum((per_token[s] * mask[s]).sum() / mask[s].sum() for s in (slice(0, 2), slice(2, 4))) / 2
    ours_trl = (loss_weights(mask, "bnpo", micro_batches=2) * per_token).sum()
    assert torch.allclose(ours_trl, trl)
    step = (loss_weights(mask, "bnpo") * per_token).sum()  # the default: every token of the step weighs the same
    assert torch.allclose(step, (per_token * mask).sum() / 6) and not torch.allclose(step, trl)


@pytest.mark.parametrize("mode", MISMATCH_MODES)
def test_mismatch_weights_modes(mode):
    old = torch.zeros(2, 3)
    engine = torch.tensor([[-1.0, 0.0, 0.0], [0.1, 0.1, 5.0]])  # the engine's log-probs; row 1's last token is padding
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    got = mismatch_weights(old, engine, mask, mode, cap=2.0)
    token = torch.exp(torch.tensor([[1.0, 0.0, 0.0], [-0.1, -0.1, 0.0]]))  # e ≈ 2.72 exceeds the cap
    expected = {
        "token_truncate": token.clamp(max=2.0),
        "token_mask": token.masked_fill(token > 2.0, 0.0),
        "sequence_truncate": torch.exp(torch.tensor([[1.0], [-0.2]])).clamp(max=2.0),
        "sequence_mask": torch.tensor([[0.0], [math.exp(-0.2)]]),
    }[mode]
    assert torch.allclose(got, expected)


def test_high_entropy_mask_keeps_the_top_quantile_of_real_tokens():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 7.0], [0.3, 0.7, 0.2, 0.8]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # 7.0 is padding: never kept, never counted
    keep = high_entropy_mask(entropy, mask, 0.3)  # top 30 % of 7 tokens: 0.9 and 0.8 (threshold = 70th percentile)
    assert keep.tolist() == [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    assert torch.equal(high_entropy_mask(entropy, mask, 1.0), mask)


@pytest.mark.parametrize("fused", [True, False])
def test_entropy_comes_from_the_same_chunks_and_carries_no_gradient(fused):
    torch.manual_seed(0)
    hidden = torch.randn(2, 3, 8, requires_grad=True)
    weight = torch.randn(19, 8, requires_grad=True)
    tokens = torch.randint(0, 19, (2, 3))
    logits = (hidden @ weight.T) / 0.7
    want = torch.distributions.Categorical(logits=logits).entropy()
    if fused:
        logp, entropy = head_token_logprobs(hidden, weight, tokens, 0.7, chunk_size=4, with_entropy=True)
    else:
        logp, entropy = token_logprobs(hidden @ weight.T, tokens, 0.7, chunk_size=4, with_entropy=True)
    assert torch.allclose(entropy, want.detach(), atol=1e-5) and not entropy.requires_grad
    assert torch.allclose(logp, torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1), atol=1e-5)
    logp.sum().backward()
    assert hidden.grad is not None and weight.grad is not None


@pytest.mark.parametrize("loss_type", ["bnpo", "dr_grpo", "dapo"])
def test_step_one_value_is_not_just_beta_kl_for_the_length_weighted_losses(loss_type):
    logp, mask, adv = torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]), torch.tensor([1.0, -1.0])
    grpo, _ = policy_loss(logp, logp, adv, mask, beta=0.0, loss_type="grpo")
    other, _ = policy_loss(logp, logp, adv, mask, beta=0.0, loss_type=loss_type, max_completion_length=3)
    assert grpo.item() == 0.0  # each sequence's weights sum to 1/N: Σ_i A_i / N = 0
    assert other.item() < 0  # the longer, better completion weighs more: −(3·1 − 1·1) / normaliser


def test_high_entropy_threshold_comes_from_the_pool_when_given():
    entropy = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    mask = torch.ones_like(entropy)
    assert high_entropy_mask(entropy, mask, 0.5).tolist() == [[0.0, 0.0, 1.0, 1.0]]  # own median: 0.25
    pool = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.3, 0.4])  # other processes' tokens are lower: threshold 0.175
    assert high_entropy_mask(entropy, mask, 0.5, pool).tolist() == [[0.0, 1.0, 1.0, 1.0]]
