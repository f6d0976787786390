"""One GRPO step on ``--devices`` CPU processes (DDP or FSDP2 over gloo), for ``test_distributed.py``.

Sampling is replaced by a scripted engine whose completions depend only on the prompt, so one process with
batch B·W and W processes with batch B each train on exactly the same global batch. Rank 0 saves the updated
policy, its gradients before the update, the gradient norm and the questions every process trained on.

    python tests/ddp_step.py MODEL_DIR OUT.pt --devices 2 --batch-size 2 --loss-type dapo --strategy fsdp2
"""

from __future__ import annotations

import argparse
import zlib

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from grpo_lightning.config import GRPOConfig, OptimConfig, PromptConfig, RewardConfig
from grpo_lightning.datamodule import GSM8KDataModule
from grpo_lightning.distributed import all_processes, gathered
from grpo_lightning.models import ModelConfig, merged_weights
from grpo_lightning.module import GRPOModule
from grpo_lightning.rollout import HFEngine, Rollout, SamplingConfig


def length_reward(prompts, completions, **kwargs) -> list[float]:
    """Longer completions score more: every group has reward differences, so the gradient is not zero."""
    return [len(c[0]["content"]) / 10 for c in completions]


class ScriptedEngine(HFEngine):
    """Completions drawn from a generator seeded by the prompt: the same prompt always gets the same group."""

    def generate(self, prompt_ids, n: int, sampling: SamplingConfig) -> Rollout:
        rows = []
        for prompt in prompt_ids:
            generator = torch.Generator().manual_seed(zlib.crc32(str(list(prompt)).encode()))
            for _ in range(n):
                length = int(torch.randint(1, sampling.max_tokens + 1, (1,), generator=generator))
                rows.append(torch.randint(0, len(self.tokenizer), (length,), generator=generator))
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), self.pad_id)  # padding after each row's end is never read
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = row
        rollout = self._to_rollout(prompt_ids, tokens, None, n)
        rollout.completion_ids = [c[: len(r)] for c, r in zip(rollout.completion_ids, rows, strict=False)]
        return rollout


class ScriptedGRPO(GRPOModule):
    def __init__(self, **configs) -> None:
        super().__init__(**configs)
        self.rollout.factory = lambda kind, model, tokenizer, **_: ScriptedEngine(model, tokenizer)

    def training_step(self, batch, batch_idx):
        self.questions = list(batch["question"])
        return super().training_step(batch, batch_idx)

    def on_before_optimizer_step(self, optimizer) -> None:
        self.grads = {name: gathered(p.grad).clone() for name, p in self.policy.named_parameters()}  # FSDP2: gathered
        super().on_before_optimizer_step(optimizer)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--loss-type", default="grpo")
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp2"])
    args = parser.parse_args()

    module = scripted_module(args.model, loss_type=args.loss_type)
    trainer = fit_one_step(
        module, args.batch_size, devices=args.devices, strategy=strategy(args.strategy, args.devices)
    )
    questions = [q for rank in all_processes(module.questions) for q in rank]
    state = {name: tensor.clone() for name, tensor in merged_weights(module.policy)}  # FSDP2: gathered
    if trainer.global_rank == 0:
        grad_norm = float(trainer.callback_metrics["train/grad_norm"])
        torch.save({"state": state, "grads": module.grads, "grad_norm": grad_norm, "questions": questions,
                    "sharded": module.sharded, "lr": module.optim.lr}, args.out)  # fmt: skip


def scripted_module(model: str, *, loss_type: str = "grpo", max_grad_norm: float = 0.0) -> ScriptedGRPO:
    L.seed_everything(0)
    return ScriptedGRPO(
        policy=ModelConfig(name_or_path=model),
        grpo=GRPOConfig(num_generations=4, gradient_accumulation_steps=2, loss_type=loss_type),
        prompt=PromptConfig(max_prompt_length=128), rewards=RewardConfig(funcs=["ddp_step:length_reward"]),
        sampling=SamplingConfig(max_tokens=12),
        optim=OptimConfig(lr=1e-3, warmup_ratio=0.0, max_grad_norm=max_grad_norm),  # no warmup: a non-zero first rate
    )  # fmt: skip


def fit_one_step(module: ScriptedGRPO, batch_size: int, **trainer_args) -> L.Trainer:
    trainer_args = {"accelerator": "cpu", "precision": "32-true", **trainer_args}
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, **trainer_args)  # fmt: skip
    trainer.fit(module, GSM8KDataModule(source="synthetic", synthetic_size=64, batch_size=batch_size))
    return trainer


def strategy(name: str, devices: int):
    if devices == 1:
        return "auto"
    if name == "fsdp2":
        return ModelParallelStrategy(
            data_parallel_size=devices, tensor_parallel_size=1, save_distributed_checkpoint=False
        )
    return "ddp"


if __name__ == "__main__":
    main()
