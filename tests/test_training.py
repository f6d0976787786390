"""End-to-end training through the CLI on the tiny model: learning, checkpoints, export, resume, errors."""

from __future__ import annotations

import math
import os

import pytest
import torch
import yaml
from conftest import REPO, demo_config, metrics

from grpo_lightning.cli import main
from grpo_lightning.module import GRPOConfig

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(config):
    cli = main(["--config", str(config)], run=False)
    assert cli.model.grpo.num_generations >= 2
    assert cli.datamodule.hparams.batch_size >= 1


def test_help_documents_fields(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for text in ("G: completions sampled per prompt", "KL penalty coefficient", "Prompts per training step",
                 "Peak learning rate", "GSPO", "use_bias_correction_kl", "top_entropy_quantile", "DAPO dynamic sampling",
                 "disable_dropout", "importance_sampling_mode", "bnpo_per_micro_batch", "rewards.kwargs", "prompt.user_template", "performance.fused_logprobs"):  # fmt: skip
        assert text in out


@pytest.mark.e2e
def test_reward_rises(demo_run):
    rewards = [float(r["train/reward"]) for r in metrics(demo_run) if r.get("train/reward")]
    assert len(rewards) == 60
    first, last = sum(rewards[:15]) / 15, sum(rewards[-15:]) / 15
    assert last > first + 0.04 and last > 1.5 * first, (first, last)  # measured: 0.068 → 0.121 (60 steps)


@pytest.mark.e2e
def test_documented_metrics_are_logged(demo_run):
    rows = metrics(demo_run)
    logged = {k for r in rows for k, v in r.items() if v}
    expected = {
        "train/reward", "train/reward_std", "train/frac_reward_zero_std", "train/completion_length",
        "train/truncated_fraction", "train/kl", "train/clip_ratio/low", "train/clip_ratio/high", "train/loss",
        "train/grad_norm", "train/lr", "train/tokens_per_second", "rollout/sync_seconds", "train/entropy",
        "train/rewards/correctness_reward_func", "train/rewards/xmlcount_reward_func",
    }  # fmt: skip
    assert expected <= logged, expected - logged
    lrs = [float(r["train/lr"]) for r in rows if r.get("train/lr")]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(0.003, rel=0.05) and lrs[-1] < 0.0001  # warmup, cosine


@pytest.mark.e2e
def test_checkpoints_samples_and_hf_export(demo_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpts = {p.name for p in (demo_run / "run" / "checkpoints").iterdir()}
    assert "last.ckpt" in ckpts and any("step=50" in n for n in ckpts)
    state = torch.load(demo_run / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 60
    assert not any(k.startswith("reference.") for k in state["state_dict"])  # the reference is never stored
    (samples,) = (demo_run / "run" / "csv").glob("version_*/samples.jsonl")
    assert samples.read_text().count("\n") >= 8
    export = demo_run / "run" / "hf_export"
    model = AutoModelForCausalLM.from_pretrained(export)
    AutoTokenizer.from_pretrained(export)
    trained = {k.removeprefix("policy."): v for k, v in state["state_dict"].items() if k.startswith("policy.")}
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, trained[name].to(tensor.dtype)), name
    initial = AutoModelForCausalLM.from_pretrained(demo_run / "tiny-qwen2")
    assert not torch.equal(initial.model.embed_tokens.weight, model.model.embed_tokens.weight)


@pytest.mark.e2e
def test_resume_from_last_checkpoint(tmp_path):
    cfg = demo_config(tmp_path, trainer={"max_steps": 4})
    cfg_dict = yaml.safe_load(cfg.read_text())
    cfg_dict["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 2
    cfg.write_text(yaml.safe_dump(cfg_dict))
    main(["fit", "--config", str(cfg)])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 4
    main(["fit", "--config", str(cfg), "--trainer.max_steps", "6", "--ckpt_path", "last"])
    resumed = torch.load(last, weights_only=False)
    assert resumed["global_step"] == 6
    assert resumed["lr_schedulers"][0]["last_epoch"] == 6


@pytest.mark.e2e
@pytest.mark.parametrize("lora_rank", [0, 8])
def test_the_new_methods_train_through_the_cli(tmp_path, lora_rank):
    """GSPO, the unbiased KL, high-entropy masking, dynamic sampling, overlong shaping, TRL's bnpo and the mismatch
    correction: 2 steps, with all weights training and with LoRA adapters (reference: the base, adapters off)."""
    rewards = ["xmlcount_reward_func", "soft_overlong_punishment"]
    cfg = demo_config(tmp_path, trainer={"max_steps": 2}, model={"lora.rank": lora_rank,
        "grpo.importance_sampling_level": "sequence", "grpo.use_bias_correction_kl": True,
        "grpo.top_entropy_quantile": 0.2, "grpo.dynamic_sampling_max_rounds": 2, "rewards.funcs": rewards,
        "rewards.kwargs": {"soft_cache_len": 4},
        "grpo.loss_type": "bnpo", "grpo.bnpo_per_micro_batch": True, "grpo.importance_sampling_cap": 2.0,
    })  # fmt: skip
    main(["fit", "--config", str(cfg)])
    rows = [r for r in metrics(tmp_path) if r.get("train/loss")]
    assert len(rows) == 2
    for name in ("train/entropy", "train/dynamic_sampling/groups_dropped", "train/dynamic_sampling/rounds",
                 "train/rewards/soft_overlong_punishment"):  # fmt: skip
        assert all(r.get(name) not in (None, "") for r in rows), name
    assert all(float(r["train/entropy"]) > 0 for r in rows)
    assert all(float(r["train/rewards/soft_overlong_punishment"]) <= 0 for r in rows)
    assert all(math.isfinite(float(r["train/kl"])) and float(r["train/grad_norm"]) > 0 for r in rows)
    assert all(0 < float(r["rollout/is_ratio"]) <= 2.0 for r in rows)  # the HF engine's sampling log-probs


def test_dropout_is_off_in_the_policy(tmp_path):
    from grpo_lightning.models import ModelConfig
    from grpo_lightning.module import GRPOModule
    from grpo_lightning.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path / "dropout", attention_dropout=0.5)
    ids = torch.arange(3, 12)[None]
    for disable in (False, True):
        grpo = GRPOConfig(beta=0.0, disable_dropout=disable)
        module = GRPOModule(policy=ModelConfig(name_or_path=str(path)), grpo=grpo)
        module.configure_model()
        module.policy.train()
        torch.manual_seed(0)
        first, second = module.policy(ids).logits, module.policy(ids).logits
        assert torch.equal(first, second) == disable  # with dropout, two forwards of one input differ


def test_unknown_config_key_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(demo_config(tmp_path)), "--model.grpo.num_generationz", "4"])
    assert "num_generationz" in capsys.readouterr().err


def test_missing_model_path_is_named(tmp_path):
    cfg = demo_config(tmp_path, model={"policy.build_tiny": False, "policy.name_or_path": str(tmp_path / "nope")})
    with pytest.raises(RuntimeError, match=r"model path '.*nope' does not exist"):
        main(["fit", "--config", str(cfg)])


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = demo_config(tmp_path, model={"policy.build_tiny": False, "policy.name_or_path": str(tmp_path / "empty")})
    with pytest.raises(RuntimeError, match="is not a model folder: it has no config.json"):
        main(["fit", "--config", str(cfg)])


@pytest.mark.e2e
@pytest.mark.parametrize(
    "name, message", [("raising_reward", "raised RuntimeError"), ("wrong_length_reward", "returned 1 values")]
)
def test_bad_reward_function_is_named(tmp_path, name, message):
    cfg = demo_config(tmp_path, trainer={"max_steps": 1}, model={"rewards.funcs": [f"reward_fixtures:{name}"]})
    with pytest.raises(ValueError, match=rf"reward function '{name}' {message}"):
        main(["fit", "--config", str(cfg)])


@pytest.mark.parametrize(
    "overrides, message",
    [({"grpo.num_generations": 1}, "num_generations=1"), ({"grpo.gradient_accumulation_steps": 3}, "does not divide the 32 sequences"),
     ({"grpo.loss_type": "ppo"}, 'key "model.grpo.loss_type"')],
)  # fmt: skip
def test_impossible_settings_fail_before_loading(tmp_path, overrides, message, capsys):
    cfg = demo_config(tmp_path, model={"policy.build_tiny": False, **overrides})
    with pytest.raises((ValueError, SystemExit)) as info:
        main(["fit", "--config", str(cfg)])
    assert message in str(info.value) + capsys.readouterr().err
    assert not (tmp_path / "tiny-qwen2").exists()  # failed before any model was built or loaded


@pytest.mark.e2e
def test_bf16_true_and_export_at_every_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = demo_config(tmp_path, trainer={"max_steps": 2, "precision": "bf16-true"})
    cfg_dict = yaml.safe_load(cfg.read_text())
    cfg_dict["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 1
    cfg_dict["trainer"]["callbacks"][2]["init_args"]["every_checkpoint"] = True
    cfg.write_text(yaml.safe_dump(cfg_dict))
    main(["fit", "--config", str(cfg)])
    grad_norms = [float(r["train/grad_norm"]) for r in metrics(tmp_path) if r.get("train/grad_norm")]
    assert len(grad_norms) == 2 and all(torch.isfinite(torch.tensor(grad_norms)))
    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf_export")
    for step in (1, 2):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / f"hf_export-step-{step}")
        assert model.dtype == torch.bfloat16


def test_wandb_goes_offline_without_credentials(monkeypatch, tmp_path):
    from grpo_lightning.cli import wandb_offline_without_credentials

    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    wandb_offline_without_credentials()
    assert os.environ["WANDB_MODE"] == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    wandb_offline_without_credentials()
    assert "WANDB_MODE" not in os.environ


@pytest.mark.e2e
def test_plot_run_draws_the_demo_curves(demo_run, tmp_path):
    """`scripts/plot_run.py` (how docs/images/*.png are made) on a real run's CSV."""
    import subprocess
    import sys

    (csv_path,) = (demo_run / "run" / "csv").glob("version_*/metrics.csv")
    png = tmp_path / "curves.png"
    subprocess.run([sys.executable, str(REPO / "scripts" / "plot_run.py"), str(csv_path), str(png)], check=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
