"""Shared fixtures: a tiny offline Qwen2 checkpoint, and the real GSM8K files when ../shared is present."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from grpo_lightning.rollout import Rollout

REPO = Path(__file__).resolve().parents[1]
SHARED_GSM8K = REPO.parent / "shared" / "data" / "gsm8k"


def pytest_collection_modifyitems(config, items):
    """Two tiers: ``-m e2e`` (training through the CLI or Trainer, vLLM, several processes, kill and resume) and the
    fast tier ``-m "not e2e"`` (everything else). The fast tier never waits for the 60-step ``demo_run``."""
    slow = [i.nodeid for i in items if "demo_run" in getattr(i, "fixturenames", ()) and not i.get_closest_marker("e2e")]
    if slow:
        raise pytest.UsageError(f"tests using the 60-step demo_run fixture must be marked e2e: {slow}")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from grpo_lightning.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny-qwen2")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture
def tiny_model(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint).train()


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (SHARED_GSM8K / "test.jsonl").is_file():
        pytest.skip(f"real GSM8K data not found at {SHARED_GSM8K} (../shared is absent)")
    return SHARED_GSM8K


def demo_config(tmp_path: Path, recipe: str = "cpu-demo.yaml", **overrides) -> Path:
    """A shipped recipe (the CPU demo by default) writing inside tmp_path, with trainer/model/data overrides."""
    cfg = yaml.safe_load((REPO / "configs" / recipe).read_text())
    cfg["trainer"].update(enable_progress_bar=False, default_root_dir=str(tmp_path / "run"))
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "run")
    cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / "run" / "checkpoints")
    if cfg["model"]["policy"].get("build_tiny"):
        cfg["model"]["policy"]["name_or_path"] = str(tmp_path / "tiny-qwen2")
    for section, values in overrides.items():
        for key, value in values.items():
            target = cfg[section]
            *parents, leaf = key.split(".")
            for p in parents:
                target = target.setdefault(p, {})
            target[leaf] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def metrics(tmp_path: Path) -> list[dict[str, str]]:
    (path,) = (tmp_path / "run" / "csv").glob("version_*/metrics.csv")
    return list(csv.DictReader(path.open()))


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One CPU-demo run of 60 steps, shared by the end-to-end tests of learning, validation and metrics."""
    tmp_path = tmp_path_factory.mktemp("demo")
    from grpo_lightning.cli import main

    main(["fit", "--config", str(demo_config(tmp_path, trainer={"max_steps": 60}))])
    return tmp_path


SHORT_RUN_STEPS = 2


@pytest.fixture(scope="session")
def short_run(tmp_path_factory):
    """The CPU demo for 2 steps, validating 8 problems at the end: a run's files (checkpoint, HF export with its card
    and validation results, metrics) in seconds, for the fast tier's tests of what a run writes and how it is read
    back. Tests of learning itself use ``demo_run`` and are end-to-end."""
    tmp_path = tmp_path_factory.mktemp("short")
    from grpo_lightning.cli import main

    trainer = {"max_steps": SHORT_RUN_STEPS, "val_check_interval": SHORT_RUN_STEPS}
    main(["fit", "--config", str(demo_config(tmp_path, trainer=trainer, data={"val_size": 8}))])
    return tmp_path


class ScriptedEngine:
    """Returns the next scripted texts, ``n`` per prompt; records each call's prompts and sampling."""

    def __init__(self, texts: list[str]) -> None:
        self.texts, self.calls, self.used = texts, [], 0

    def generate(self, prompt_ids, n, sampling):
        self.calls.append((list(prompt_ids), sampling))
        texts = self.texts[self.used : self.used + len(prompt_ids) * n]
        self.used += len(texts)
        ids = [[1] * (i + 1) for i in range(len(texts))]
        return Rollout([list(p) for p in prompt_ids], ids, texts, [False] * len(texts), n)

    def update_weights(self, named_tensors) -> None:
        pass

    def generates_with(self, model) -> bool:
        return False

    def sleep(self) -> None:
        pass

    def wake_up(self) -> None:
        pass
