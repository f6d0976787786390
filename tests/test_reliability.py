"""Reliability: kill -9 and resume, crash-safe writes, hostile rewards and prompts, safe defaults, a long run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import REPO, ScriptedEngine, demo_config, metrics

from grpo_lightning.callbacks import AtomicCheckpointIO
from grpo_lightning.cli import main
from grpo_lightning.export import atomic_open, write_json


def _policy(ckpt) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("policy.")}


def _train(cfg, *extra, wait_for=None) -> None:
    """`python train.py fit` in a subprocess; with ``wait_for``, kill -9 it as soon as that file exists."""
    cmd = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(cfg), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if wait_for is None:
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
        return
    deadline = time.monotonic() + 600
    while not wait_for.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.3)  # into the next step: rollout, loss or optimizer
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.e2e
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    """Same weights, optimizer, schedule, RNG and data order: the resumed run ends bit-identical."""

    def config(name):
        cfg = demo_config(tmp_path / name, trainer={"max_steps": 8})
        cfg_dict = yaml.safe_load(cfg.read_text())
        cfg_dict["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 3
        cfg_dict["data"]["synthetic_size"] = 24  # 6 batches per epoch: the 8 steps cross an epoch boundary
        cfg_dict["data"]["val_size"] = 0
        cfg.write_text(yaml.safe_dump(cfg_dict))
        return cfg

    (tmp_path / "straight").mkdir()
    (tmp_path / "killed").mkdir()
    _train(config("straight"))
    killed = config("killed")
    checkpoints = tmp_path / "killed" / "run" / "checkpoints"
    _train(killed, wait_for=checkpoints / "epoch=0-step=3.ckpt")
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] in (3, 6)  # died before the end
    _train(killed, "--ckpt_path", "last")
    straight = _policy(tmp_path / "straight" / "run" / "checkpoints" / "last.ckpt")
    resumed = _policy(checkpoints / "last.ckpt")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("crash in the middle of writing")


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="crash in the middle"):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(1000), "bad": _Unpicklable()}, path)
    assert path.read_bytes() == before and torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary leftovers


def test_a_crash_while_writing_a_summary_keeps_the_previous_one(tmp_path):
    path = tmp_path / "summary.json"
    write_json(path, {"step": 1})
    with pytest.raises(KeyboardInterrupt), atomic_open(path) as f:
        f.write('{"step": 2, "half')
        raise KeyboardInterrupt  # killed mid-write
    assert json.loads(path.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


@pytest.mark.e2e
def test_checkpoints_are_written_atomically_in_training(tmp_path):
    cfg = demo_config(tmp_path, trainer={"max_steps": 1}, data={"val_size": 0})
    cli = main(["fit", "--config", str(cfg)])
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


class _EqualRewardEngine(ScriptedEngine):
    """Every completion of a group is the same: empty (EOS only) for the first prompt, a word for the rest."""

    def __init__(self, tokenizer) -> None:
        super().__init__([])
        self.eos, self.word = tokenizer.eos_token_id, tokenizer.encode(" apples")

    def generate(self, prompt_ids, n, sampling):
        from grpo_lightning.rollout import Rollout

        ids = [[self.eos] if g == 0 else [*self.word, self.eos] for g in range(len(prompt_ids)) for _ in range(n)]
        texts = ["" if g == 0 else " apples" for g in range(len(prompt_ids)) for _ in range(n)]
        return Rollout([list(p) for p in prompt_ids], ids, texts, [False] * len(ids), n)


@pytest.mark.e2e
def test_equal_rewards_and_empty_completions_give_a_finite_zero_step(tmp_path, monkeypatch):
    import grpo_lightning.rollout_worker as rollout_worker

    monkeypatch.setattr(
        rollout_worker, "make_engine", lambda kind, model, tokenizer, **kw: _EqualRewardEngine(tokenizer)
    )
    cfg = demo_config(tmp_path, trainer={"max_steps": 2}, data={"val_size": 0})
    main(["fit", "--config", str(cfg)])
    rows = [r for r in metrics(tmp_path) if r.get("train/loss")]
    assert [float(r["train/frac_reward_zero_std"]) for r in rows] == [1.0, 1.0]
    for r in rows:  # zero advantages and a policy still equal to the reference: nothing to learn, nothing breaks
        assert abs(float(r["train/loss"])) < 1e-6 and float(r["train/grad_norm"]) < 1e-5
        assert math.isfinite(float(r["train/kl"]))


@pytest.mark.e2e
def test_reward_errors_become_zero_with_a_warning_when_asked(tmp_path):
    cfg = demo_config(tmp_path, trainer={"max_steps": 1}, data={"val_size": 0},
                      model={"rewards.funcs": ["reward_fixtures:inf_reward", "xmlcount_reward_func"], "rewards.on_error": "zero"})  # fmt: skip
    with pytest.warns(UserWarning, match="reward function 'inf_reward' returned non-finite values"):
        main(["fit", "--config", str(cfg)])
    (row,) = [r for r in metrics(tmp_path) if r.get("train/rewards/inf_reward")]
    assert float(row["train/rewards/inf_reward"]) == 0.0


@pytest.mark.e2e
def test_infinite_reward_stops_training_naming_the_function(tmp_path):
    """(NaN and None mean "not applicable", as in TRL: see test_rewards.py.)"""
    cfg = demo_config(
        tmp_path,
        trainer={"max_steps": 1},
        data={"val_size": 0},
        model={"rewards.funcs": ["reward_fixtures:inf_reward"]},
    )
    with pytest.raises(ValueError, match="reward function 'inf_reward' returned non-finite values"):
        main(["fit", "--config", str(cfg)])


class _TruncatedEngine(ScriptedEngine):
    """Completions that differ in reward (format tags or not), all flagged as cut at max_tokens."""

    def __init__(self, tokenizer) -> None:
        super().__init__([])
        self.tokenizer = tokenizer

    def generate(self, prompt_ids, n, sampling):
        from grpo_lightning.rollout import Rollout

        texts = [
            "<reasoning>\nadd\n</reasoning>\n<answer>\n5\n</answer>" if i % 2 else " apples"
            for i in range(len(prompt_ids) * n)
        ]
        ids = [self.tokenizer.encode(t) for t in texts]
        return Rollout([list(p) for p in prompt_ids], ids, texts, [True] * len(ids), n)


@pytest.mark.parametrize("mask", [False, True])
def test_masking_truncated_completions_removes_them_from_the_loss(tiny_checkpoint, tiny_tokenizer, mask):
    """One GRPO step without a Trainer: a scripted engine, the step's own functions, then the gradient."""
    from grpo_lightning.algorithm import group_advantages
    from grpo_lightning.batch import completion_mask
    from grpo_lightning.config import GRPOConfig
    from grpo_lightning.models import ModelConfig
    from grpo_lightning.module import GRPOModule
    from grpo_lightning.rollout_worker import RolloutWorker

    module = GRPOModule(
        policy=ModelConfig(name_or_path=str(tiny_checkpoint)),
        grpo=GRPOConfig(num_generations=4, gradient_accumulation_steps=2, beta=0.0),
    )
    module.configure_model()
    module.rollout = RolloutWorker(factory=lambda *args, **kwargs: _TruncatedEngine(tiny_tokenizer))
    module.rollout.start(module.policy, module.tokenizer, seed=0, model_path=lambda: None)
    batch = {"question": ["What is 2 + 3?", "What is 1 + 4?"], "answer": ["5", "5"]}
    rollout, _ = module.generate(batch["question"])
    rewards = torch.tensor(module.score(batch, rollout).total)
    advantages = group_advantages(rewards, 4)
    drop = rollout.truncated if mask else None
    module.accumulate_gradients(
        rollout.row_prompts(), rollout, advantages, completion_mask(rollout.completion_ids, drop), None, None
    )
    grads = [p.grad for p in module.policy.parameters() if p.grad is not None]
    assert all(rollout.truncated) and advantages.abs().sum() > 0
    assert (sum(float(g.abs().sum()) for g in grads) == 0.0) == mask  # masked: nothing left to learn from


@pytest.mark.e2e
@pytest.mark.parametrize("policy, expected", [("raise", "exceeds max_prompt_length=20"), ("truncate", None)])
def test_long_prompts_are_rejected_or_truncated_by_flag(tmp_path, policy, expected):
    cfg = demo_config(tmp_path, trainer={"max_steps": 1}, data={"val_size": 0},
                      model={"prompt.max_prompt_length": 20, "prompt.on_long_prompt": policy})  # fmt: skip
    if expected:
        with pytest.raises(ValueError, match=expected):
            main(["fit", "--config", str(cfg)])
    else:
        with pytest.warns(UserWarning, match="left-truncated"):
            main(["fit", "--config", str(cfg)])
        assert [r for r in metrics(tmp_path) if r.get("train/loss")]


def test_prompt_plus_completion_beyond_the_model_is_refused(tmp_path):
    cfg = demo_config(
        tmp_path, trainer={"max_steps": 1}, model={"prompt.max_prompt_length": 1000, "sampling.max_tokens": 100}
    )
    with pytest.raises(ValueError, match=r"= 1100 exceeds the model's max_position_embeddings \(1024\)"):
        main(["fit", "--config", str(cfg)])


@pytest.mark.parametrize("wrong", [{"model.grpo.beta": "lots"}, {"data.batch_size": 2.5}])
def test_wrong_types_are_named(tmp_path, wrong, capsys):
    ((key, value),) = wrong.items()
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(demo_config(tmp_path)), f"--{key}", str(value)])
    assert key.split(".")[-1] in capsys.readouterr().err


def test_offline_hub_errors_name_hf_hub_offline_and_local_paths():
    from grpo_lightning.data import DataError
    from grpo_lightning.datamodule import GSM8KDataModule
    from grpo_lightning.models import ModelConfig, ModelLoadError, load_tokenizer

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(
        ModelLoadError, match=r"no such file or folder, and not in the local Hub cache \(HF_HUB_OFFLINE=1"
    ):
        load_tokenizer(ModelConfig("someone/some-model-that-is-not-cached"))
    with pytest.raises(DataError, match="HF_HUB_OFFLINE"):
        GSM8KDataModule(source="someone/some-dataset-that-is-not-cached").setup("fit")


def test_remote_code_in_a_checkpoint_never_runs_by_default(tiny_checkpoint, tmp_path):
    import json
    import shutil

    from grpo_lightning.models import ModelConfig, load_causal_lm

    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, folder)
    marker = tmp_path / "executed"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    assert ModelConfig().trust_remote_code is False
    try:
        load_causal_lm(ModelConfig(str(folder)))
    except Exception:
        pass  # refusing is fine too; running the file is not
    assert not marker.exists()


def test_model_text_is_never_executed(tmp_path):
    from grpo_lightning.evaluation import grade
    from grpo_lightning.rewards import NOTEBOOK_REWARDS, combine_rewards

    marker = tmp_path / "executed"
    payload = f"__import__('pathlib').Path({str(marker)!r}).write_text('pwned')"
    texts = [f"<reasoning>\n{payload}\n</reasoning>\n<answer>\n{payload}\n</answer>\n", f"{{{{ {payload} }}}}"]
    scores = combine_rewards(NOTEBOOK_REWARDS, [None] * 2, texts, answer=["1", "2"])
    grades = [grade(t, "1") for t in texts]
    assert not marker.exists()
    assert scores.per_function["correctness_reward_func"] == [0.0, 0.0] and not any(g.strict_correct for g in grades)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


class _MemoryProbe:
    def __init__(self) -> None:
        self.samples: dict[int, float] = {}

    def __call__(self, trainer, *args) -> None:
        if trainer.global_step % 50 == 0:
            self.samples[trainer.global_step] = _rss_mib()


@pytest.mark.e2e
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
def test_long_run_memory_stays_flat(tmp_path):
    """300 tiny steps: resident memory levels off (allocator warm-up until ~step 200, then little growth).

    Python-level allocations stay flat throughout (tracemalloc: +0.05 MiB from step 150 to 300); the early RSS
    rise is glibc/torch arenas settling on the varying sequence lengths, not a leak that grows with steps.
    """
    import lightning as L

    probe = _MemoryProbe()
    callback = type("Probe", (L.Callback,), {"on_train_batch_end": lambda self, trainer, *a: probe(trainer)})()
    cfg = demo_config(tmp_path, trainer={"max_steps": 300, "log_every_n_steps": 10}, data={"val_size": 0},
                      model={"grpo.num_generations": 4, "sampling.max_tokens": 8})  # fmt: skip
    cli = main(["--config", str(cfg)], run=False)
    cli.trainer.callbacks.append(callback)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 300
    early, late = probe.samples[200] - probe.samples[100], probe.samples[300] - probe.samples[200]
    print(f"RSS MiB by step: {probe.samples}; growth 100→200: {early:.1f} MiB, 200→300: {late:.1f} MiB")
    # A leak grows by the same amount every 100 steps; warm-up slows down (measured: ~70 then 14–18 MiB).
    # Keeping one step's autograd graph or rollout alive per step would add far more than 24 MiB per 100 steps.
    assert late < max(0.5 * early, 24), probe.samples


# ------------------------------------------------------------------------------ issue 20: a new user's mistakes
def _quick(tmp_path, steps=1, every=50, **overrides):
    """The CPU demo for a few steps, no validation or preflight, checkpoints every ``every`` steps."""
    overrides["model"] = {"rewards.preflight": "off", **overrides.get("model", {})}
    cfg = demo_config(tmp_path, trainer={"max_steps": steps}, data={"val_size": 0}, **overrides)
    cfg_dict = yaml.safe_load(cfg.read_text())
    cfg_dict["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = every
    cfg.write_text(yaml.safe_dump(cfg_dict))
    return cfg


@pytest.mark.e2e
def test_a_fresh_run_refuses_an_earlier_runs_checkpoints_unless_overwrite(tmp_path):
    from grpo_lightning.callbacks import CheckpointsExistError

    cfg = _quick(tmp_path)
    main(["fit", "--config", str(cfg)])
    checkpoints = tmp_path / "run" / "checkpoints"
    before = (checkpoints / "last.ckpt").read_bytes()
    with pytest.raises(CheckpointsExistError, match=r"earlier run \(last\.ckpt\)\. Resume it with --ckpt_path last.*--overwrite"):  # fmt: skip
        main(["fit", "--config", str(cfg)])
    assert (checkpoints / "last.ckpt").read_bytes() == before and not (checkpoints / "last-v1.ckpt").exists()
    main(["fit", "--config", str(cfg), "--overwrite", "--trainer.max_steps", "2"])
    assert [p.name for p in checkpoints.iterdir()] == ["last.ckpt"]  # the new run's, never last-v1.ckpt
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 2


@pytest.mark.e2e
def test_resume_takes_the_newest_complete_checkpoint_after_a_kill_before_last_ckpt(tmp_path):
    import shutil

    cfg = _quick(tmp_path, steps=4, every=2)
    main(["fit", "--config", str(cfg)])
    checkpoints = tmp_path / "run" / "checkpoints"
    # killed after writing the step-4 checkpoint, before last.ckpt: last.ckpt still holds step 2 (and is newer by time)
    shutil.copy(checkpoints / "epoch=0-step=2.ckpt", checkpoints / "last.ckpt")
    cli = main(["fit", "--config", str(cfg), "--ckpt_path", "last"])
    assert cli.trainer.ckpt_path.endswith("epoch=0-step=4.ckpt") and cli.trainer.global_step == 4
    # killed during the very first save: no last.ckpt at all, only the step checkpoint
    (checkpoints / "last.ckpt").unlink()
    (callback,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "StepCheckpoint"]
    assert [p.rsplit("/", 1)[-1] for p in callback._find_last_checkpoints(cli.trainer)] == ["epoch=0-step=4.ckpt"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.e2e
def test_temporary_files_of_a_killed_save_are_removed_at_the_next_start(tmp_path):
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    checkpoints.mkdir(parents=True)
    dead = _dead_pid()
    stale = [checkpoints / f".last.ckpt.tmp-{dead}-x1y2", checkpoints / f".epoch=0-step=3.ckpt.tmp-{dead}-ab",
             run / f".hf_export.old-{dead}"]  # fmt: skip
    legacy = checkpoints / ".last.ckpt.tmp-k2j3h4"  # written before temporaries carried a process id
    kept = [checkpoints / f".last.ckpt.tmp-{os.getpid()}-zz", checkpoints / f".notes.txt.tmp-{dead}-q",
            run / ".mine.old-1"]  # fmt: skip
    for path in [*stale, legacy, *kept]:
        path.write_bytes(b"partial")
    os.utime(legacy, (time.time() - 3600, time.time() - 3600))
    (run / f".hf_export.tmp-{dead}-abc").mkdir()
    (run / f".hf_export.tmp-{dead}-abc" / "model.safetensors").write_bytes(b"half")
    main(["fit", "--config", str(_quick(tmp_path))])
    assert not any(p.exists() for p in [*stale, legacy, run / f".hf_export.tmp-{dead}-abc"])
    assert all(p.exists() for p in kept)  # a live writer's, and files that are not ours


def test_outputs_respect_the_umask(tmp_path):
    import stat

    from grpo_lightning.export import append_jsonl

    old = os.umask(0o027)
    try:
        write_json(tmp_path / "summary.json", {"a": 1})
        AtomicCheckpointIO().save_checkpoint({"w": torch.ones(2)}, tmp_path / "last.ckpt")
        append_jsonl(tmp_path / "samples.jsonl", {"a": 1})
    finally:
        os.umask(old)
    for name in ("summary.json", "last.ckpt", "samples.jsonl"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name  # 0o666 & ~0o027, not mkstemp's 0o600


def test_a_full_disk_while_checkpointing_names_the_file(tmp_path, monkeypatch):
    import errno
    import io

    class FullDisk(io.RawIOBase):
        def __init__(self, f) -> None:
            self.f, self.room = f, 500

        def writable(self) -> bool:
            return True

        def write(self, data) -> int:
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(data)
            return self.f.write(data)

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: save(obj, FullDisk(f)))  # torch: "enforce fail … unexpected pos"
    with pytest.raises(OSError, match=r"could not write checkpoint '.*last\.ckpt': the disk is full"):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.ones(10_000)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1} and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.e2e
def test_resuming_with_more_steps_stretches_the_schedule_and_says_so(tmp_path):
    from grpo_lightning.optimization import warmup_cosine

    cfg = _quick(tmp_path, steps=4, every=2)
    main(["fit", "--config", str(cfg)])
    with pytest.warns(UserWarning, match=r"planned for 4 steps \(warmup 1\) and now spans 8 \(warmup 1; trainer.max_steps"):  # fmt: skip
        main(["fit", "--config", str(cfg), "--trainer.max_steps", "8", "--ckpt_path", "last"])
    (resumed,) = (tmp_path / "run" / "csv").glob("version_1/metrics.csv")
    import csv

    lrs = [float(r["train/lr"]) for r in csv.DictReader(resumed.open()) if r.get("train/lr")]
    peak = yaml.safe_load(cfg.read_text())["model"]["optim"]["lr"]
    assert lrs == pytest.approx([peak * warmup_cosine(step, 8, 1) for step in range(4, 8)])  # no 0.0, no jump


def test_a_negative_learning_rate_names_the_setting():
    from grpo_lightning.config import OptimConfig

    with pytest.raises(ValueError, match=r"model\.optim\.lr=-0\.001: the peak learning rate must be > 0"):
        OptimConfig(lr=-1e-3)


@pytest.mark.e2e
def test_train_py_prints_a_configuration_error_as_one_line(tmp_path, capsys, monkeypatch):
    from grpo_lightning.cli import train

    cfg = _quick(tmp_path)
    monkeypatch.delenv("GRPO_DEBUG", raising=False)
    assert train(["fit", "--config", str(cfg), "--model.optim.lr", "-0.001"]) == 2
    err = capsys.readouterr().err
    assert "train.py: error: invalid optimizer configuration:\n  model.optim.lr=-0.001" in err
    assert "Traceback" not in err and "GRPO_DEBUG=1 shows the traceback" in err
    monkeypatch.setenv("GRPO_DEBUG", "1")  # the full traceback, for a bug report
    with pytest.raises(ValueError, match="model.optim.lr"):
        train(["fit", "--config", str(cfg), "--model.optim.lr", "-0.001"])


@pytest.mark.e2e
def test_ctrl_c_during_fit_exits_130_after_a_graceful_shutdown(tmp_path, monkeypatch):
    from grpo_lightning.module import GRPOModule

    def interrupted(self, batch, batch_idx):
        raise KeyboardInterrupt

    monkeypatch.setattr(GRPOModule, "training_step", interrupted)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as info:
            main(["fit", "--config", str(_quick(tmp_path))])
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C during its shutdown
    assert info.value.code == 130


def test_the_progress_bar_never_reads_epoch_0_of_minus_2(tmp_path):
    pytest.importorskip("rich")
    from grpo_lightning.callbacks import StepProgressBar

    cli = main(["--config", str(_quick(tmp_path, steps=100)), "--trainer.enable_progress_bar", "true"], run=False)
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, StepProgressBar)
    cli.trainer.fit_loop.max_epochs = -1  # what Lightning sets when max_steps alone bounds training
    bar._trainer = cli.trainer
    description = bar._get_train_description(0)
    assert "/-" not in description and description.strip() == "Epoch 0 (max_steps 100)"
