"""The training settings, one concern per class (no Lightning here: import them anywhere).

Each class checks itself once, in ``__post_init__``, and says what to change; nothing mutates a config after that.
Their field docstrings are the ``--help`` of ``train.py fit`` (``model.grpo.*``, ``model.prompt.*``, …).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from grpo_lightning.algorithm import LOSS_TYPES, MISMATCH_MODES, AdvantageScale, ImportanceLevel, LossType, MismatchMode
from grpo_lightning.rewards import NOTEBOOK_REWARDS, SYSTEM_PROMPT, reward_name

OnLongPrompt = Literal["truncate", "raise"]


def _check(section: str, problems: list[str]) -> None:
    if problems:
        raise ValueError(f"invalid {section} configuration:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class GRPOConfig:
    """The algorithm (defaults: the notebook's TRL run)."""

    num_generations: int = 16
    """G: completions sampled per prompt; advantages are computed within each group of G."""
    beta: float = 0.04
    """KL penalty coefficient β against the frozen reference model (0: no reference model is loaded)."""
    epsilon_low: float = 0.2
    """Lower clip range ε_low of the probability ratio."""
    epsilon_high: float = 0.2
    """Upper clip range ε_high (DAPO's clip-higher raises it, e.g. 0.28)."""
    loss_type: LossType = "grpo"
    """Token-loss normalisation: grpo, bnpo, dr_grpo or dapo (see docs/algorithm.md)."""
    bnpo_per_micro_batch: bool = False
    """bnpo only: divide each micro-batch by its own token count and average them (TRL's bnpo), not by the step's."""
    importance_sampling_level: ImportanceLevel = "token"
    """Probability ratio per token ("token", GRPO) or one per completion from the mean log-ratio ("sequence", GSPO)."""
    use_bias_correction_kl: bool = False
    """Multiply the k3 KL term by the probability ratio (TRL 1.16's default): its gradient follows KL(π_θ‖π_ref)."""
    top_entropy_quantile: float = 1.0
    """Only this top share of each micro-batch's tokens (all processes') by policy entropy enters the policy term (1.0: all)."""
    disable_dropout: bool = True
    """Switch dropout off in the policy (not in LoRA adapters), so the ratio and KL compare like with like."""
    advantage_scale: AdvantageScale = "group"
    """Divide advantages by the group's std ("group"), the batch's ("batch") or not at all ("none")."""
    num_iterations: int = 1
    """μ: optimizer updates per rollout batch; > 1 reuses rollouts with stored old log-probs."""
    gradient_accumulation_steps: int = 4
    """Micro-batches each step's N = B·G sequences are split into (must divide N)."""
    mask_truncated_completions: bool = False
    """Leave completions cut at max_tokens out of the loss."""
    importance_sampling_cap: float | None = None
    """Correct the rollout engine's log-prob mismatch with ratios π_old/π_rollout bounded by this cap (None: off)."""
    importance_sampling_mode: MismatchMode = "token_truncate"
    """How importance_sampling_cap applies: per token or per sequence, truncating at the cap or masking above it."""
    dynamic_sampling_max_rounds: int = 0
    """DAPO dynamic sampling: groups with all-equal rewards make way for new prompts' groups, up to this many rounds."""
    dynamic_sampling_metric: str | None = None
    """Reward function whose all-equal groups dynamic sampling drops (DAPO's: accuracy); None: the weighted total."""

    def __post_init__(self) -> None:
        p = []
        if self.num_generations < 2:
            p.append(f"grpo.num_generations={self.num_generations}: GRPO compares completions within a group, use ≥ 2")
        if self.loss_type not in LOSS_TYPES:
            p.append(f"grpo.loss_type={self.loss_type!r}: use one of {LOSS_TYPES}")
        if self.beta < 0:
            p.append(f"grpo.beta={self.beta}: the KL coefficient must be ≥ 0")
        if self.num_iterations < 1:
            p.append(f"grpo.num_iterations={self.num_iterations}: use ≥ 1")
        if self.gradient_accumulation_steps < 1:
            p.append(f"grpo.gradient_accumulation_steps={self.gradient_accumulation_steps}: use ≥ 1")
        if self.epsilon_low < 0 or self.epsilon_high < 0:
            p.append("grpo.epsilon_low and grpo.epsilon_high must be ≥ 0")
        if not 0 <= self.top_entropy_quantile <= 1:
            p.append(f"grpo.top_entropy_quantile={self.top_entropy_quantile}: use a share in [0, 1] (1: all tokens)")
        if self.importance_sampling_level not in ("token", "sequence"):
            p.append(f"grpo.importance_sampling_level={self.importance_sampling_level!r}: use 'token' or 'sequence'")
        if self.importance_sampling_mode not in MISMATCH_MODES:
            p.append(f"grpo.importance_sampling_mode={self.importance_sampling_mode!r}: use one of {MISMATCH_MODES}")
        if self.importance_sampling_cap is not None and self.importance_sampling_cap <= 0:
            p.append(f"grpo.importance_sampling_cap={self.importance_sampling_cap}: use a cap > 0 (e.g. 2) or null")
        if self.dynamic_sampling_max_rounds < 0:
            p.append(f"grpo.dynamic_sampling_max_rounds={self.dynamic_sampling_max_rounds}: use ≥ 0 (0: off)")
        _check("GRPO", p)

    def micro_batch_size(self, n: int) -> int:
        """Rows per micro-batch when a step has ``n`` sequences."""
        if n % self.gradient_accumulation_steps:
            raise ValueError(f"grpo.gradient_accumulation_steps={self.gradient_accumulation_steps} does not divide the "
                             f"{n} sequences of a step (data.batch_size × grpo.num_generations); choose a divisor of {n}")  # fmt: skip
        return n // self.gradient_accumulation_steps


@dataclass(frozen=True)
class PromptConfig:
    """How a question becomes a conversation (the notebook's: its system prompt, the bare question)."""

    system_prompt: str = SYSTEM_PROMPT
    """System turn of every prompt (default: the notebook's format instructions)."""
    user_template: str = "{question}"
    """User turn of every prompt; {question} is replaced by the question (small models follow instructions here better)."""
    max_prompt_length: int = 256
    """Longest prompt in tokens."""
    on_long_prompt: OnLongPrompt = "truncate"
    """Longer prompts are left-truncated with a warning ("truncate") or rejected ("raise")."""

    def __post_init__(self) -> None:
        if "{question}" not in self.user_template:
            _check("prompt", [f"prompt.user_template={self.user_template!r} has no {{question}} placeholder"])
        if self.max_prompt_length < 1:
            _check("prompt", [f"prompt.max_prompt_length={self.max_prompt_length}: use ≥ 1"])


@dataclass(frozen=True)
class RewardConfig:
    """What a completion earns, and the check that rewards differ within groups before training starts."""

    funcs: list[str] = field(default_factory=lambda: [reward_name(f) for f in NOTEBOOK_REWARDS])
    """Reward functions: names from grpo_lightning.rewards or import paths 'package.module:function'."""
    weights: list[float] | None = None
    """One weight per reward function (None: all 1)."""
    strict_seed_semantics: bool = False
    """Reproduce the notebook's reward functions exactly, defects included."""
    on_error: Literal["raise", "zero"] = "raise"
    """A reward function that fails stops training ("raise") or scores 0 with a warning ("zero")."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for every reward function, e.g. {soft_cache_len: 50} for soft_overlong_punishment."""
    preflight: Literal["off", "warn", "raise"] = "warn"
    """Before the first step, sample a few prompts × G and check that enough groups have reward differences."""
    preflight_prompts: int = 8
    """Training prompts the preflight samples (G completions each)."""
    preflight_min_signal: float = 0.25
    """Least share of preflight groups with reward differences; fewer warns or raises (see `grpo preflight`)."""

    def __post_init__(self) -> None:
        p = []
        if self.weights is not None and len(self.weights) != len(self.funcs):
            p.append(f"rewards.weights has {len(self.weights)} values for {len(self.funcs)} rewards.funcs")
        if self.preflight_prompts < 1 or not 0 <= self.preflight_min_signal <= 1:
            p.append("rewards.preflight_prompts must be ≥ 1 and rewards.preflight_min_signal in [0, 1]")
        _check("reward", p)


@dataclass(frozen=True)
class PerformanceConfig:
    """How the log-probs are computed: speed and memory only, never the numbers (the tests hold them equal)."""

    fused_logprobs: bool = True
    """Compute token log-probs from hidden states and the output head in chunks, never holding [N, T, V] logits."""
    logprob_chunk_size: int = 1024
    """Rows of N·T per chunk of the log-prob computation (peak extra memory ≈ chunk × V floats)."""
    share_prompt_forward: bool = True
    """Run each distinct prompt once per micro-batch and let its completions share its keys/values (exact)."""

    def __post_init__(self) -> None:
        if self.logprob_chunk_size < 1:
            _check("performance", [f"performance.logprob_chunk_size={self.logprob_chunk_size}: use ≥ 1 (e.g. 1024)"])


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup and cosine decay, and gradient clipping (defaults: the notebook)."""

    lr: float = 5e-6
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not to biases and norms)."""
    warmup_ratio: float = 0.1
    """Fraction of all optimizer steps spent warming up linearly from 0."""
    min_lr_ratio: float = 0.0
    """Learning rate at the end of the cosine, as a fraction of the peak."""
    max_grad_norm: float = 0.1
    """Clip the global gradient norm to this value (0: no clipping)."""

    def __post_init__(self) -> None:
        p = []
        if not self.lr > 0:
            p.append(f"model.optim.lr={self.lr}: the peak learning rate must be > 0 (the notebook's: 5e-6)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            p.append(f"model.optim.betas={list(self.betas)}: two values in [0, 1), e.g. [0.9, 0.99]")
        if self.weight_decay < 0:
            p.append(f"model.optim.weight_decay={self.weight_decay}: must be ≥ 0")
        if not 0 <= self.warmup_ratio <= 1 or not 0 <= self.min_lr_ratio <= 1:
            p.append("model.optim.warmup_ratio and model.optim.min_lr_ratio must be in [0, 1]")
        if self.max_grad_norm < 0:
            p.append(f"model.optim.max_grad_norm={self.max_grad_norm}: must be ≥ 0 (0: no clipping)")
        _check("optimizer", p)


def refuse_greedy_training(sampling: Any) -> None:
    """Training samples G completions per prompt to compare: at temperature 0 they are identical and nothing is learned."""
    if sampling.temperature == 0:
        _check("GRPO", ["sampling.temperature=0 samples greedily: all G completions of a prompt are identical, every "
                        "advantage is 0 and nothing is learned. Use a temperature > 0 (the notebook's 0.9)"])  # fmt: skip


def plain(value: Any) -> Any:
    """Dataclasses and mappings as JSON-like data (what ``torch.load(weights_only=True)`` accepts)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
