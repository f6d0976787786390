"""Export: checkpoint → HF folder with identical logits, zip, model card, and the Hub upload path."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

from grpo_lightning.cli import grpo
from grpo_lightning.export import HubError, push_to_hub
from hub_stub import HubStub

TOKEN = "hf_TESTtoken0123456789abcdef"


@pytest.fixture(scope="module")
def exported(demo_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    summary = out.parent / "summary.json"
    summary.write_text(json.dumps({"data": "gsm8k test", "num_problems": 5, "metrics": {"strict_accuracy": 0.125}}))
    ckpt = demo_run / "run" / "checkpoints" / "last.ckpt"
    assert grpo(["export", str(ckpt), "--out", str(out), "--zip", "--eval-summary", str(summary)]) == 0
    return out


def test_checkpoint_export_reloads_with_identical_logits(demo_run, exported):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    state = torch.load(demo_run / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    policy = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(demo_run / "tiny-qwen2"))
    policy.load_state_dict({k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")})
    reloaded = AutoModelForCausalLM.from_pretrained(exported)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    ids = tokenizer("Ava has 3 apples and finds 4 more.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(policy.eval()(ids).logits, reloaded.eval()(ids).logits)
    assert (exported / "model.safetensors").is_file() and (exported / "generation_config.json").is_file()


def test_zip_and_model_card(exported):
    with zipfile.ZipFile(exported.with_suffix(".zip")) as z:
        assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(z.namelist())
    card = (exported / "README.md").read_text()
    for text in ("tiny-qwen2", "synthetic", "train.py", "fit", "correctness_reward_func", '"num_generations": 8',
                 "strict_accuracy | 0.1250", "optimizer steps | 60"):  # fmt: skip
        assert text in card, text
    record = json.loads((exported / "grpo_training.json").read_text())
    assert record["global_step"] == 60 and record["hyperparameters"]["model"]["optim"]["lr"] == 0.003


@pytest.mark.parametrize(
    "make, message",
    [(lambda p: p, "does not exist"), (lambda p: p.write_bytes(b"not a checkpoint"), "is not a readable Lightning checkpoint"),
     (lambda p: torch.save({"state_dict": {"model.w": torch.zeros(1)}}, p), "holds no policy weights")],
)  # fmt: skip
def test_bad_checkpoints_are_named(tmp_path, make, message, capsys):
    ckpt = tmp_path / "bad.ckpt"
    make(ckpt)
    assert grpo(["export", str(ckpt), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "bad.ckpt" in err
    assert not (tmp_path / "o").exists()


def test_folder_that_is_not_a_model(tmp_path, capsys):
    assert grpo(["export", str(tmp_path)]) == 2
    assert "neither a .ckpt nor an exported model folder" in capsys.readouterr().err


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants as constants

    with HubStub() as stub:
        monkeypatch.setattr(constants, "ENDPOINT", stub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield stub


def test_push_uploads_every_file_with_the_token(exported, hub, capsys):
    assert grpo(["export", str(exported), "--push-to-hub", "alice/tiny-grpo", "--private"]) == 0
    assert hub.repos["alice/tiny-grpo"]["visibility"] == "private"
    uploaded = hub.files["alice/tiny-grpo"]
    local = {p.name: p.read_bytes() for p in exported.iterdir() if p.is_file()}
    assert uploaded == local  # every file, byte for byte
    assert "# alice/tiny-grpo" in uploaded["README.md"].decode()  # the card names the repository
    assert f"Bearer {TOKEN}" in hub.auth_headers
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err


def test_push_without_a_token_says_how_to_get_one(exported, hub, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no cached login either
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "token"))
    with pytest.raises(HubError, match="set HF_TOKEN"):
        push_to_hub(exported, "alice/tiny-grpo")
    assert not hub.repos


def test_push_to_an_unreachable_hub(exported, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE") as info:
        push_to_hub(exported, "alice/tiny-grpo")
    assert TOKEN not in str(info.value)


def test_push_at_the_end_of_training(tmp_path, hub):
    import yaml

    from conftest import demo_config
    from grpo_lightning.cli import main

    cfg = demo_config(tmp_path, trainer={"max_steps": 2}, data={"val_size": 0})
    cfg_dict = yaml.safe_load(cfg.read_text())
    cfg_dict["trainer"]["callbacks"][2]["init_args"].update(push_to_hub="alice/demo", zip=True)
    cfg.write_text(yaml.safe_dump(cfg_dict))
    main(["fit", "--config", str(cfg)])
    assert {"model.safetensors", "README.md", "grpo_training.json"} <= set(hub.files["alice/demo"])
    assert (tmp_path / "run" / "hf_export.zip").is_file()


def test_training_with_push_but_no_token_fails_before_training(tmp_path, monkeypatch):
    import yaml

    from conftest import demo_config
    from grpo_lightning.cli import main

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "token"))
    cfg = demo_config(tmp_path, trainer={"max_steps": 2})
    cfg_dict = yaml.safe_load(cfg.read_text())
    cfg_dict["trainer"]["callbacks"][2]["init_args"]["push_to_hub"] = "alice/demo"
    cfg.write_text(yaml.safe_dump(cfg_dict))
    with pytest.raises(HubError, match="HF_TOKEN"):
        main(["fit", "--config", str(cfg)])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_exported_folder_is_readable_like_any_new_folder(exported):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(exported.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's owner-only 0700
    assert stat.S_IMODE((exported / "model.safetensors").stat().st_mode) == 0o666 & ~umask
