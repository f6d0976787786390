"""What we hand to users: Hugging Face folders, a model card, a ``.zip``, Hub uploads and JSON/JSONL files.

A leaf module (no project imports). Every write is crash-safe: whole files and folders are written under a
temporary name and renamed into place, and a JSONL append leaves its line whole or absent, so a killed
process or a full disk never leaves a half-written file that looks valid. Temporary names carry the writer's
process id (``.<name>.tmp-<pid>-…``): what a killed writer left behind is removed on the next start.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TRAINING_RECORD = "grpo_training.json"
"""File inside an export folder with how the model was trained (base model, data, command, settings)."""
EVAL_SUMMARY = "eval_summary.json"
"""File inside an export folder with evaluation results; the model card shows them."""
EXPORT_MARKER = ".grpo-lightning-export"
"""Hidden file inside every folder we write, listing its files: only such a folder is ever replaced (never uploaded)."""


class OutputExistsError(FileExistsError):
    """The output folder holds files we did not write; the message says how to proceed."""


# ------------------------------------------------------------------------------------------- files
@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A file opened under a temporary sibling name; on success flushed to disk and renamed to ``path``.

    The file gets the permissions a plain ``open`` would give (0666 less the umask), not ``mkstemp``'s 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def umask() -> int:
    """The process's umask, read from /proc where possible: setting it to read it races with other threads' files."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def looks_like_path(name: str, suffixes: tuple[str, ...] = ()) -> bool:
    """True when ``name`` can only mean a local file or folder, never a Hub repository (``user/name``).

    So a mistyped path fails at once with "no such file or folder" instead of a minute of Hub retries: it exists,
    starts with ``./ ../ / ~``, ends with one of ``suffixes`` (``.jsonl``), has more than one ``/`` or a ``\\``, or
    its first part is a local folder (``runs/nope`` where ``runs/`` exists).
    """
    path = Path(name).expanduser()
    if name.startswith(("./", "../", "/", "~")) or name in (".", "..") or "\\" in name or path.exists():
        return True
    parts = Path(name).parts
    return path.suffix.lower() in suffixes or len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


_STARTED = time.time()  # files of ours older than this process with no owner id are leftovers of an earlier one
_TEMPORARY = r"\.(?P<target>{})\.(?:tmp|old)-(?:(?P<pid>\d+)(?=-|\.zip$|$))?"


def remove_stale_temporaries(folder: str | Path, target: str = r".+") -> list[Path]:
    """Delete what killed writers of ours left in ``folder``: ``.<name>.tmp-<pid>-…`` files and folders and
    ``.<name>.old-<pid>`` folders whose ``<name>`` matches the regular expression ``target``.

    Only leftovers: the writing process no longer exists (or, for names without a process id, written by
    an earlier version, the entry is older than this process). Returns what was removed.
    """
    folder = Path(folder)
    pattern = re.compile(_TEMPORARY.format(target))
    removed = []
    for entry in folder.iterdir() if folder.is_dir() else ():
        match = pattern.match(entry.name)
        if match is None or not _abandoned(entry, match["pid"]):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _abandoned(entry: Path, pid: str | None) -> bool:
    if pid is None:
        return entry.lstat().st_mtime < _STARTED
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def write_atomic(path: str | Path, text: str) -> Path:
    with atomic_open(path) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, value: Any) -> Path:
    return write_atomic(path, json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    return write_atomic(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def append_jsonl(path: str | Path, row: Mapping[str, Any]) -> None:
    """Append one row as one line on an ``O_APPEND`` descriptor, under a file lock; the line is whole or absent.

    Writers never interleave inside a line, an existing file is never truncated below what it held, and a line
    left incomplete by an earlier crash is closed with a newline first, so every other line stays valid. A failed
    write (a full disk) cuts the file back to its previous size and raises an ``OSError`` naming the file.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(row, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)  # the umask applies, as for open()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the torn-line check below must not see another writer's half-done write
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        try:
            _write_all(fd, line)
            os.fsync(fd)  # a full disk can surface only here
        except OSError as err:
            os.ftruncate(fd, size)  # never leave part of the line behind
            raise _write_error(path, err) from None
    finally:
        os.close(fd)  # releases the lock


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _write_error(path: Path, err: OSError) -> OSError:
    full = err.errno in (errno.ENOSPC, errno.EDQUOT)
    reason = "the disk is full (no space left on device)" if full else (err.strerror or str(err))
    error = OSError(f"could not append to {str(path)!r}: {reason}; the line was not written and the file keeps "
                    "its earlier lines whole")  # fmt: skip
    error.errno = err.errno
    return error


# -------------------------------------------------------------------------------------- HF folders
def save_hf_folder(model: Any, tokenizer: Any, out_dir: str | Path, extra_files: Mapping[str, str] | None = None,
                   *, overwrite: bool = False) -> Path:  # fmt: skip
    """``save_pretrained`` model (safetensors), tokenizer and generation config into ``out_dir``.

    ``extra_files`` (name → text, e.g. a model card) are written alongside. Everything goes to a temporary
    sibling folder first and is swapped in with renames, so ``out_dir`` is at every moment either the
    previous complete export or the new complete one. An existing ``out_dir`` is replaced only when it is
    empty or a previous export of ours with nothing added (or with ``overwrite``): never a folder of the user's.
    """
    out_dir = Path(out_dir)
    check_replaceable(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir.parent, re.escape(out_dir.name))  # of an export killed mid-way
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        written = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        (tmp / EXPORT_MARKER).write_text(json.dumps({"written_by": "grpo-lightning", "files": written}) + "\n")
        _usual_permissions(tmp)
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def export_policy(model: Any, tokenizer: Any, out_dir: str | Path, *, record: Mapping[str, Any] | None = None,
                  evaluation: Mapping[str, Any] | None = None, repo_id: str | None = None,
                  adapter_only: bool = False, overwrite: bool = False) -> Path:  # fmt: skip
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
    return save_hf_folder(model, tokenizer, out_dir, extra_files=files, overwrite=overwrite)


def check_replaceable(target: Path, overwrite: bool = False) -> None:
    """Raise :class:`OutputExistsError` unless ``target`` is absent, empty, or an unaltered export of ours."""
    if overwrite or not target.exists():
        return
    if not target.is_dir():
        raise OutputExistsError(f"{str(target)!r} exists and is not a folder: choose another output path")
    present = {str(p.relative_to(target)) for p in target.rglob("*") if not p.is_dir()}
    if not present:
        return
    marker = _read_json(target / EXPORT_MARKER)
    ours = (
        set(marker.get("files", [])) | {EXPORT_MARKER, EVAL_SUMMARY, "README.md"} if isinstance(marker, dict) else set()
    )
    foreign = sorted(present - ours)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputExistsError(
            f"refusing to replace {str(target)!r}: it holds files grpo-lightning did not write ({shown}). "
            "Choose a new or empty folder, or pass --overwrite (HFExport: overwrite: true) to replace it"
        )


def _usual_permissions(folder: Path) -> None:
    """What a plain ``mkdir`` and ``open`` would have given (``mkdtemp`` makes the folder private to its owner)."""
    mask = umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


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
        lines += [
            f"| {k} | {_fmt(v)} |" for k, v in evaluation.get("metrics", evaluation).items() if not isinstance(v, dict)
        ]
        if evaluation.get("data"):
            lines += [
                "",
                f"On `{evaluation['data']}` ({evaluation.get('num_problems', '?')} problems), greedy decoding.",
            ]
        lines.append("")
    here = repo_id or "path/to/this/folder"
    load = (
        [
            "from peft import AutoPeftModelForCausalLM",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{here}")  # base + LoRA adapter',
        ]
        if adapter
        else [
            "from transformers import AutoModelForCausalLM",
            f'model = AutoModelForCausalLM.from_pretrained("{here}")',
        ]
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
        'its chat template; `grpo infer --model <this model> "question"` applies both.',
        "",
    ]
    return "\n".join(front) + "\n\n" + "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _is_hub_id(name: Any) -> bool:
    return isinstance(name, str) and name.count("/") == 1 and not looks_like_path(name)


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
        commit = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model", commit_message=commit_message,
                                   ignore_patterns=[EXPORT_MARKER])  # fmt: skip
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", "?")
        raise HubError(
            f"uploading {str(folder)!r} to {repo_id!r} failed (HTTP {status}): {str(err).splitlines()[0]}"
        ) from None
    except _connection_errors() as err:  # offline mode, connection refused, DNS, timeouts
        raise HubError(
            f"cannot reach the Hub at {api.endpoint} to push {repo_id!r} ({type(err).__name__}): this machine looks "
            "offline. Check the network (and unset HF_HUB_OFFLINE); the exported folder is complete and can be pushed "
            f"later with `grpo export {folder} --push-to-hub {repo_id}`."
        ) from None
    return str(getattr(commit, "repo_url", None) or f"{api.endpoint}/{repo_id}")


def _connection_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises without a network: ``OSError`` (offline mode, sockets) and the transport errors of
    the HTTP library it uses (huggingface_hub 1.x: httpx; 2.x: httpx2), which are not ``OSError``s."""
    import importlib

    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)
