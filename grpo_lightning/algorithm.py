"""GRPO's mathematics as pure torch functions (no Lightning, no models).

Shape vocabulary, used everywhere in this project:

    B  prompts per step        G  completions per prompt (the group)     N = B·G sequences
    T  completion tokens       V  vocabulary                              H  hidden size
    P  prompt tokens           L  tokens of a whole row (P + T)           X  output width: H (hidden) or V (logits)
    k  micro-batches           n  rows of one forward (N/k) or batch      u  distinct prompts among the n rows
    M  flattened positions (N·T, n·T)                                     c  positions of one chunk (≤ chunk_size)

Prompts are left-padded to the batch's longest (P), completions right-padded (T). A dimension written as a word
(``rows``, ``width``, ``keep``, ``steps``) is the local variable of that name.

Rows are grouped by prompt: sequences ``g·G … g·G + G − 1`` are the G completions of prompt ``g``.

One step of GRPO (Shao et al., 2024, "DeepSeekMath", Algorithm 1), as this module computes it:

    A_i     = (r_i − mean(r_group)) / (std(r_group) + eps)                    group_advantages
    w_i,t   = exp(log π_θ(o_i,t) − log π_old(o_i,t))   (GSPO: one w_i per seq)   importance_ratio
    l_i,t   = −min(w·A_i, clip(w, 1 − ε_low, 1 + ε_high)·A_i) + β·KL_i,t         policy_loss
    KL_i,t  = exp(ref − logp) − (ref − logp) − 1    (Schulman's k3 estimator)   kl_k3
    loss    = Σ_i,t weight_i,t · l_i,t                                          loss_weights

Options beside the paper's defaults: sequence-level ratios (GSPO), the KL term times the ratio (unbiased
gradient), the engine-mismatch weights (``mismatch_weights``), high-entropy token masking (``high_entropy_mask``)
and the per-token entropy of the policy (``head_token_logprobs(..., with_entropy=True)``).

What it leaves out: no value function, no entropy bonus, no reward model (rewards are functions).
"""

from __future__ import annotations

from typing import Literal

import torch

AdvantageScale = Literal["group", "batch", "none"]
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")
ImportanceLevel = Literal["token", "sequence"]
MismatchMode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
MISMATCH_MODES: tuple[str, ...] = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")

_MAX_LOG_RATIO = 20.0  # exp(20) ≈ 5e8: large enough to be exact in practice, small enough to stay finite


def group_advantages(
    rewards: torch.Tensor,  # [N]; NaN marks a completion no reward function could score
    group_size: int,
    scale: AdvantageScale = "group",
    eps: float = 1e-4,
) -> torch.Tensor:  # [N]
    """Group-relative advantages: each reward minus its group's mean, divided by a standard deviation.

    ``scale="group"`` divides by the group's std (the paper), ``"batch"`` by the std over all N rewards
    (more robust when a group's rewards are nearly equal), ``"none"`` only centres (Dr. GRPO). Stds are
    Bessel-corrected. A group whose rewards are all equal gets advantages of exactly 0 for any ``eps``: it is
    detected by max = min, because float32 leaves a tiny nonzero std for rewards like ``[0.1] * 16``.
    A NaN reward (TRL: every reward function returned None) is left out of its group's mean and std and
    gets advantage 0, as in TRL.
    """
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    n = rewards.numel()
    if group_size < 1 or n % group_size:
        raise ValueError(f"group_advantages: group_size={group_size} does not divide the number of rewards N={n}")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"group_advantages: scale must be 'group', 'batch' or 'none', got {scale!r}")
    grouped = rewards.view(-1, group_size)  # [B, G]
    valid = ~torch.isnan(grouped)  # [B, G]
    centred = torch.where(valid, grouped - _masked_mean(grouped, valid), 0.0)  # [B, G]
    constant = constant_groups(rewards, group_size)[:, None]  # [B, 1]
    if scale == "none":
        return torch.where(constant, 0.0, centred).view(-1)
    if scale == "group":
        std = _masked_std(grouped, valid, dim=1)  # [B, 1]
    else:
        std = _masked_std(rewards.view(1, -1), valid.view(1, -1), dim=1)  # [1, 1]
    return torch.where(constant | (std == 0), 0.0, centred / (std + eps)).view(-1)


def constant_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:  # [N] → [B] bool
    """Groups without a learning signal: all scored rewards equal (max = min, exactly) or fewer than two scored."""
    grouped = rewards.view(-1, group_size)  # [B, G]
    valid = ~torch.isnan(grouped)
    highest = torch.where(valid, grouped, -torch.inf).amax(dim=1)
    lowest = torch.where(valid, grouped, torch.inf).amin(dim=1)
    return ~(highest > lowest)


def group_std(rewards: torch.Tensor, group_size: int) -> torch.Tensor:  # [N] → [B]
    """Each group's Bessel-corrected reward std, NaN rewards left out (for logging)."""
    grouped = rewards.view(-1, group_size)
    return _masked_std(grouped, ~torch.isnan(grouped), dim=1).view(-1)


def _masked_mean(x: torch.Tensor, valid: torch.Tensor, dim: int = 1) -> torch.Tensor:  # keepdim
    return torch.where(valid, x, 0.0).sum(dim, keepdim=True) / valid.sum(dim, keepdim=True).clamp(min=1)


def _masked_std(x: torch.Tensor, valid: torch.Tensor, dim: int = 1) -> torch.Tensor:  # keepdim, Bessel-corrected
    centred = torch.where(valid, x - _masked_mean(x, valid, dim), 0.0)
    count = valid.sum(dim, keepdim=True)
    return torch.sqrt(centred.square().sum(dim, keepdim=True) / (count - 1).clamp(min=1))


def token_logprobs(
    logits: torch.Tensor,  # [N, T, V]
    tokens: torch.Tensor,  # [N, T]
    temperature: float = 1.0,
    chunk_size: int = 1024,
    *,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # [N, T] float32 (and [N, T] entropy, no grad)
    """Log-probabilities of the taken ``tokens`` under ``softmax(logits / temperature)``.

    Works on ``chunk_size`` rows of ``N·T`` at a time, so at most ``chunk_size × V`` float32 values exist
    at once instead of a full float32 ``[N, T, V]`` log-softmax (7.8 GB for Qwen at N=64, T=200).
    ``with_entropy`` also returns each position's entropy ``−Σ_v p log p`` of the same distribution (detached).
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"token_logprobs: logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)}")
    flat_logits = logits.reshape(-1, logits.shape[-1])  # [N·T, V]
    flat_tokens = tokens.reshape(-1)  # [N·T]
    out, entropy = [], []
    for rows in _chunks(flat_tokens.numel(), chunk_size):
        chunk = flat_logits[rows].float() / temperature  # [c, V]
        taken = chunk.gather(-1, flat_tokens[rows, None]).squeeze(-1)
        out.append(taken - torch.logsumexp(chunk, dim=-1))
        if with_entropy:
            entropy.append(_entropy(chunk.detach()))
    logp = torch.cat(out).view(tokens.shape) if out else logits.new_zeros(tokens.shape, dtype=torch.float32)
    if not with_entropy:
        return logp
    return logp, torch.cat(entropy).view(tokens.shape) if entropy else torch.zeros_like(logp)


def head_token_logprobs(
    hidden: torch.Tensor,  # [N, T, H] last hidden states (after the final norm)
    weight: torch.Tensor,  # [V, H] output head (lm_head) weight, no bias
    tokens: torch.Tensor,  # [N, T]
    temperature: float = 1.0,
    chunk_size: int = 1024,
    *,
    with_entropy: bool = False,
    mask: torch.Tensor | None = None,  # [N, T] 1 at the positions to compute (the completion mask)
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # [N, T] float32 (and [N, T] entropy, no grad)
    """``token_logprobs(hidden @ weight.T, tokens)`` without ever holding the ``[N, T, V]`` logits.

    Fused head + log-softmax: ``chunk_size`` rows of ``N·T`` are projected, reduced to the taken token's
    log-prob and dropped; the backward pass recomputes each chunk instead of saving it. Peak extra memory is a
    few ``chunk_size × V`` floats whatever N and T are (benchmarks/logprob_memory.py measures it). The matmul
    runs in the autocast dtype when autocast is on, as ``lm_head`` would. ``with_entropy`` also returns each
    position's entropy, computed from the same chunks (no extra projection, no gradient). With ``mask``, only the
    masked-in positions reach the head (padding after a short completion costs nothing) and the others are 0.
    """
    if hidden.shape[:-1] != tokens.shape or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"head_token_logprobs: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and tokens "
            f"{tuple(tokens.shape)} do not fit [N, T, H], [V, H], [N, T]"
        )
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    flat_hidden, flat_tokens = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)
    kept = None if mask is None else mask.reshape(-1).nonzero().squeeze(1)  # [M] flat positions
    if kept is not None:
        flat_hidden, flat_tokens = flat_hidden[kept], flat_tokens[kept]
    flat, entropy = _HeadLogprobs.apply(flat_hidden, weight, flat_tokens, temperature, chunk_size, dtype, with_entropy)
    if kept is not None:
        flat = flat.new_zeros(tokens.numel()).index_copy(0, kept, flat)
        if with_entropy:
            entropy = entropy.new_zeros(tokens.numel()).index_copy(0, kept, entropy)
    if not with_entropy:
        return flat.view(tokens.shape)
    return flat.view(tokens.shape), entropy.view(tokens.shape)


class _HeadLogprobs(torch.autograd.Function):
    """Autograd for ``head_token_logprobs`` on flat rows: saves only hidden, weight and tokens."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature, chunk_size, dtype, with_entropy):  # [M, H], [V, H], [M] → [M]
        out = hidden.new_empty(tokens.shape, dtype=torch.float32)
        entropy = hidden.new_empty(tokens.shape if with_entropy else (0,), dtype=torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for rows in _chunks(tokens.numel(), chunk_size):
                taken_entropy = entropy[rows] if with_entropy else None
                out[rows] = _taken_logprobs(_scaled_logits(hidden[rows], w, temperature), tokens[rows], taken_entropy)
        ctx.save_for_backward(hidden, weight, tokens)
        ctx.temperature, ctx.chunk_size, ctx.dtype = temperature, chunk_size, dtype
        ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    def backward(ctx, grad_out, _grad_entropy):  # [M]; the entropy carries no gradient
        hidden, weight, tokens = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(ctx.dtype)
            for rows in _chunks(tokens.numel(), ctx.chunk_size):
                h = hidden[rows].to(ctx.dtype)
                grad_logits = _logits_grad(
                    _scaled_logits(h, w, ctx.temperature), tokens[rows], grad_out[rows], ctx.temperature, ctx.dtype
                )
                if grad_hidden is not None:
                    grad_hidden[rows] = (grad_logits @ w).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight.add_(grad_logits.T @ h)
                del grad_logits  # before the next chunk's logits exist: peak memory is one chunk, not two
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def _taken_logprobs(logits: torch.Tensor, tokens: torch.Tensor, entropy_out: torch.Tensor | None = None):  # [c]
    # A function, so the chunk's [c, V] log-softmax is freed before the next chunk's logits are computed
    logp = torch.log_softmax(logits, dim=-1)  # [c, V]
    if entropy_out is not None:
        entropy_out.copy_(_entropy_of(logp))
    return logp.gather(-1, tokens[:, None]).squeeze(-1)


def _entropy(logits: torch.Tensor) -> torch.Tensor:  # [c, V] → [c]
    return _entropy_of(torch.log_softmax(logits, dim=-1))


def _entropy_of(logp: torch.Tensor) -> torch.Tensor:  # [c, V] log-probs → [c]
    return -logp.exp().mul_(logp).sum(dim=-1)  # one [c, V] temporary, not two: the chunk is 200 MB at V = 49k


def _logits_grad(logits, tokens, grad_out, temperature: float, dtype: torch.dtype) -> torch.Tensor:  # [c, V]
    """d logp(token) / d logits = (onehot(token) − softmax) / temperature, times the incoming gradient."""
    grad = torch.softmax(logits, dim=-1)
    del logits  # the caller passed a temporary: this frees it
    grad.mul_(-grad_out[:, None]).scatter_add_(-1, tokens[:, None], grad_out[:, None].float())
    return grad.div_(temperature).to(dtype)


def _scaled_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:  # [c, V] float32
    logits = (hidden.to(weight.dtype) @ weight.T).float()
    return logits if temperature == 1.0 else logits.div_(temperature)


def _chunks(total: int, size: int) -> list[slice]:
    return [slice(start, start + size) for start in range(0, total, size)]


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:  # [N, T] → [N, T]
    """Per-token KL(π_θ ‖ π_ref) estimate ``exp(d) − d − 1`` with ``d = ref − logp``: unbiased, ≥ 0.

    ``d`` is clamped to ±20 so a token the reference finds impossible gives a large finite value, not inf.
    """
    delta = (ref_logp - logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.exp(delta) - delta - 1.0


def importance_ratio(
    logp: torch.Tensor,  # [N, T] current policy, with grad
    old_logp: torch.Tensor,  # [N, T] policy that sampled the rollouts
    mask: torch.Tensor,  # [N, T]
    level: ImportanceLevel = "token",
) -> torch.Tensor:  # [N, T] ("token") or [N, 1] ("sequence")
    """π_θ/π_old per token (GRPO, PPO), or per sequence as exp of the length-normalised log-ratio sum (GSPO,
    Zheng et al., 2025, arXiv:2507.18071; TRL's ``importance_sampling_level="sequence"``)."""
    log_ratio = logp - old_logp
    if level == "sequence":
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    elif level != "token":
        raise ValueError(f"importance_ratio: level must be 'token' or 'sequence', got {level!r}")
    return torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))


def mismatch_weights(
    old_logp: torch.Tensor,  # [N, T] the trainer's log-probs of the sampled tokens (no grad)
    rollout_logp: torch.Tensor,  # [N, T] the engine's log-probs of the same tokens
    mask: torch.Tensor,  # [N, T]
    mode: MismatchMode = "token_truncate",
    cap: float = 2.0,
) -> torch.Tensor:  # [N, T] (token_*) or [N, 1] (sequence_*)
    """Importance weights π_old/π_rollout that correct for the engine sampling from slightly other numbers than the
    trainer computes (vLLM kernels, bf16): truncated at ``cap`` (TIS) or set to 0 above it (MIS), per token or per
    sequence (the product of the token ratios). TRL's ``vllm_importance_sampling_mode`` with ``clip_min=None``."""
    if mode not in MISMATCH_MODES:
        raise ValueError(f"mismatch_weights: mode must be one of {MISMATCH_MODES}, got {mode!r}")
    diff = torch.nan_to_num((old_logp - rollout_logp) * mask, nan=0.0)  # tokens the engine could not score: ratio 1
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)  # [N, 1]
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return ratio.clamp(max=cap)
    return ratio.masked_fill(ratio > cap, 0.0)


def high_entropy_mask(
    entropy: torch.Tensor,  # [N, T] the policy's entropy at each completion position
    mask: torch.Tensor,  # [N, T]
    quantile: float,
    pool: torch.Tensor | None = None,  # [M] entropies the threshold is taken over (default: entropy[mask])
) -> torch.Tensor:  # [N, T] float: 1 for the top-``quantile`` share of tokens by entropy
    """Keep only the highest-entropy ``quantile`` of the tokens in the policy term ("Beyond the 80/20 rule", Wang
    et al., 2025, arXiv:2506.01939; TRL's ``top_entropy_quantile``: 0.2 keeps the top 20 %). The threshold is the
    quantile of ``pool``: this batch's tokens, or every process's under data parallelism (as TRL gathers them)."""
    valid = mask.bool()
    values = (entropy[valid] if pool is None else pool).float()
    if values.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.float32)
    threshold = torch.quantile(values, 1.0 - quantile)
    return ((entropy >= threshold) & valid).float()


def loss_weights(
    mask: torch.Tensor,  # [N, T]
    loss_type: LossType = "grpo",
    *,
    max_completion_length: int | None = None,
    num_tokens: float | None = None,
    micro_batches: int = 1,
) -> torch.Tensor:  # [N, T]
    """The normalisation of each token's loss, so that ``loss = Σ weight · per_token_loss``.

    - ``"grpo"``: mean over each sequence's tokens, then mean over sequences (the paper; favours short
      wrong answers and long right ones — the length bias Dr. GRPO points out).
    - ``"bnpo"``: sum over all tokens / number of tokens in this batch. With ``micro_batches = k`` the N rows are
      k equal slices (the micro-batches of gradient accumulation) and each slice is divided by its *own* token
      count, then by k: TRL's ``bnpo``, which weighs a token of a short micro-batch more.
    - ``"dr_grpo"``: sum / (N · max_completion_length): a constant, so no length bias.
    - ``"dapo"``: sum / ``num_tokens``, the token count of the *global* batch (all micro-batches and
      processes); defaults to this batch's count.

    Computing weights once for a whole step and slicing them per micro-batch makes gradient accumulation
    exact for every loss type.
    """
    mask = mask.float()
    n = mask.shape[0]
    if loss_type == "grpo":
        return mask / (n * mask.sum(dim=1, keepdim=True).clamp(min=1.0))
    if loss_type == "bnpo":
        if micro_batches < 1 or n % micro_batches:
            raise ValueError(f"loss_weights: micro_batches={micro_batches} does not divide N={n}")
        slices = mask.view(micro_batches, -1, mask.shape[1])  # [k, N/k, T]
        return (slices / (micro_batches * slices.sum(dim=(1, 2), keepdim=True).clamp(min=1.0))).view_as(mask)
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_weights: loss_type='dr_grpo' needs max_completion_length")
        return mask / (n * max_completion_length)
    if loss_type == "dapo":
        total = mask.sum() if num_tokens is None else torch.as_tensor(float(num_tokens))
        return mask / total.clamp(min=1.0)
    raise ValueError(f"loss_weights: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def policy_loss(
    logp: torch.Tensor,  # [N, T] current policy, with grad
    old_logp: torch.Tensor,  # [N, T] policy that sampled the rollouts (no grad)
    advantages: torch.Tensor,  # [N]
    mask: torch.Tensor,  # [N, T] 1 for completion tokens that count
    *,
    ref_logp: torch.Tensor | None = None,  # [N, T] frozen reference; needed when beta > 0
    beta: float = 0.04,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: LossType = "grpo",
    max_completion_length: int | None = None,
    weights: torch.Tensor | None = None,  # [N, T] from loss_weights over a larger batch
    token_scale: torch.Tensor | None = None,  # [N, T] or [N, 1] multiplies the policy term (mismatch, entropy mask)
    importance_sampling_level: ImportanceLevel = "token",
    kl_times_ratio: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's clipped surrogate with a k3 KL penalty; returns ``(loss, stats)``.

    The defaults reproduce the notebook's TRL run (β 0.04, ε 0.2, "grpo"). Pass ``weights`` when this
    batch is a micro-batch of a step (see :func:`loss_weights`). ``stats`` holds detached, token-averaged
    ``kl``, ``clip_ratio_low`` (ratio below ``1 − ε_low`` with A < 0) and ``clip_ratio_high`` (ratio above
    ``1 + ε_high`` with A > 0), and ``num_tokens``.

    ``importance_sampling_level="sequence"`` is GSPO (one ratio per completion, see :func:`importance_ratio`).
    ``kl_times_ratio`` multiplies the k3 term by the ratio, TRL 1.16's ``use_bias_correction_kl``: its gradient is
    then an unbiased estimate of ∇KL(π_θ ‖ π_ref); without it (the notebook's TRL 0.14 form, our default) the
    gradient's expectation is ∇KL(π_ref ‖ π_θ).

    With one iteration and ``old_logp = logp.detach()`` the ratio is 1. With ``loss_type="grpo"`` the loss *value*
    is then just β·KL (≈ 0 at step 1: each sequence's weights sum to 1/N and each group's advantages to 0); the
    other loss types weigh sequences unequally, so their value also holds a policy term. The gradient is
    ``−A · ∇logp`` per token for every loss type: learning happens anyway.
    """
    if beta > 0 and ref_logp is None:
        raise ValueError("policy_loss: beta > 0 needs ref_logp from the reference model")
    mask = mask.float()
    adv = advantages.view(-1, 1).to(logp.dtype)  # [N, 1]
    ratio = importance_ratio(logp, old_logp, mask, importance_sampling_level)  # [N, T] or [N, 1]
    clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)  # [N, T] or [N, 1]
    if token_scale is not None:
        per_token = per_token * token_scale
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)  # [N, T]
    if kl_times_ratio:
        kl = kl * ratio  # ratio keeps its gradient: d(w·k3) = w·(dk3 + k3·dlogπθ), the score-function term
    if beta > 0:
        per_token = per_token + beta * kl
    if weights is None:
        weights = loss_weights(mask, loss_type, max_completion_length=max_completion_length)
    loss = (per_token * weights).sum()

    with torch.no_grad():
        num_tokens = mask.sum()
        denom = num_tokens.clamp(min=1.0)
        ratio = ratio.expand_as(logp)
        stats = {
            "kl": (kl * mask).sum() / denom,
            "clip_ratio_low": (((ratio < 1.0 - epsilon_low) & (adv < 0)).float() * mask).sum() / denom,
            "clip_ratio_high": (((ratio > 1.0 + epsilon_high) & (adv > 0)).float() * mask).sum() / denom,
            "num_tokens": num_tokens,
        }
    return loss, stats
