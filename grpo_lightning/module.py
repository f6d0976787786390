"""The GRPO LightningModule: one training step is rollout → rewards → advantages → loss → step → sync.

The mathematics lives in :mod:`grpo_lightning.algorithm`; generation in :mod:`grpo_lightning.rollout`.
This module owns what ties them together: the models, the optimizer and its schedule, micro-batching
(gradient accumulation) and metrics. It uses manual optimization because one step interleaves
generation, scoring and (with μ > 1) several optimizer updates over the same rollouts.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric

from grpo_lightning.algorithm import (
    LOSS_TYPES,
    MISMATCH_MODES,
    AdvantageScale,
    ImportanceLevel,
    LossType,
    MismatchMode,
    constant_groups,
    group_advantages,
    group_std,
    head_token_logprobs,
    high_entropy_mask,
    loss_weights,
    mismatch_weights,
    policy_loss,
    token_logprobs,
)
from grpo_lightning.batch import SequenceBatch, pack_sequences, pad_rows
from grpo_lightning.data import OnLongPrompt, Problem, PromptStyle, collate_problems, encode_prompt, prompt_messages
from grpo_lightning.evaluation import evaluate
from grpo_lightning.export import save_hf_folder, write_atomic
from grpo_lightning.models import (
    LoRAConfig,
    ModelConfig,
    apply_lora,
    check_loadable,
    gathered,
    has_plain_attention,
    load_causal_lm,
    load_tokenizer,
    merged_weights,
    model_with_weights,
    plain_output_head,
    shard,
)
from grpo_lightning.preflight import PreflightError, preflight, sample_problems
from grpo_lightning.rewards import (
    NOTEBOOK_REWARDS,
    SYSTEM_PROMPT,
    RewardBreakdown,
    RewardState,
    extract_xml_answer,
    resolve_reward,
    score_groups,
    reward_name,
)
from grpo_lightning.rollout import Rollout, RolloutEngine, SamplingConfig, VLLMConfig, make_engine
from grpo_lightning.shared_prompt import shared_prompt_outputs


@dataclass
class GRPOConfig:
    """The algorithm's settings (defaults: the notebook's TRL run)."""

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
    """Only this top share of each micro-batch's tokens by policy entropy enters the policy term (1.0: all; paper 0.2)."""
    disable_dropout: bool = True
    """Switch dropout off in the policy (not in LoRA adapters), so the ratio and KL compare like with like."""
    advantage_scale: AdvantageScale = "group"
    """Divide advantages by the group's std ("group"), the batch's ("batch") or not at all ("none")."""
    num_iterations: int = 1
    """μ: optimizer updates per rollout batch; > 1 reuses rollouts with stored old log-probs."""
    gradient_accumulation_steps: int = 4
    """Micro-batches each step's N = B·G sequences are split into (must divide N)."""
    max_grad_norm: float = 0.1
    """Clip the global gradient norm to this value (0: no clipping)."""
    max_prompt_length: int = 256
    """Longest prompt in tokens."""
    on_long_prompt: OnLongPrompt = "truncate"
    """Longer prompts are left-truncated with a warning ("truncate") or rejected ("raise")."""
    mask_truncated_completions: bool = False
    """Leave completions cut at max_tokens out of the loss."""
    importance_sampling_cap: float | None = None
    """Correct the rollout engine's log-prob mismatch with ratios π_old/π_rollout bounded by this cap (None: off)."""
    importance_sampling_mode: MismatchMode = "token_truncate"
    """How importance_sampling_cap applies: per token or per sequence, truncating at the cap or masking above it."""
    dynamic_sampling_max_rounds: int = 0
    """DAPO dynamic sampling: groups with all-equal rewards make way for new prompts' groups, up to this many rounds."""
    system_prompt: str = SYSTEM_PROMPT
    """System turn of every prompt (default: the notebook's format instructions)."""
    user_template: str = "{question}"
    """User turn of every prompt; {question} is replaced by the question."""
    reward_funcs: list[str] = field(default_factory=lambda: [reward_name(f) for f in NOTEBOOK_REWARDS])
    """Reward functions: names from grpo_lightning.rewards or import paths 'package.module:function'."""
    reward_weights: list[float] | None = None
    """One weight per reward function (None: all 1)."""
    strict_seed_semantics: bool = False
    """Reproduce the notebook's reward functions exactly, defects included."""
    on_reward_error: Literal["raise", "zero"] = "raise"
    """A reward function that fails stops training ("raise") or scores 0 with a warning ("zero")."""
    reward_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for every reward function, e.g. {soft_cache_len: 50} for soft_overlong_punishment."""
    fused_logprobs: bool = True
    """Compute token log-probs from hidden states and the output head in chunks, never holding [N, T, V] logits."""
    logprob_chunk_size: int = 1024
    """Rows of N·T per chunk of the log-prob computation (peak extra memory ≈ chunk × V floats)."""
    share_prompt_forward: bool = True
    """Run each distinct prompt once per micro-batch and let its completions share its keys/values (exact)."""
    log_samples_every_n_steps: int = 10
    """Keep a table of sample completions every N steps for the SampleTable callback (0: never)."""
    preflight: Literal["off", "warn", "raise"] = "warn"
    """Before the first step, sample a few prompts × G and check that enough groups have reward differences."""
    preflight_prompts: int = 8
    """Training prompts the preflight samples (G completions each)."""
    preflight_min_signal: float = 0.25
    """Least share of preflight groups with reward differences; fewer warns or raises (see `grpo preflight`)."""


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay (defaults: the notebook)."""

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


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear 0 → 1 over warmup, then cosine 1 → ``min_ratio`` (HF's schedule)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


PROGRESS_BAR = ("train/reward", "train/kl")
EVAL_METRICS = {  # logged name → per-problem record field of grpo_lightning.evaluation
    "accuracy": "strict_correct", "lenient_accuracy": "lenient_correct", "strict_format_rate": "strict_format",
    "soft_format_rate": "soft_format", "completion_length": "completion_tokens",
}  # fmt: skip


class GRPOModule(L.LightningModule):
    """Group Relative Policy Optimization of a causal LM on question/answer problems."""

    launch_command: str | None = None  # set by the CLI; recorded in checkpoints and model cards

    def __init__(
        self,
        policy: ModelConfig = ModelConfig(),  # noqa: B008  read-only defaults; dataclass fields appear in --help
        grpo: GRPOConfig = GRPOConfig(),  # noqa: B008
        sampling: SamplingConfig = SamplingConfig(),  # noqa: B008
        optim: OptimConfig = OptimConfig(),  # noqa: B008
        engine: Literal["hf", "vllm"] = "hf",
        vllm: VLLMConfig = VLLMConfig(),  # noqa: B008
        lora: LoRAConfig = LoRAConfig(),  # noqa: B008
    ) -> None:
        """
        Args:
            policy: The model to train (the reference model is a frozen copy of its initial weights).
            grpo: Algorithm settings.
            sampling: Rollout sampling settings.
            optim: Optimizer and learning-rate schedule.
            engine: Rollout engine: "hf" (transformers generate) or "vllm".
            vllm: Settings of the vLLM engine.
            lora: Train low-rank adapters instead of all weights (lora.rank > 0); the reference is then the base model.
        """
        super().__init__()
        self.automatic_optimization = False
        self.policy_config, self.grpo, self.sampling, self.optim = policy, grpo, sampling, optim
        self.engine_kind, self.vllm_config, self.lora = engine, vllm, lora
        validate_config(self.grpo, engine, sampling)
        self.reward_funcs = [resolve_reward(spec) for spec in self.grpo.reward_funcs]
        if self.grpo.reward_weights is not None and len(self.grpo.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"grpo.reward_weights has {len(self.grpo.reward_weights)} values for {len(self.reward_funcs)} reward_funcs"
            )
        self.save_hyperparameters()
        self.eval_metrics = torch.nn.ModuleDict(
            {f"{stage}/{name}": MeanMetric() for stage in ("val", "test") for name in EVAL_METRICS}
        )
        self.policy: Any = None
        self.reference: Any = None
        self.sharded = False  # parameters sharded across processes (FSDP2)
        self.tokenizer: Any = None
        self.engine: RolloutEngine | None = None
        self.prompt_style = PromptStyle(self.grpo.system_prompt, self.grpo.user_template)
        self.last_samples: list[dict[str, Any]] = []
        self._rng_to_restore: dict[str, Any] | None = None
        self._engine_stale = True  # the engine's weights may differ from the policy's (new engine, restored checkpoint)

    # ----------------------------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer else None
        batch_size = getattr(datamodule, "hparams", {}).get("batch_size")
        if batch_size:
            n = batch_size * self.grpo.num_generations
            if n % self.grpo.gradient_accumulation_steps:
                raise ValueError(
                    f"grpo.gradient_accumulation_steps={self.grpo.gradient_accumulation_steps} does not divide the "
                    f"{n} sequences of a step (data.batch_size={batch_size} × grpo.num_generations="
                    f"{self.grpo.num_generations}); choose a divisor of {n}"
                )

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        if self._trainer:  # one process builds the tiny demo model (or fails on a bad path); the others wait
            if self.global_rank == 0:
                check_loadable(self.policy_config)
            self.trainer.strategy.barrier("model-files")
        self.tokenizer = load_tokenizer(self.policy_config)
        self.policy = load_causal_lm(self.policy_config)
        if self.grpo.disable_dropout:  # before LoRA: the adapters keep the dropout lora.dropout asks for
            disable_dropout(self.policy)
        positions = getattr(self.policy.config, "max_position_embeddings", None)
        needed = self.grpo.max_prompt_length + self.sampling.max_tokens
        if positions and needed > positions:
            raise ValueError(
                f"grpo.max_prompt_length ({self.grpo.max_prompt_length}) + sampling.max_tokens ({self.sampling.max_tokens}) "
                f"= {needed} exceeds the model's max_position_embeddings ({positions}); lower one of them"
            )
        if self.lora.enabled:  # the reference is the same model with its adapters switched off: no copy
            self.policy = apply_lora(self.policy, self.lora)
        elif self.grpo.beta > 0:  # the initial policy, frozen (a copy: no second load, same for GGUF and Hub models)
            self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        mesh = self.sharding_mesh()
        self.sharded = mesh is not None
        if self.sharded:
            for model in (self.policy, self.reference):
                if model is not None:
                    shard(model, mesh)
            # FSDP2 checkpoints are loaded before on_load_checkpoint could add the reference (never stored) back
            self.strict_loading = self.reference is None

    def sharding_mesh(self) -> Any:
        """The data-parallel device mesh when the strategy shards parameters (ModelParallelStrategy: FSDP2)."""
        if not self._trainer:
            return None
        strategy = self.trainer.strategy
        if type(strategy).__name__ in ("FSDPStrategy", "DeepSpeedStrategy"):
            raise ValueError(
                f"trainer.strategy {type(strategy).__name__} wraps the whole module, but a GRPO step calls the policy "
                "directly (generation, reference, one backward per micro-batch). Shard with FSDP2 instead: "
                "strategy ModelParallelStrategy with data_parallel_size = the number of processes, "
                "tensor_parallel_size 1 (see the README, 'Scaling out')"
            )
        mesh = getattr(strategy, "device_mesh", None)
        if mesh is None:
            return None
        if mesh["tensor_parallel"].size() != 1:
            raise ValueError(
                f"ModelParallelStrategy: GRPO shards parameters over data-parallel processes only; set "
                f"tensor_parallel_size=1 and data_parallel_size={self.trainer.world_size} "
                f"(got {mesh['tensor_parallel'].size()} / {mesh['data_parallel'].size()})"
            )
        return mesh["data_parallel"]

    def ensure_engine(self) -> None:
        """Before the first rollout of fit, validate or test: start the engine once, and give it the policy's weights
        if they changed since (a checkpoint restores them after set-up, and sharded strategies after on_fit_start).

        Every process runs its own engine on its share of the prompts; each samples with its own seed.
        """
        if self.engine is None:
            seed = (torch.initial_seed() + self.global_rank) % 2**31
            if self.global_rank:
                torch.manual_seed(seed)  # seed_everything gave all processes the same stream
            self.engine = make_engine(
                self.engine_kind, self.policy, self.tokenizer,
                model_path=self.engine_folder(), vllm=self.vllm_config, seed=seed,
            )  # fmt: skip
        if self._engine_stale:
            self.sync_weights()

    def engine_folder(self) -> str | None:
        """The HF folder vLLM loads: the policy's own, or for a GGUF file a converted copy in the run folder."""
        if self.engine_kind != "vllm" or not self.policy_config.gguf_file:
            return self.policy_config.name_or_path
        folder = Path(self.trainer.default_root_dir) / "policy-hf"
        if self.global_rank == 0 and not (folder / "config.json").is_file():
            save_hf_folder(self.policy, self.tokenizer, folder)
        self.trainer.strategy.barrier("policy-hf")  # the other processes load what rank 0 wrote
        return str(folder)

    def exportable_policy(self) -> Any:
        """The policy as one ordinary model, for export. Sharded: gathered by all processes, built on rank 0 only."""
        if not self.sharded:
            return self.policy
        state = {name: gathered(tensor) for name, tensor in self.policy.state_dict().items()}  # collective
        if self.global_rank:
            return None
        model = model_with_weights(self.policy.config, state, self.lora)
        model.generation_config = self.policy.generation_config
        return model

    def on_validation_start(self) -> None:
        self.ensure_engine()

    def on_test_start(self) -> None:
        self.ensure_engine()

    def on_train_start(self) -> None:
        self.ensure_engine()
        if self.grpo.preflight != "off" and self.global_step == 0:
            self.run_preflight()

    def run_preflight(self) -> None:
        """The reward-signal preflight on this run's own prompts, engine and rewards; the table goes to the log."""
        datamodule = self.trainer.datamodule
        seed = getattr(datamodule, "hparams", {}).get("seed", 0)
        problems = sample_problems(datamodule.problems, self.grpo.preflight_prompts, seed)
        with torch.random.fork_rng(devices=[]):  # training samples exactly as it would without the preflight
            report = preflight(
                self.engine, self.tokenizer, problems, self.score, num_generations=self.grpo.num_generations,
                sampling=self.sampling, style=self.prompt_style, max_prompt_length=self.grpo.max_prompt_length,
            )  # fmt: skip
        log_dir = self.trainer.log_dir if self.trainer.loggers else None  # a collective under DDP: every process asks
        if self.global_rank:
            return
        rank_zero_info(report.table())
        if log_dir:
            write_atomic(Path(log_dir) / "preflight.txt", report.table() + "\n")
        advice = report.advice(self.grpo.preflight_min_signal)
        if advice:
            message = (f"preflight: only {report.signal_share:.0%} of groups have reward differences (grpo.preflight_min_signal "
                       f"= {self.grpo.preflight_min_signal:.0%}), so most steps would have zero advantages. Try: "
                       + "; ".join(advice))  # fmt: skip
            if self.grpo.preflight == "raise":
                raise PreflightError(message)
            rank_zero_warn(message)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is not None:  # resumed: sample exactly as the uninterrupted run would have
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def train(self, mode: bool = True) -> GRPOModule:
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # the reference never trains, whatever Lightning toggles
        return self

    # ------------------------------------------------------------------------------ the algorithm
    def training_step(self, batch: dict[str, list], batch_idx: int) -> None:
        step_start = time.perf_counter()
        G = self.grpo.num_generations
        rollout, rollout_seconds = self.generate(batch["question"])  # N = B·G completions
        rewards = self.score(batch, rollout)  # N totals, and each function's values
        sampled = {}
        if self.grpo.dynamic_sampling_max_rounds:  # DAPO: groups with equal rewards make way for new prompts' groups
            batch, rollout, rewards, sampled = self.dynamic_sampling(batch, rollout, rewards)
            rollout_seconds += sampled.pop("seconds")
        total = torch.tensor(rewards.total)  # [N]
        advantages = group_advantages(total, G, self.grpo.advantage_scale).to(self.device)  # [N]
        prompts = [rollout.prompt_ids[i // G] for i in range(len(rollout.completion_ids))]
        mask = self.completion_mask(rollout)  # [N, T]
        ref_logp = self.reference_logprobs(prompts, rollout) if self.grpo.beta > 0 else None
        old_logp = self.logprobs_without_grad(self.policy, prompts, rollout) if self.grpo.num_iterations > 1 else None
        for _ in range(self.grpo.num_iterations):
            stats = self.optimize(prompts, rollout, advantages, mask, old_logp, ref_logp)
        sync_seconds = self.sync_weights()
        stats.update(sampled)

        step_seconds = time.perf_counter() - step_start
        self.log_step(batch, rollout, rewards, stats, rollout_seconds, sync_seconds, step_seconds)

    def dynamic_sampling(self, batch: dict[str, list], rollout: Rollout, rewards: RewardBreakdown) -> tuple:
        """DAPO's dynamic sampling (Yu et al., 2025, arXiv:2503.14476, §3.2): a group whose rewards are all equal has
        zero advantages, so it is dropped and its slot refilled with the group of a new training prompt, over up to
        ``dynamic_sampling_max_rounds`` extra generation rounds. Slots still without signal after the last round keep
        their original group. Returns the new batch, rollout and rewards, and the round's metrics.

        New prompts are drawn at random from the training problems by a generator seeded with (data seed, process,
        step, round): no state to checkpoint, so a resumed run draws exactly what the uninterrupted run drew, and
        the data order of the sampler is untouched. Each process refills its own batch.
        """
        if self.sharded or self.vllm_config.tensor_parallel_size > 1:  # generation is collective there
            raise ValueError("grpo.dynamic_sampling_max_rounds > 0 needs each process to generate alone: it is not "
                             "supported with FSDP2 sharding or vllm.tensor_parallel_size > 1")  # fmt: skip
        G, B = rollout.group_size, len(batch["question"])
        parts = [(batch, rollout, rewards)]
        flat = constant_groups(torch.tensor(rewards.total), G).tolist()  # [B]
        refills: list[tuple[int, int]] = []  # (part, group) of new groups with signal
        seconds, rounds, generated_flat = 0.0, 0, 0
        while len(refills) < sum(flat) and rounds < self.grpo.dynamic_sampling_max_rounds:
            rounds += 1
            extra = collate_problems(self.draw_problems(sum(flat) - len(refills), rounds))
            extra_rollout, extra_seconds = self.generate(extra["question"])
            extra_rewards = self.score(extra, extra_rollout)
            seconds += extra_seconds
            parts.append((extra, extra_rollout, extra_rewards))
            extra_flat = constant_groups(torch.tensor(extra_rewards.total), G).tolist()
            refills += [(len(parts) - 1, g) for g, no_signal in enumerate(extra_flat) if not no_signal]
            generated_flat += sum(extra_flat)
        queue = iter(refills)
        chosen = [next(queue, (0, g)) if flat[g] else (0, g) for g in range(B)]  # [B] (part, group)
        new_batch = {key: [parts[p][0][key][g] for p, g in chosen] for key in batch}
        new_rollout = Rollout.from_groups([part[1] for part in parts], chosen)
        new_rewards = RewardBreakdown.from_groups([part[2] for part in parts], chosen, G)
        dropped = generated_flat + sum(flat) - sum(1 for p, g in chosen if p == 0 and flat[g])
        metrics = {"dynamic_sampling_groups_dropped": float(dropped), "dynamic_sampling_rounds": float(rounds)}
        return new_batch, new_rollout, new_rewards, {**metrics, "seconds": seconds}

    def draw_problems(self, k: int, round_: int) -> list[Problem]:
        """``k`` training problems for dynamic sampling, drawn with a generator seeded by (seed, process, step, round)."""
        datamodule = self.trainer.datamodule
        seed = getattr(datamodule, "hparams", {}).get("seed", 0)
        rng = random.Random(f"dynamic-sampling/{seed}/{self.global_rank}/{self.global_step}/{round_}")
        return [rng.choice(datamodule.problems) for _ in range(k)]

    def generate(self, questions: list[str]) -> tuple[Rollout, float]:
        prompt_ids = [
            encode_prompt(
                self.tokenizer, q, style=self.prompt_style, max_prompt_length=self.grpo.max_prompt_length,
                on_long_prompt=self.grpo.on_long_prompt,
            )
            for q in questions
        ]
        sampling = self.sampling
        if self.grpo.importance_sampling_cap is not None or self.engine_kind == "vllm":
            # vLLM returns the sampled tokens' log-probs almost for free: always log the mismatch they reveal
            sampling = dataclasses.replace(sampling, logprobs=True)
        start = time.perf_counter()
        rollout = self.engine.generate(prompt_ids, n=self.grpo.num_generations, sampling=sampling)
        if hasattr(self.engine, "sleep"):
            self.engine.sleep()  # free the KV cache while the policy trains
        return rollout, time.perf_counter() - start

    def score(self, batch: dict[str, list], rollout: Rollout) -> RewardBreakdown:
        """Rewards with TRL's calling convention: conversational prompts and completions, token ids, dataset
        columns, the training progress, and ``grpo.reward_kwargs``."""
        trainer = self.trainer if self._trainer else None
        state = RewardState(self.global_step, trainer.max_steps if trainer else 0, float(self.current_epoch))
        return score_groups(
            self.reward_funcs,
            [prompt_messages(q, self.prompt_style) for q in batch["question"]],
            rollout.texts,
            rollout.group_size,
            columns=batch,
            weights=self.grpo.reward_weights,
            on_error=self.grpo.on_reward_error,
            completion_ids=rollout.completion_ids,
            trainer_state=state,
            strict_seed_semantics=self.grpo.strict_seed_semantics,
            max_completion_len=self.sampling.max_tokens,
            **self.grpo.reward_kwargs,
        )

    def completion_mask(self, rollout: Rollout) -> torch.Tensor:  # [N, T]
        lengths = torch.tensor([len(c) for c in rollout.completion_ids])
        width = max(1, int(lengths.max()))
        mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
        if self.grpo.mask_truncated_completions:
            mask = mask * (~torch.tensor(rollout.truncated))[:, None].float()
        return mask.to(self.device)

    def sequence_logprobs(self, model: Any, seqs: SequenceBatch, with_entropy: bool = False) -> Any:  # [n, T] (,[n, T])
        """Log-probs of the completion tokens; only the positions that predict them reach the output head.
        ``with_entropy`` also returns the policy's entropy at each position, from the same chunks (no gradient)."""
        T, temperature, chunk = seqs.completion_width, self.sampling.temperature or 1.0, self.grpo.logprob_chunk_size
        fused = self.grpo.fused_logprobs and not self.sharded  # sharded: only the root's forward gathers the head
        head = plain_output_head(model) if fused else None
        decoder = model.get_decoder() if head is not None else None

        def run(input_ids, attention_mask, position_ids, past_key_values=None, keep=T + 1):  # [n, keep, H or V]
            inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=past_key_values, use_cache=False)  # the shared prompt's cache is still used
            if decoder is None:
                return model(**inputs, logits_to_keep=keep).logits
            return decoder(**inputs).last_hidden_state[:, -keep:]

        if self.grpo.share_prompt_forward and seqs.repeats_prompts and has_plain_attention(model):
            outputs = shared_prompt_outputs(model, run, seqs)  # [n, T, H or V]
        else:
            outputs = run(seqs.input_ids, seqs.attention_mask, seqs.position_ids)[:, :-1]  # position t predicts token t
        options = dict(chunk_size=chunk, with_entropy=with_entropy)
        if decoder is None:
            return token_logprobs(outputs, seqs.completion_ids, temperature, **options)
        return head_token_logprobs(outputs, head, seqs.completion_ids, temperature, **options)

    def micro_batches(self, n: int) -> list[slice]:
        size = n // self.grpo.gradient_accumulation_steps
        return [slice(start, start + size) for start in range(0, n, size)]

    def reference_logprobs(self, prompts: list, rollout: Rollout) -> torch.Tensor:  # [N, T]
        if self.reference is not None:
            return self.logprobs_without_grad(self.reference, prompts, rollout)
        with self.policy.disable_adapter():  # LoRA: the frozen base model is the initial policy
            return self.logprobs_without_grad(self.policy, prompts, rollout)

    def logprobs_without_grad(self, model: Any, prompts: list, rollout: Rollout) -> torch.Tensor:  # [N, T]
        completions = rollout.completion_ids
        width = max(1, max(len(c) for c in completions))
        out = torch.zeros(len(completions), width, device=self.device)
        # inference mode, except under FSDP2, which would then keep inference tensors as its gathered weights
        no_autograd = torch.no_grad() if self.sharded else torch.inference_mode()
        with no_autograd:
            for rows in self.micro_batches(len(completions)):
                seqs = pack_sequences(prompts[rows], completions[rows], self.tokenizer.pad_token_id).to(self.device)
                out[rows, : seqs.completion_width] = self.sequence_logprobs(model, seqs)
        return out

    def optimize(self, *step: Any) -> dict[str, float]:
        """One optimizer step over all N sequences (``step``: the inputs of :meth:`accumulate_gradients`)."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        stats = self.accumulate_gradients(*step)
        stats["lr"] = optimizer.param_groups[0]["lr"]  # the rate this update uses, before the scheduler moves it
        stats["grad_norm"] = self.clip_and_step(optimizer, scheduler)
        return stats

    def accumulate_gradients(
        self,
        prompts: list[list[int]],
        rollout: Rollout,
        advantages: torch.Tensor,  # [N]
        mask: torch.Tensor,  # [N, T]
        old_logp: torch.Tensor | None,  # [N, T]
        ref_logp: torch.Tensor | None,  # [N, T]
    ) -> dict[str, float]:
        """Forward and backward of every micro-batch: the step's gradient in ``.grad``, and token-averaged stats."""
        completions = rollout.completion_ids
        weights = self.token_weights(mask)  # [N, T]
        rollout_logp = pad_rows(rollout.logprobs, mask.shape[1]).to(self.device) if rollout.logprobs else None  # [N, T]
        keys = ("kl", "clip_ratio_low", "clip_ratio_high", "is_ratio", "entropy", "logprob_diff_mean")
        sums = dict.fromkeys(keys, 0.0)  # token-weighted over micro-batches
        loss_sum, tokens, diff_max = 0.0, 0.0, 0.0
        batches = self.micro_batches(len(completions))
        for rows in batches:
            seqs = pack_sequences(prompts[rows], completions[rows], self.tokenizer.pad_token_id).to(self.device)
            width = seqs.completion_width
            logp, entropy = self.sequence_logprobs(self.policy, seqs, with_entropy=True)  # [n, T] each
            old = logp.detach() if old_logp is None else old_logp[rows, :width]
            m = mask[rows, :width]
            engine_logp = None if rollout_logp is None else rollout_logp[rows, :width]
            mismatch = self.mismatch_correction(old, engine_logp, m)  # [n, T], [n, 1] or None
            quantile = self.grpo.top_entropy_quantile
            keep = high_entropy_mask(entropy, m, quantile) if quantile < 1 else None  # [n, T] or None
            loss, stats = policy_loss(
                logp,
                old,
                advantages[rows],
                m,
                ref_logp=None if ref_logp is None else ref_logp[rows, :width],
                beta=self.grpo.beta,
                epsilon_low=self.grpo.epsilon_low,
                epsilon_high=self.grpo.epsilon_high,
                loss_type=self.grpo.loss_type,
                weights=weights[rows, :width],
                token_scale=_product(mismatch, keep),
                importance_sampling_level=self.grpo.importance_sampling_level,
                kl_times_ratio=self.grpo.use_bias_correction_kl,
            )
            with self.gradient_sync(rows is batches[-1]):
                self.manual_backward(loss) if self._trainer else loss.backward()  # no Trainer (tests): plain autograd
            n_tokens = float(stats["num_tokens"])
            stats["entropy"] = (entropy * m).sum() / max(n_tokens, 1.0)
            if mismatch is not None:
                stats["is_ratio"] = (mismatch.expand_as(m) * m).sum() / max(n_tokens, 1.0)
            if engine_logp is not None:  # the engine's log-probs against the trainer's, correction or not
                diff = (old - engine_logp).abs() * m
                stats["logprob_diff_mean"] = diff.sum() / max(n_tokens, 1.0)
                diff_max = max(diff_max, float(diff.max()))
            loss_sum += loss.item()
            tokens += n_tokens
            for key in sums:
                sums[key] += float(stats.get(key, 0.0)) * n_tokens
        result = {"loss": loss_sum, **{key: value / max(tokens, 1.0) for key, value in sums.items()}}
        result["logprob_diff_max"] = diff_max
        return result

    def token_weights(self, mask: torch.Tensor) -> torch.Tensor:  # [N, T]
        """This process's share of the step's loss normalisation (see :func:`loss_weights`).

        Data-parallel strategies average gradients over the W processes. "grpo" and "dr_grpo" divide by the
        local sequence count N/W, so the average is exactly the one-process loss; "dapo" divides by the
        global token count, times W to undo the average; "bnpo" uses each process's own token count (TRL's), of
        the whole step or, with ``bnpo_per_micro_batch``, of each micro-batch (TRL's under gradient accumulation).
        """
        num_tokens, world = None, self.trainer.world_size if self._trainer else 1
        if self.grpo.loss_type == "dapo" and world > 1:
            num_tokens = float(self.trainer.strategy.reduce(mask.sum(), reduce_op="sum")) / world
        micro_batches = self.grpo.gradient_accumulation_steps if self.grpo.bnpo_per_micro_batch else 1
        return loss_weights(mask, self.grpo.loss_type, max_completion_length=self.sampling.max_tokens,
                            num_tokens=num_tokens, micro_batches=micro_batches)  # fmt: skip

    def gradient_sync(self, enabled: bool) -> Any:
        """Gradients are averaged across processes on the last micro-batch only; the others accumulate locally."""
        if self.sharded:  # FSDP2: Lightning's block_backward_sync is DDP's; FSDP2 modules have their own switch
            fsdp_root = next(m for m in self.policy.modules() if hasattr(m, "set_requires_gradient_sync"))
            fsdp_root.set_requires_gradient_sync(enabled)
            return contextlib.nullcontext()
        block = getattr(self.trainer.strategy, "block_backward_sync", None) if self._trainer else None
        return contextlib.nullcontext() if enabled or block is None else block()

    def mismatch_correction(self, old_logp: torch.Tensor, rollout_logp: torch.Tensor | None, mask: torch.Tensor):
        """π_old/π_rollout bounded by the cap (see :func:`mismatch_weights`): corrects for the engine sampling from
        slightly other numbers than the trainer computes. None when off or the engine returned no log-probs."""
        if self.grpo.importance_sampling_cap is None or rollout_logp is None:
            return None
        grpo = self.grpo
        return mismatch_weights(old_logp, rollout_logp, mask, grpo.importance_sampling_mode, grpo.importance_sampling_cap)

    def clip_and_step(self, optimizer: Any, scheduler: Any) -> float:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        max_norm = self.grpo.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        grad_norm = gathered(grad_norm)  # sharded gradients give a sharded norm
        if not torch.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"non-finite gradient norm at step {self.global_step}: the update was not applied. Resume from the last "
                "checkpoint with a lower model.optim.lr, or trainer.precision: bf16-mixed instead of bf16-true"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return float(grad_norm)

    def sync_weights(self) -> float:
        """Push the updated policy into the rollout engine; returns the seconds it took."""
        start = time.perf_counter()
        if getattr(self.engine, "model", None) is not self.policy:  # an engine generating with the live policy needs none
            self.engine.update_weights(merged_weights(self.policy))  # LoRA: W + (α/r)·B·A under the base names
        self._engine_stale = False
        return time.perf_counter() - start

    # ------------------------------------------------------------------------------ evaluation
    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        self.evaluate_batch(batch, "val")

    def test_step(self, batch: dict[str, list], batch_idx: int) -> None:
        self.evaluate_batch(batch, "test")

    def evaluate_batch(self, batch: dict[str, list], stage: str) -> None:
        """Greedy answers graded exactly as `grpo evaluate` grades them; logged as `<stage>/accuracy` etc."""
        problems = [Problem(q, a, i) for q, a, i in zip(batch["question"], batch["answer"], batch["index"])]
        records = evaluate(
            self.engine, self.tokenizer, problems, max_tokens=self.sampling.max_tokens, batch_size=len(problems),
            max_prompt_length=self.grpo.max_prompt_length, style=self.prompt_style, progress=False,
        )  # fmt: skip
        for name, field_name in EVAL_METRICS.items():
            metric = self.eval_metrics[f"{stage}/{name}"]
            metric.update(torch.tensor([float(r[field_name]) for r in records]))
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "accuracy", batch_size=len(records))

    # ------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        validate_optim(self.optim)
        decay = [p for p in self.policy.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.policy.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.optim.lr,
            betas=tuple(self.optim.betas),
        )
        total = self.total_optimizer_steps()
        warmup = math.ceil(self.optim.warmup_ratio * total)
        schedule = lambda step: warmup_cosine(step, total, warmup, self.optim.min_lr_ratio)  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        scheduler.plan = {"total_steps": total, "warmup_steps": warmup}  # saved in its state_dict: resuming compares
        self._refit_resumed_schedule(scheduler)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def total_optimizer_steps(self) -> int:
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        return max(1, int(trainer.estimated_stepping_batches) * self.grpo.num_iterations)

    def _refit_resumed_schedule(self, scheduler: Any) -> None:
        """Resuming with another step budget (a larger ``trainer.max_steps``): the warmup + cosine is stretched to the
        new total, with a warning saying so, and the restored learning rate is the new schedule's at the resumed
        step. Without this the first resumed step ran at the old schedule's last rate (0.0), then jumped.

        Called with the checkpoint's scheduler state (``on_load_checkpoint``) and the new scheduler
        (``configure_optimizers``), in whichever order the strategy runs them; edits the state before it is loaded.
        """
        resumed = getattr(self, "_resumed_schedule", None)
        if resumed is None or scheduler is None:
            return
        self._resumed_schedule = None
        state, param_groups = resumed
        step, before = state.get("last_epoch", 0), state.get("plan")  # no plan: a checkpoint from before it was saved
        lrs = [base * scheduler.lr_lambdas[0](step) for base in state.get("base_lrs", scheduler.base_lrs)]
        if before is not None and before != scheduler.plan:
            old = param_groups[0]["lr"] if param_groups else float("nan")
            rank_zero_warn(
                f"resuming at optimizer step {step}: the learning-rate schedule was planned for "
                f"{before['total_steps']} steps (warmup {before['warmup_steps']}) and now spans "
                f"{scheduler.plan['total_steps']} (warmup {scheduler.plan['warmup_steps']}; trainer.max_steps or "
                f"model.optim changed). The cosine is stretched to the new length: the learning rate goes from "
                f"{old:.4g} to {lrs[0]:.4g} at this step"
            )
        state.update(plan=scheduler.plan, _last_lr=lrs)
        for group, lr in zip(param_groups, lrs):
            group["lr"] = lr
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):  # strategies that restored the optimizer already
            group["lr"] = lr

    # -------------------------------------------------------------------------------- logging
    def log_step(
        self, batch, rollout: Rollout, rewards: RewardBreakdown, stats: dict, rollout_s: float, sync_s: float, step_s: float
    ) -> None:
        G = rollout.group_size
        total = torch.tensor(rewards.total)  # [N]; NaN: no reward function applied
        lengths = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float32)
        values = {
            "train/reward": total.nanmean().nan_to_num(0.0),
            "train/reward_std": group_std(total, G).mean(),
            "train/frac_reward_zero_std": constant_groups(total, G).float().mean(),
            "train/entropy": stats["entropy"],
            "train/completion_length": lengths.mean(),
            "train/truncated_fraction": torch.tensor(rollout.truncated, dtype=torch.float32).mean(),
            "train/kl": stats["kl"],
            "train/clip_ratio/low": stats["clip_ratio_low"],
            "train/clip_ratio/high": stats["clip_ratio_high"],
            "train/loss": stats["loss"],
            "train/grad_norm": stats["grad_norm"],
            "train/lr": stats["lr"],
            "train/tokens_per_second": rollout.num_tokens / max(step_s, 1e-9),
            "rollout/seconds": rollout_s,
            "rollout/sync_seconds": sync_s,
        }
        if self.grpo.importance_sampling_cap is not None:
            values["rollout/is_ratio"] = stats["is_ratio"]
        if rollout.logprobs is not None:
            values["rollout/logprob_diff_mean"] = stats["logprob_diff_mean"]
        if self.grpo.dynamic_sampling_max_rounds:
            values["train/dynamic_sampling/groups_dropped"] = stats["dynamic_sampling_groups_dropped"]
            values["train/dynamic_sampling/rounds"] = stats["dynamic_sampling_rounds"]
        for name, per_fn in rewards.per_function.items():  # None ("not applicable") is NaN: left out of the mean
            values[f"train/rewards/{name}"] = torch.tensor(per_fn).nanmean().nan_to_num(0.0)
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in values.values()]).to(self.device)
        means = self.trainer.strategy.reduce(stacked, reduce_op="mean")  # over processes: one collective per step
        for name, value in zip(values, means.tolist()):
            self.log(name, value, on_step=True, on_epoch=False, prog_bar=name in PROGRESS_BAR, batch_size=len(batch["question"]))
        options = dict(on_step=True, on_epoch=False, batch_size=len(batch["question"]))
        if rollout.logprobs is not None:
            diff_max = torch.tensor(stats["logprob_diff_max"], device=self.device)
            self.log("rollout/logprob_diff_max", float(self.trainer.strategy.reduce(diff_max, reduce_op="max")), **options)
        for name, logged in rewards.metrics.items():  # a reward function's log_metric: this process's mean
            self.log(f"train/{name}", sum(logged) / len(logged), **options)
        every = self.grpo.log_samples_every_n_steps
        if every and self.global_step % every == 0:
            self.last_samples = self.sample_rows(batch, rollout, rewards)

    def sample_rows(self, batch: dict[str, list], rollout: Rollout, rewards: RewardBreakdown, per_prompt: int = 2) -> list[dict]:
        """A few completions per prompt with their rewards, for the SampleTable callback."""
        rows = []
        for g, (question, answer) in enumerate(zip(batch["question"], batch["answer"])):
            for i in range(g * rollout.group_size, g * rollout.group_size + min(per_prompt, rollout.group_size)):
                per_function = {name: values[i] for name, values in rewards.per_function.items()}
                rows.append(
                    {
                        "step": self.global_step,
                        "question": question,
                        "expected": answer,
                        "completion": rollout.texts[i],
                        "extracted": extract_xml_answer(rollout.texts[i]),
                        "reward": rewards.total[i],
                        **per_function,
                        **{column: values[i] for column, values in rewards.extra.items() if i < len(values)},
                    }
                )
        return rows

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The reference model is the initial policy: reloaded from `policy.name_or_path`, never stored.
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("reference.")]:
            del state[key]
        # Enough to rebuild the policy and its model card without the base weights (`grpo export`).
        checkpoint["hf_config"] = self.policy.config.to_dict()
        checkpoint["grpo_lightning"] = self.training_record()
        checkpoint["rng_state"] = all_processes(rng_state())

    def training_record(self) -> dict[str, Any]:
        """How this policy was trained, as plain data: base model, data, command, settings, rewards."""
        datamodule = self.trainer.datamodule if self._trainer else None
        data = _plain(getattr(datamodule, "hparams", {}))
        return {
            "base_model": self.policy_config.name_or_path,
            "dataset": data.get("source"),
            "command": self.launch_command or shlex.join(["python", *sys.argv]),
            "global_step": self.global_step,
            "reward_funcs": list(self.grpo.reward_funcs),
            "hyperparameters": {"model": _plain(self.hparams), "data": data,
                                "precision": str(self.trainer.precision) if self._trainer else None},
        }  # fmt: skip

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._engine_stale = True
        schedulers, optimizers = checkpoint.get("lr_schedulers") or [], checkpoint.get("optimizer_states") or []
        if schedulers and optimizers:  # refitted to this run's step budget before Lightning loads them
            self._resumed_schedule = schedulers[0], optimizers[0].get("param_groups", [])
            configs = self._trainer.lr_scheduler_configs if self._trainer else []
            self._refit_resumed_schedule(configs[0].scheduler if configs else None)  # FSDP2 configures optimizers first
        states = checkpoint.get("rng_state")  # one per process
        states = [states] if isinstance(states, dict) else states or []
        self._rng_to_restore = states[self.global_rank] if self.global_rank < len(states) else None
        if self.reference is not None and not self.sharded:  # strict loading expects every key of the module
            checkpoint["state_dict"].update({f"reference.{k}": v for k, v in self.reference.state_dict().items()})


def validate_config(grpo: GRPOConfig, engine: str, sampling: SamplingConfig = SamplingConfig()) -> None:  # noqa: B008
    """Reject impossible settings before any model is loaded, saying what to change."""
    problems = []
    if sampling.temperature == 0:
        problems.append("sampling.temperature=0 samples greedily: all G completions of a prompt are identical, every "
                        "advantage is 0 and nothing is learned. Use a temperature > 0 (the notebook's 0.9)")  # fmt: skip
    if grpo.num_generations < 2:
        problems.append(f"grpo.num_generations={grpo.num_generations}: GRPO compares completions within a group, use ≥ 2")
    if grpo.loss_type not in LOSS_TYPES:
        problems.append(f"grpo.loss_type={grpo.loss_type!r}: use one of {LOSS_TYPES}")
    if grpo.beta < 0:
        problems.append(f"grpo.beta={grpo.beta}: the KL coefficient must be ≥ 0")
    if grpo.num_iterations < 1:
        problems.append(f"grpo.num_iterations={grpo.num_iterations}: use ≥ 1")
    if grpo.gradient_accumulation_steps < 1:
        problems.append(f"grpo.gradient_accumulation_steps={grpo.gradient_accumulation_steps}: use ≥ 1")
    if grpo.epsilon_low < 0 or grpo.epsilon_high < 0:
        problems.append("grpo.epsilon_low and grpo.epsilon_high must be ≥ 0")
    if grpo.logprob_chunk_size < 1:
        problems.append(f"grpo.logprob_chunk_size={grpo.logprob_chunk_size}: use ≥ 1 (e.g. 1024)")
    if not 0 <= grpo.top_entropy_quantile <= 1:
        problems.append(f"grpo.top_entropy_quantile={grpo.top_entropy_quantile}: use a share in [0, 1] (1: all tokens)")
    if grpo.importance_sampling_level not in ("token", "sequence"):
        problems.append(f"grpo.importance_sampling_level={grpo.importance_sampling_level!r}: use 'token' or 'sequence'")
    if grpo.importance_sampling_mode not in MISMATCH_MODES:
        problems.append(f"grpo.importance_sampling_mode={grpo.importance_sampling_mode!r}: use one of {MISMATCH_MODES}")
    if grpo.importance_sampling_cap is not None and grpo.importance_sampling_cap <= 0:
        problems.append(f"grpo.importance_sampling_cap={grpo.importance_sampling_cap}: use a cap > 0 (e.g. 2) or null")
    if grpo.dynamic_sampling_max_rounds < 0:
        problems.append(f"grpo.dynamic_sampling_max_rounds={grpo.dynamic_sampling_max_rounds}: use ≥ 0 (0: off)")
    if grpo.preflight_prompts < 1 or not 0 <= grpo.preflight_min_signal <= 1:
        problems.append("grpo.preflight_prompts must be ≥ 1 and grpo.preflight_min_signal in [0, 1]")
    if engine not in ("hf", "vllm"):
        problems.append(f"engine={engine!r}: use 'hf' or 'vllm'")
    if problems:
        raise ValueError("invalid GRPO configuration:\n  " + "\n  ".join(problems))


def validate_optim(optim: OptimConfig) -> None:
    """Reject optimizer settings torch would refuse with a message that does not name the setting."""
    problems = []
    if not optim.lr > 0:
        problems.append(f"model.optim.lr={optim.lr}: the peak learning rate must be > 0 (the notebook's: 5e-6)")
    if len(optim.betas) != 2 or not all(0 <= b < 1 for b in optim.betas):
        problems.append(f"model.optim.betas={list(optim.betas)}: two values in [0, 1), e.g. [0.9, 0.99]")
    if optim.weight_decay < 0:
        problems.append(f"model.optim.weight_decay={optim.weight_decay}: must be ≥ 0")
    if not 0 <= optim.warmup_ratio <= 1 or not 0 <= optim.min_lr_ratio <= 1:
        problems.append("model.optim.warmup_ratio and model.optim.min_lr_ratio must be in [0, 1]")
    if problems:
        raise ValueError("invalid optimizer configuration:\n  " + "\n  ".join(problems))


def disable_dropout(model: Any) -> None:
    """Every dropout layer of ``model`` set to p = 0 (TRL's ``disable_dropout_in_model``), and the attention dropout
    that transformers' attention layers apply as a float attribute (Qwen2, Llama), which TRL's misses."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _product(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a * b


def rng_state() -> dict[str, Any]:
    """The random generators rollouts draw from (torch CPU and CUDA, Python's ``random``)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def all_processes(value: Any) -> list[Any]:
    """``value`` from every process, in rank order (``[value]`` without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    values: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(value: Any) -> Any:
    """Dataclasses and mappings as JSON-like data (what ``torch.load(weights_only=True)`` accepts)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
