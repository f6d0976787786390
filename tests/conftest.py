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

from grpo_lightning.rollout import Rollout  # noqa: E402  after the environment is set

REPO = Path(__file__).resolve().parents[1]
SHARED_GSM8K = REPO.parent / "shared" / "data" / "gsm8k"


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
    """One CPU-demo run of 60 steps, shared by the learning/export/metrics tests."""
    tmp_path = tmp_path_factory.mktemp("demo")
    from grpo_lightning.cli import main

    main(["fit", "--config", str(demo_config(tmp_path, trainer={"max_steps": 60}))])
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
