"""Export: checkpoint → HF folder with identical logits, zip, model card, and the Hub upload path."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from conftest import SHORT_RUN_STEPS
from hub_stub import HubStub

from grpo_lightning.cli import grpo
from grpo_lightning.export import EXPORT_MARKER, HubError, OutputExistsError, push_to_hub, save_hf_folder

TOKEN = "hf_TESTtoken0123456789abcdef"


@pytest.fixture(scope="module")
def exported(short_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    summary = out.parent / "summary.json"
    summary.write_text(json.dumps({"data": "gsm8k test", "num_problems": 5, "metrics": {"strict_accuracy": 0.125}}))
    ckpt = short_run / "run" / "checkpoints" / "last.ckpt"
    assert grpo(["export", str(ckpt), "--out", str(out), "--zip", "--eval-summary", str(summary)]) == 0
    return out


def test_checkpoint_export_reloads_with_identical_logits(short_run, exported):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    state = torch.load(short_run / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    policy = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(short_run / "tiny-qwen2"))
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
                 "strict_accuracy | 0.1250", f"optimizer steps | {SHORT_RUN_STEPS} |"):  # fmt: skip
        assert text in card, text
    record = json.loads((exported / "grpo_training.json").read_text())
    assert record["global_step"] == SHORT_RUN_STEPS and record["hyperparameters"]["model"]["optim"]["lr"] == 0.003


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


@pytest.fixture
def policy_ckpt(tmp_path, tiny_checkpoint):
    """A minimal checkpoint of this project: the tiny model's weights under 'policy.'."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    path = tmp_path / "policy.ckpt"
    torch.save({"state_dict": {f"policy.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"policy": {"name_or_path": str(tiny_checkpoint)}},
                "hf_config": model.config.to_dict()}, path)  # fmt: skip
    return path


def test_export_never_empties_a_folder_it_did_not_write(policy_ckpt, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints" / "step-1.ckpt").write_bytes(b"x")
    assert grpo(["export", str(policy_ckpt), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "refusing to replace" in err and "notes.txt" in err and "--overwrite" in err
    assert (run / "notes.txt").read_text() == "mine" and (run / "checkpoints" / "step-1.ckpt").is_file()
    assert not (run / "config.json").exists()


def test_export_replaces_its_own_previous_export_and_overwrite_replaces_any(policy_ckpt, tmp_path):
    out = tmp_path / "export"
    assert grpo(["export", str(policy_ckpt), "--out", str(out)]) == 0
    assert grpo(["export", str(policy_ckpt), "--out", str(out)]) == 0  # ours, unaltered: replaced
    (out / "notes.txt").write_text("added by hand")
    with pytest.raises(OutputExistsError, match="notes.txt"):
        save_hf_folder(None, None, out)  # refused before anything is written
    assert grpo(["export", str(policy_ckpt), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()


def test_hf_export_callback_refuses_a_foreign_folder_before_training(tmp_path):
    from types import SimpleNamespace

    from grpo_lightning.callbacks import HFExport

    (tmp_path / "hf_export").mkdir()
    (tmp_path / "hf_export" / "data.csv").write_text("1,2")
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), is_global_zero=True)
    with pytest.raises(OutputExistsError, match="data.csv"):
        HFExport().setup(trainer, None, "fit")
    HFExport(overwrite=True).setup(trainer, None, "fit")


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
    local = {p.name: p.read_bytes() for p in exported.iterdir() if p.is_file() and p.name != EXPORT_MARKER}
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


@pytest.mark.e2e
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


def test_push_without_a_network_is_one_clear_line(tmp_path, monkeypatch, capsys):
    """A token but no network: the client's connection error (httpx's, not an OSError) becomes one line, exit 2."""
    import socket

    import huggingface_hub.constants as constants

    with socket.socket() as probe:  # a port nothing listens on: connection refused, as offline
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    assert grpo(["export", str(folder), "--push-to-hub", "alice/tiny-grpo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("grpo export: error: cannot reach the Hub") and err.count("\n") == 1, err
    assert "offline" in err and "--push-to-hub alice/tiny-grpo" in err and TOKEN not in err
