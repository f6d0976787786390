"""The GRPO LightningModule: one training step is rollout → rewards → advantages → loss → step → sync.

The mathematics lives in :mod:`grpo_lightning.algorithm`, the log-probs in :mod:`grpo_lightning.logprobs`, the
engine's life in :mod:`grpo_lightning.rollout_worker`, the settings in :mod:`grpo_lightning.config`. This module
ties them together with the models, the optimizer and its schedule, micro-batching and logging. It uses manual
optimization because one step interleaves generation, scoring and (with μ > 1) several optimizer updates.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric

from grpo_lightning.algorithm import group_advantages, high_entropy_mask, loss_weights, mismatch_weights, policy_loss
from grpo_lightning.batch import completion_mask, pad_rows
from grpo_lightning.callbacks import ResumeState, RewardPreflight
from grpo_lightning.config import (
    GRPOConfig,
    OptimConfig,
    PerformanceConfig,
    PromptConfig,
    RewardConfig,
    refuse_greedy_training,
)
from grpo_lightning.data import Problem, collate_problems, encode_prompt, prompt_messages
from grpo_lightning.distributed import gathered, gathered_values, gradient_sync, shard, sharding_mesh
from grpo_lightning.dynamic_sampling import check_dynamic_sampling_metric, draw_problems, refill_flat_groups
from grpo_lightning.evaluation import PROBLEM_METRICS, evaluate, problem_metrics
from grpo_lightning.logprobs import completion_logprobs, micro_batches, pack, sequence_logprobs
from grpo_lightning.metrics import PROGRESS_BAR, StepRecord, StepStats, step_metrics
from grpo_lightning.models import LoRAConfig, ModelConfig, check_loadable, load_policy, load_tokenizer
from grpo_lightning.optimization import adamw_warmup_cosine, refit_resumed_schedule
from grpo_lightning.rewards import RewardBreakdown, RewardState, resolve_reward, score_groups
from grpo_lightning.rollout import Rollout, SamplingConfig, VLLMConfig
from grpo_lightning.rollout_worker import RolloutWorker


class GRPOModule(L.LightningModule):
    """Group Relative Policy Optimization of a causal LM on question/answer problems."""

    launch_command: str | None = None  # set by the CLI; recorded in checkpoints and model cards

    def __init__(
        self,
        policy: ModelConfig = ModelConfig(),  # noqa: B008  dataclass defaults appear in --help; never mutated
        grpo: GRPOConfig = GRPOConfig(),  # noqa: B008
        prompt: PromptConfig = PromptConfig(),  # noqa: B008
        rewards: RewardConfig = RewardConfig(),  # noqa: B008
        sampling: SamplingConfig = SamplingConfig(),  # noqa: B008
        optim: OptimConfig = OptimConfig(),  # noqa: B008
        performance: PerformanceConfig = PerformanceConfig(),  # noqa: B008
        engine: Literal["hf", "vllm"] = "hf",
        vllm: VLLMConfig = VLLMConfig(),  # noqa: B008
        lora: LoRAConfig = LoRAConfig(),  # noqa: B008
    ) -> None:
        """
        Args:
            policy: The model to train (the reference model is a frozen copy of its initial weights).
            grpo: The algorithm.
            prompt: How a question becomes the prompt.
            rewards: Reward functions, their weights, and the reward-signal preflight.
            sampling: Rollout sampling settings.
            optim: Optimizer, learning-rate schedule and gradient clipping.
            performance: How log-probs are computed (speed and memory only).
            engine: Rollout engine: "hf" (transformers generate) or "vllm".
            vllm: Settings of the vLLM engine.
            lora: Train low-rank adapters instead of all weights (lora.rank > 0); the reference is then the base model.
        """
        super().__init__()
        refuse_greedy_training(sampling)
        self.automatic_optimization = False
        self.policy_config, self.grpo, self.prompt, self.rewards = policy, grpo, prompt, rewards
        self.sampling, self.optim, self.performance, self.lora = sampling, optim, performance, lora
        self.reward_funcs = [resolve_reward(spec) for spec in rewards.funcs]
        check_dynamic_sampling_metric(grpo.dynamic_sampling_metric, self.reward_funcs)
        self.save_hyperparameters()
        self.eval_metrics = torch.nn.ModuleDict({f"{s}/{n}": MeanMetric() for s in ("val", "test") for n in PROBLEM_METRICS})  # fmt: skip
        # vLLM returns the sampled tokens' log-probs almost for free: the mismatch they reveal is always logged
        wants_logprobs = sampling.logprobs or grpo.importance_sampling_cap is not None or engine == "vllm"
        self.rollout_sampling = dataclasses.replace(sampling, logprobs=wants_logprobs)
        self.rollout = RolloutWorker(engine, vllm)
        self.policy: Any = None
        self.reference: Any = None  # frozen initial policy (None with LoRA: the base model with adapters off)
        self.tokenizer: Any = None
        self.sharded = False  # parameters sharded across processes (FSDP2)
        self.last_step: StepRecord | None = None
        self._resumed_schedule: tuple | None = None

    def setup(self, stage: str) -> None:
        batch_size = getattr(self.trainer.datamodule, "hparams", {}).get("batch_size") if self._trainer else None
        if batch_size:
            self.grpo.micro_batch_size(batch_size * self.grpo.num_generations)  # refuses a non-divisor now, not mid-run

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        if self._trainer:  # one process builds the tiny demo model (or fails on a bad path); the others wait
            if self.global_rank == 0:
                check_loadable(self.policy_config)
            self.trainer.strategy.barrier("model-files")
        self.tokenizer = load_tokenizer(self.policy_config)
        self.policy, self.reference = load_policy(self.policy_config, self.lora, reference=self.grpo.beta > 0,
                                                  no_dropout=self.grpo.disable_dropout,
                                                  context=self.prompt.max_prompt_length + self.sampling.max_tokens)  # fmt: skip
        mesh = sharding_mesh(self.trainer.strategy, self.trainer.world_size) if self._trainer else None
        self.sharded = mesh is not None
        for model in (self.policy, self.reference) if self.sharded else ():
            shard(model, mesh) if model is not None else None
        # FSDP2 checkpoints are loaded before on_load_checkpoint could add the reference (never stored) back
        self.strict_loading = not (self.sharded and self.reference is not None)

    def start_rollout(self) -> None:
        """Before the first rollout of fit, validate or test: start this process's engine (own sampling seed) once,
        and give it the policy's weights if they changed since (a restored checkpoint, sharding after set-up)."""
        seed = (torch.initial_seed() + self.global_rank) % 2**31
        if self.rollout.engine is None and self.global_rank:
            torch.manual_seed(seed)  # seed_everything gave all processes the same stream
        trainer = self.trainer
        model_path = lambda: self.rollout.hf_folder(  # noqa: E731
            check_loadable(self.policy_config), self.policy, self.tokenizer, trainer.default_root_dir,
            writer=self.global_rank == 0, barrier=lambda: trainer.strategy.barrier("policy-hf"))  # fmt: skip
        self.rollout.start(self.policy, self.tokenizer, seed=seed, model_path=model_path)

    on_train_start = on_validation_start = on_test_start = start_rollout

    def train(self, mode: bool = True) -> GRPOModule:
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # the reference never trains, whatever Lightning toggles
        return self

    def training_step(self, batch: dict[str, list], batch_idx: int) -> None:
        step_start, G = time.perf_counter(), self.grpo.num_generations
        rollout, rollout_seconds = self.generate(batch["question"])  # N = B·G completions
        rewards = self.score(batch, rollout)  # N totals, and each function's values
        refill = {}
        if self.grpo.dynamic_sampling_max_rounds:  # DAPO: groups with equal rewards make way for new prompts' groups
            batch, rollout, rewards, refill, seconds = refill_flat_groups(
                batch, rollout, rewards, max_rounds=self.grpo.dynamic_sampling_max_rounds, draw=self.draw_problems,
                sample=self.sample, metric=self.grpo.dynamic_sampling_metric)  # fmt: skip
            rollout_seconds += seconds
        advantages = group_advantages(torch.tensor(rewards.total), G, self.grpo.advantage_scale).to(self.device)  # [N]
        prompts = rollout.row_prompts()  # N
        drop = rollout.truncated if self.grpo.mask_truncated_completions else None
        mask = completion_mask(rollout.completion_ids, drop).to(self.device)  # [N, T]
        ref_logp = self.reference_logprobs(prompts, rollout) if self.grpo.beta > 0 else None  # [N, T]
        old_logp = self.logprobs_without_grad(self.policy, prompts, rollout) if self.grpo.num_iterations > 1 else None
        for _ in range(self.grpo.num_iterations):
            stats = self.optimize(prompts, rollout, advantages, mask, old_logp, ref_logp)
        sync_seconds = self.rollout.sync(self.policy)  # the engine samples the next step from the new weights

        stats.dynamic_sampling = refill
        self.log_step(batch, rollout, rewards, stats, rollout_seconds, sync_seconds, time.perf_counter() - step_start)

    def generate(self, questions: list[str]) -> tuple[Rollout, float]:
        prompt_ids = [encode_prompt(self.tokenizer, q, style=self.prompt, max_prompt_length=self.prompt.max_prompt_length,
                                    on_long_prompt=self.prompt.on_long_prompt) for q in questions]  # fmt: skip
        return self.rollout.generate(prompt_ids, self.grpo.num_generations, self.rollout_sampling)

    def score(self, batch: dict[str, list], rollout: Rollout) -> RewardBreakdown:
        """Rewards with TRL's calling convention: conversational prompts and completions, token ids, dataset
        columns, the training progress, and ``rewards.kwargs``."""
        max_steps = self.trainer.max_steps if self._trainer else 0
        cfg = self.rewards
        return score_groups(
            self.reward_funcs, [prompt_messages(q, self.prompt) for q in batch["question"]], rollout.texts,
            rollout.group_size, columns=batch, weights=cfg.weights, on_error=cfg.on_error,
            completion_ids=rollout.completion_ids, trainer_state=RewardState(self.global_step, max_steps, float(self.current_epoch)),
            strict_seed_semantics=cfg.strict_seed_semantics, max_completion_len=self.sampling.max_tokens, **cfg.kwargs,
        )  # fmt: skip

    def sample(self, batch: dict[str, list]) -> tuple[Rollout, RewardBreakdown, float]:
        rollout, seconds = self.generate(batch["question"])
        return rollout, self.score(batch, rollout), seconds

    def draw_problems(self, k: int, round_: int) -> dict[str, list]:
        """A batch of ``k`` training problems for dynamic sampling, the same on a resumed run (seed, process, step, round)."""
        data = self.trainer.datamodule
        return collate_problems(draw_problems(data.problems, k, seed=data.hparams.get("seed", 0), rank=self.global_rank,
                                              step=self.global_step, round_=round_))  # fmt: skip

    def logprob_options(self) -> dict[str, Any]:
        return dict(temperature=self.sampling.temperature, performance=self.performance, sharded=self.sharded)

    def logprobs_without_grad(self, model: Any, prompts: list, rollout: Rollout) -> torch.Tensor:  # [N, T]
        return completion_logprobs(model, prompts, rollout.completion_ids, pad_id=self.tokenizer.pad_token_id, device=self.device,
                                   num_micro_batches=self.grpo.gradient_accumulation_steps, **self.logprob_options())  # fmt: skip

    def reference_logprobs(self, prompts: list, rollout: Rollout) -> torch.Tensor:  # [N, T]
        if self.reference is not None:
            return self.logprobs_without_grad(self.reference, prompts, rollout)
        with self.policy.disable_adapter():  # LoRA: the frozen base model is the initial policy
            return self.logprobs_without_grad(self.policy, prompts, rollout)

    def optimize(self, *step: Any) -> StepStats:
        """One optimizer step over all N sequences (``step``: the inputs of :meth:`accumulate_gradients`)."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        stats = self.accumulate_gradients(*step)
        stats.lr = optimizer.param_groups[0]["lr"]  # the rate this update uses, before the scheduler moves it
        stats.grad_norm = self.clip_and_step(optimizer, scheduler)
        return stats

    def accumulate_gradients(
        self,
        prompts: list[list[int]],  # N
        rollout: Rollout,
        advantages: torch.Tensor,  # [N]
        mask: torch.Tensor,  # [N, T]
        old_logp: torch.Tensor | None,  # [N, T]
        ref_logp: torch.Tensor | None,  # [N, T]
    ) -> StepStats:
        """Micro-batch → log-probs → policy loss → backward, for every micro-batch: the step's gradient in ``.grad``."""
        grpo, completions = self.grpo, rollout.completion_ids
        weights = self.token_weights(mask)  # [N, T]
        rollout_logp = pad_rows(rollout.logprobs, mask.shape[1]).to(self.device) if rollout.logprobs else None  # [N, T]
        stats, batches = StepStats(), micro_batches(len(completions), grpo.gradient_accumulation_steps)
        for rows in batches:
            seqs = pack(prompts, completions, rows, self.tokenizer.pad_token_id, self.device)
            width, m = seqs.completion_width, mask[rows, : seqs.completion_width]  # m: [n, T]
            logp, entropy = sequence_logprobs(self.policy, seqs, with_entropy=True, **self.logprob_options())  # [n, T]
            old = logp.detach() if old_logp is None else old_logp[rows, :width]
            engine_logp = None if rollout_logp is None else rollout_logp[rows, :width]
            mismatch = None  # π_old/π_rollout: the engine samples from slightly other numbers than the trainer computes
            if grpo.importance_sampling_cap is not None and engine_logp is not None:
                mismatch = mismatch_weights(
                    old, engine_logp, m, grpo.importance_sampling_mode, grpo.importance_sampling_cap
                )
            pool = gathered_values(entropy[m.bool()]) if grpo.top_entropy_quantile < 1 else None  # all processes'
            keep = high_entropy_mask(entropy, m, grpo.top_entropy_quantile, pool) if pool is not None else None
            scale = keep if mismatch is None else mismatch if keep is None else mismatch * keep
            loss, values = policy_loss(
                logp, old, advantages[rows], m, ref_logp=None if ref_logp is None else ref_logp[rows, :width],
                beta=grpo.beta, epsilon_low=grpo.epsilon_low, epsilon_high=grpo.epsilon_high, loss_type=grpo.loss_type,
                weights=weights[rows, :width], token_scale=scale, importance_sampling_level=grpo.importance_sampling_level,
                kl_times_ratio=grpo.use_bias_correction_kl,
            )  # fmt: skip
            with gradient_sync(self.policy, self._trainer and self.trainer.strategy, self.sharded, rows is batches[-1]):
                self.manual_backward(loss) if self._trainer else loss.backward()  # no Trainer (tests): plain autograd
            stats.add(loss.detach(), values, m, entropy, mismatch, old, engine_logp)
        return stats

    def token_weights(self, mask: torch.Tensor) -> torch.Tensor:  # [N, T]
        """This process's share of the step's loss normalisation (:func:`loss_weights`), such that averaging gradients
        over W processes gives the one-process loss ("dapo": the global token count; docs/algorithm.md §5)."""
        num_tokens, world = None, self.trainer.world_size if self._trainer else 1
        if self.grpo.loss_type == "dapo" and world > 1:
            num_tokens = float(self.trainer.strategy.reduce(mask.sum(), reduce_op="sum")) / world
        micro_batches = self.grpo.gradient_accumulation_steps if self.grpo.bnpo_per_micro_batch else 1
        return loss_weights(mask, self.grpo.loss_type, max_completion_length=self.sampling.max_tokens,
                            num_tokens=num_tokens, micro_batches=micro_batches)  # fmt: skip

    def clip_and_step(self, optimizer: Any, scheduler: Any) -> float:
        """The update and the schedule's step; returns the gradient norm before clipping."""
        optimizer.step()  # Lightning calls on_before_optimizer_step (the clip) once the gradients are unscaled
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return self.grad_norm

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Clip the step's gradient to ``optim.max_grad_norm`` (Lightning clips only under automatic optimization).

        Under ``16-mixed`` the gradients carry the loss scale until unscaled: Lightning unscales before this hook,
        except for optimizers that unscale inside their step (fused AdamW), which are unscaled here."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        grad_norm = gathered(torch.nn.utils.clip_grad_norm_(params, self.optim.max_grad_norm or float("inf")))
        self.grad_norm = float(grad_norm)  # sharded gradients gave a sharded norm: gathered above
        if not math.isfinite(self.grad_norm) and scaler is None:  # a scaler skips the update and lowers its scale
            optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"non-finite gradient norm at step {self.global_step}: the update was not applied. Resume from the last "
                "checkpoint with a lower model.optim.lr, or trainer.precision: bf16-mixed instead of bf16-true"
            )

    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        self.evaluate_batch(batch, "val")

    def test_step(self, batch: dict[str, list], batch_idx: int) -> None:
        self.evaluate_batch(batch, "test")

    def evaluate_batch(self, batch: dict[str, list], stage: str) -> None:
        """Greedy answers graded exactly as `grpo evaluate` grades them, logged under its names (`val/strict_accuracy`…)."""
        problems = [
            Problem(q, a, i) for q, a, i in zip(batch["question"], batch["answer"], batch["index"], strict=False)
        ]
        records = evaluate(self.rollout.engine, self.tokenizer, problems, max_tokens=self.sampling.max_tokens,
                           batch_size=len(problems), max_prompt_length=self.prompt.max_prompt_length, style=self.prompt,
                           progress=False)  # fmt: skip
        values = [problem_metrics(r) for r in records]
        for name in PROBLEM_METRICS:
            metric = self.eval_metrics[f"{stage}/{name}"]
            metric.update(torch.tensor([v[name] for v in values]))
            self.log(
                f"{stage}/{name}",
                metric,
                on_step=False,
                on_epoch=True,
                prog_bar=name == "strict_accuracy",
                batch_size=len(records),
            )

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer, scheduler = adamw_warmup_cosine(self.policy, self.optim, self.total_optimizer_steps())
        self._refit_resumed_schedule(scheduler)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def total_optimizer_steps(self) -> int:
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return self.trainer.max_steps
        return max(1, int(self.trainer.estimated_stepping_batches) * self.grpo.num_iterations)

    def _refit_resumed_schedule(self, scheduler: Any) -> None:
        """Called by both ``on_load_checkpoint`` and ``configure_optimizers``: acts once both have run."""
        if self._resumed_schedule is not None and scheduler is not None:
            warning = refit_resumed_schedule(*self._resumed_schedule, scheduler)
            self._resumed_schedule = None
            if warning:
                rank_zero_warn(warning)

    def log_step(self, batch, rollout: Rollout, rewards: RewardBreakdown, stats: StepStats, rollout_s: float,
                 sync_s: float, step_s: float) -> None:  # fmt: skip
        values = step_metrics(rollout, rewards, stats, rollout_seconds=rollout_s, sync_seconds=sync_s, step_seconds=step_s,
                              mismatch_correction=self.grpo.importance_sampling_cap is not None)  # fmt: skip
        options = dict(on_step=True, on_epoch=False, batch_size=len(batch["question"]))
        means = self.trainer.strategy.reduce(torch.tensor(list(values.values()), device=self.device), reduce_op="mean")
        for name, value in zip(values, means.tolist(), strict=False):  # over processes: one collective per step
            self.log(name, value, prog_bar=name in PROGRESS_BAR, **options)
        if rollout.logprobs is not None:
            diff_max = torch.tensor(stats.logprob_diff_max, device=self.device)
            self.log(
                "rollout/logprob_diff_max", float(self.trainer.strategy.reduce(diff_max, reduce_op="max")), **options
            )
        self.last_step = StepRecord(self.global_step, batch, rollout, rewards)

    def configure_callbacks(self) -> list[L.Callback]:
        preflight = [RewardPreflight()] if self.rewards.preflight != "off" else []  # reward signal, before step 0
        return [ResumeState(), *preflight]  # random state and training record in every checkpoint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.rollout.stale = True
        schedulers, optimizers = checkpoint.get("lr_schedulers") or [], checkpoint.get("optimizer_states") or []
        if schedulers and optimizers:  # refitted to this run's step budget before Lightning loads them
            self._resumed_schedule = schedulers[0], optimizers[0].get("param_groups", [])
            configs = self._trainer.lr_scheduler_configs if self._trainer else []
            self._refit_resumed_schedule(configs[0].scheduler if configs else None)  # FSDP2 configures optimizers first
        if self.reference is not None and not self.sharded:  # strict loading expects every key of the module
            checkpoint["state_dict"].update({f"reference.{k}": v for k, v in self.reference.state_dict().items()})
