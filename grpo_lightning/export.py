"""What we hand to users: Hugging Face folders, a model card, a ``.zip``, Hub uploads and JSON/JSONL files.

A leaf module (no project imports). Every write is crash-safe: whole files and folders are written under a
temporary name and renamed into place, and JSONL appends add one complete line per ``write`` call, so a
killed process never leaves a half-written file that looks valid.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TRAINING_RECORD = "grpo_training.json"
"""File inside an export folder with how the model was trained (base model, data, command, settings)."""
EVAL_SUMMARY = "eval_summary.json"
"""File inside an export folder with evaluation results; the model card shows them."""


# ------------------------------------------------------------------------------------------- files
@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A file opened under a temporary sibling name; on success flushed to disk and renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, text: str) -> Path:
    with atomic_open(path) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, value: Any) -> Path:
    return write_atomic(path, json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    return write_atomic(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def append_jsonl(path: str | Path, row: Mapping[str, Any]) -> None:
    """Append one row as one line with a single ``write`` on an ``O_APPEND`` descriptor, under a file lock.

    Writers never interleave inside a line, an existing file is never truncated, and a line left
    incomplete by an earlier crash is closed with a newline first, so every other line stays valid.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(row, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the torn-line check below must not see another writer's half-done write
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"short write to {path}: {written} of {len(line)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock


# -------------------------------------------------------------------------------------- HF folders
def save_hf_folder(model: Any, tokenizer: Any, out_dir: str | Path, extra_files: Mapping[str, str] | None = None) -> Path:
    """``save_pretrained`` model (safetensors), tokenizer and generation config into ``out_dir``.

    ``extra_files`` (name → text, e.g. a model card) are written alongside. Everything goes to a temporary
    sibling folder first and is swapped in with renames, so ``out_dir`` is at every moment either the
    previous complete export or the new complete one.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        _usual_permissions(tmp)
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def export_policy(model: Any, tokenizer: Any, out_dir: str | Path, *, record: Mapping[str, Any] | None = None,
                  evaluation: Mapping[str, Any] | None = None, repo_id: str | None = None,
                  adapter_only: bool = False) -> Path:  # fmt: skip
    """An HF folder with the model, tokenizer, training record, evaluation summary and model card.

    A LoRA (peft) model is written merged into a plain model, or with ``adapter_only`` as its adapter alone
    (``adapter_model.safetensors``, loaded onto the base model with ``PeftModel.from_pretrained``).
    """
    adapter = hasattr(model, "merge_and_unload")  # a peft model
    if adapter and not adapter_only:
        model, adapter = copy.deepcopy(model).merge_and_unload(), False  # a copy: the live adapters keep training
    model.config.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    files = {"README.md": model_card(record or {}, evaluation, repo_id, adapter=adapter)}
    if record:
        files[TRAINING_RECORD] = json.dumps(record, indent=2, ensure_ascii=False, default=str) + "\n"
    if evaluation:
        files[EVAL_SUMMARY] = json.dumps(evaluation, indent=2, ensure_ascii=False, default=str) + "\n"
    return save_hf_folder(model, tokenizer, out_dir, extra_files=files)


def _usual_permissions(folder: Path) -> None:
    """What a plain ``mkdir`` and ``open`` would have given (``mkdtemp`` makes the folder private to its owner)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _swap_in(new: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def zip_folder(folder: str | Path, zip_path: str | Path | None = None) -> Path:
    """``folder`` as a ``.zip`` beside it (the notebook's download step), written atomically."""
    folder = Path(folder)
    zip_path = Path(zip_path) if zip_path else folder.with_suffix(".zip")
    tmp_base = zip_path.with_name(f".{zip_path.stem}.tmp-{os.getpid()}")
    made = Path(shutil.make_archive(str(tmp_base), "zip", root_dir=folder))
    os.replace(made, zip_path)
    return zip_path


# -------------------------------------------------------------------------------------- model card
def model_card(record: Mapping[str, Any], evaluation: Mapping[str, Any] | None = None, repo_id: str | None = None,
               adapter: bool = False) -> str:  # fmt: skip
    """A Hub model card (README.md): base model, data, command, settings, rewards and evaluation results."""
    base = record.get("base_model", "unknown")
    dataset = record.get("dataset", "unknown")
    library = "peft" if adapter else "transformers"
    front = ["---", f"library_name: {library}", "pipeline_tag: text-generation", "tags:", "- grpo", "- grpo-lightning"]
    if _is_hub_id(base):
        front.append(f"base_model: {base}")
    if _is_hub_id(dataset):
        front += ["datasets:", f"- {dataset}"]
    front.append("---")
    title = repo_id or "GRPO fine-tune"
    lines = [
        f"# {title}",
        "",
        f"`{base}` fine-tuned with GRPO (Group Relative Policy Optimization) by "
        "[grpo-lightning](https://github.com/grpo-lightning/grpo-lightning) to answer in the format "
        "`<reasoning>…</reasoning><answer>…</answer>`.",
        "",
        "| | |",
        "| --- | --- |",
        f"| base model | `{base}` |",
        f"| training data | `{dataset}` |",
        f"| optimizer steps | {record.get('global_step', 'unknown')} |",
        f"| reward functions | {', '.join(f'`{r}`' for r in record.get('reward_funcs', [])) or 'unknown'} |",
        "",
    ]
    if record.get("command"):
        lines += ["## Training command", "", "```bash", str(record["command"]), "```", ""]
    if record.get("hyperparameters"):
        settings = json.dumps(record["hyperparameters"], indent=2, ensure_ascii=False, default=str)
        lines += ["## Hyperparameters", "", "```json", settings, "```", ""]
    if evaluation:
        lines += ["## Evaluation", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in evaluation.get("metrics", evaluation).items() if not isinstance(v, dict)]
        if evaluation.get("data"):
            lines += ["", f"On `{evaluation['data']}` ({evaluation.get('num_problems', '?')} problems), greedy decoding."]
        lines.append("")
    here = repo_id or "path/to/this/folder"
    load = (
        ["from peft import AutoPeftModelForCausalLM", f'model = AutoPeftModelForCausalLM.from_pretrained("{here}")  # base + LoRA adapter']
        if adapter
        else ["from transformers import AutoModelForCausalLM", f'model = AutoModelForCausalLM.from_pretrained("{here}")']
    )
    lines += [
        "## Usage",
        "",
        "```python",
        *load,
        "from transformers import AutoTokenizer",
        f'tokenizer = AutoTokenizer.from_pretrained("{here}")',
        "```",
        "",
        "The model expects the system prompt it was trained with (`grpo_lightning.rewards.SYSTEM_PROMPT`) and "
        "its chat template; `grpo infer --model <this model> \"question\"` applies both.",
        "",
    ]
    return "\n".join(front) + "\n\n" + "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _is_hub_id(name: Any) -> bool:
    return isinstance(name, str) and name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def write_model_card(folder: str | Path, repo_id: str | None = None) -> Path:
    """Write ``README.md`` into an export folder from its training record and evaluation summary."""
    folder = Path(folder)
    record = _read_json(folder / TRAINING_RECORD) or {}
    evaluation = _read_json(folder / EVAL_SUMMARY)
    adapter = (folder / "adapter_config.json").is_file()
    return write_atomic(folder / "README.md", model_card(record, evaluation, repo_id, adapter=adapter))


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# ---------------------------------------------------------------------------------------- the Hub
class HubError(RuntimeError):
    """Publishing to the Hub failed; the message says why (never containing the token)."""


def hub_token() -> str:
    """The token from ``HF_TOKEN`` or the cached ``hf auth login``; a clear error without one."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise HubError(
            "pushing to the Hugging Face Hub needs a token: set HF_TOKEN (a write token from "
            "https://huggingface.co/settings/tokens) or run `hf auth login`"
        )
    return token


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, endpoint: str | None = None,
                commit_message: str = "Upload GRPO fine-tune") -> str:  # fmt: skip
    """Create ``repo_id`` if needed and upload ``folder`` (model, tokenizer, card) in one commit; returns its URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise HubError(f"{str(folder)!r} is not an exported model folder (no config.json)")
    api = HfApi(endpoint=endpoint, token=hub_token())
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model", commit_message=commit_message)
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", "?")
        raise HubError(f"uploading {str(folder)!r} to {repo_id!r} failed (HTTP {status}): {str(err).splitlines()[0]}") from None
    except OSError as err:  # connection refused, DNS, offline mode
        raise HubError(
            f"cannot reach the Hub to push {repo_id!r} ({type(err).__name__}). Unset HF_HUB_OFFLINE and check the "
            "network; the exported folder is complete and can be pushed later with `grpo export FOLDER --push-to-hub`."
        ) from None
    return str(getattr(commit, "repo_url", None) or f"{api.endpoint}/{repo_id}")
