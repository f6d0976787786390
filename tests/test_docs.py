"""The documentation cannot rot: every `>>>` example runs, every command and config snippet parses against the real
command-line interfaces, and the custom-reward walkthrough trains."""

from __future__ import annotations

import argparse
import contextlib
import doctest
import functools
import io
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO

DOCS = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]
RUNNABLE = ("python", "grpo", ".venv/bin/grpo", "./scripts/", "pip", "torchrun", "srun")


def blocks(language: str) -> list[tuple[Path, str]]:
    return [
        (path, body)
        for path in DOCS
        for lang, body in re.findall(r"```(\w*)\n(.*?)```", path.read_text(), re.S)
        if lang == language
    ]


def shell_commands() -> list[tuple[str, list[str]]]:
    """Every command of every ```bash block."""
    found = []
    for path, body in blocks("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):  # environment assignments before a command
                argv = argv[1:]
            if argv:
                found.append((f"{path.name}: {line.strip()[:80]}", argv))
    return found


def inline_commands() -> list[tuple[str, list[str]]]:
    """Command fragments quoted in the prose (`grpo export <ckpt> --adapter-only`): their flags must exist."""
    spans = {span for path in DOCS for span in re.findall(r"`((?:python \S+\.py|grpo \w+)[^`]*)`", path.read_text())}
    return [(span[:80], span.replace("…", "").split()) for span in sorted(spans)]


COMMANDS = shell_commands()
INLINE = inline_commands()


def tier(argv: list[str]):
    """Checking a `python <script>` command's flags runs its --help in a subprocess (seconds where the script imports
    torch first): end-to-end tier."""
    spawns = (
        argv[0] == "python" and len(argv) > 1 and argv[1] != "train.py" and any(a.startswith("--") for a in argv[2:])
    )
    return pytest.mark.e2e if spawns else ()


@functools.cache
def help_text(command: tuple[str, ...]) -> str:
    """--help of `grpo <sub>`, `python train.py <sub>` or `python <script>` (in-process where possible)."""
    if command[0] == "grpo":
        from grpo_lightning.cli import _parser

        subcommands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
        return subcommands.choices[command[1]].format_help()
    if command[1] == "train.py":
        from grpo_lightning.cli import main

        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            main([command[2], "--help"])
        return out.getvalue()
    return subprocess.run([sys.executable, *command[1:2], "--help"], capture_output=True, text=True, cwd=REPO).stdout


def command_of(argv: list[str]) -> tuple[str, ...]:
    return tuple(argv[:2] if argv[0] == "grpo" or argv[1] != "train.py" else argv[:3])


def parse_train_command(args: list[str], capsys) -> None:
    from grpo_lightning.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])  # parses and type-checks every key, then exits
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]


def test_the_docs_have_commands():
    assert len(COMMANDS) > 20 and len(INLINE) > 10 and len(blocks("yaml")) >= 1


@pytest.mark.parametrize(
    "argv", [pytest.param(argv, marks=tier(argv)) for _, argv in COMMANDS], ids=[name for name, _ in COMMANDS]
)
def test_command_is_valid(argv, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert argv[0].startswith(RUNNABLE), f"a documented command this test does not know how to check: {argv}"
    if argv[0] == "srun":
        argv = argv[1:]
    if argv[0] == "torchrun":  # the launcher's own flags, then the script
        argv = ["python", *argv[argv.index("train.py") :]]
    if argv[0] == ".venv/bin/grpo":
        argv = ["grpo", *argv[1:]]
    if argv[0].startswith("./scripts/"):
        script = REPO / argv[0]
        assert script.is_file() and os.access(script, os.X_OK), script
    elif argv[0] == "pip":
        extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        for spec in argv[2:]:
            for extra in re.findall(r"\[([\w,]+)\]", spec):
                assert set(extra.split(",")) <= set(extras), spec
    elif argv[0] == "grpo":
        from grpo_lightning.cli import _parser

        args, overrides = _parser().parse_known_args(argv[1:])  # unknown flags or subcommands exit with an error
        if overrides:  # only `grpo preflight` takes recipe fields, and they must parse as train.py's
            assert args.command == "preflight", overrides
            parse_train_command(["fit", *(a for c in args.config for a in ("--config", c)), *overrides], capsys)
    elif argv[:2] == ["python", "train.py"]:
        parse_train_command(argv[2:], capsys)
    else:  # python benchmarks/… or scripts/…: the file exists and knows every flag used
        script = REPO / argv[1]
        assert script.is_file(), script
        flags = [a.split("=")[0] for a in argv[2:] if a.startswith("--")]
        if flags:
            text = help_text(command_of(argv))
            assert all(flag in text for flag in flags), (flags, text[-500:])


@pytest.mark.parametrize(
    "argv", [pytest.param(argv, marks=tier(argv)) for _, argv in INLINE], ids=[name for name, _ in INLINE]
)
def test_quoted_command_fragments_use_real_flags(argv):
    flags = [a.split("=")[0] for a in argv if a.startswith("--")]
    if argv[0] == "python":
        assert (REPO / argv[1]).is_file(), argv[1]
    if flags:
        text = help_text(command_of(argv))
        if argv[:2] == ["grpo", "preflight"]:  # it also takes the recipe's fields, as train.py does
            text += help_text(("python", "train.py", "fit"))
        missing = [f for f in flags if f not in text]
        assert not missing, f"{' '.join(argv)}: {missing} not in its --help"


@pytest.mark.parametrize("index", range(len(blocks("yaml"))))
def test_yaml_snippet_merges_into_the_recipe(index, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    snippet = tmp_path / "snippet.yaml"
    snippet.write_text(blocks("yaml")[index][1])
    parse_train_command(["fit", "--config", "configs/qwen2.5-0.5b-gsm8k.yaml", "--config", str(snippet)], capsys)


def test_python_snippets_import_what_exists():
    for path, body in blocks("python"):
        if ">>>" in body:
            continue  # doctests: run below
        compile(body, str(path), "exec")
        imports = "\n".join(
            line for line in body.splitlines() if line.startswith(("from grpo_lightning", "import grpo_lightning"))
        )
        exec(imports, {})


def test_algorithm_page_quotes_the_training_step_verbatim():
    (excerpt,) = [body for path, body in blocks("python") if path.name == "algorithm.md" and "self.generate(" in body]
    source = {line.strip() for line in (REPO / "grpo_lightning" / "module.py").read_text().splitlines()}
    assert [line for line in excerpt.splitlines() if line.strip() and line.strip() not in source] == []


@pytest.mark.parametrize("page", ["rewards.md", "data.md"])
def test_doc_examples_run(page):
    result = doctest.testfile(
        str(REPO / "docs" / page), module_relative=False, optionflags=doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0 and result.failed == 0


def test_checkpoint_doc_examples_run_on_a_demo_run(short_run, tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "cpu-demo").symlink_to(short_run / "run")  # the layout ./scripts/demo.sh leaves
    monkeypatch.chdir(tmp_path)
    result = doctest.testfile(
        str(REPO / "docs" / "checkpoints.md"), module_relative=False, optionflags=doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.e2e
def test_custom_reward_walkthrough_trains(tmp_path, monkeypatch):
    """docs/rewards.md: write my_rewards.py, run its command (2 steps), see the new reward logged."""
    from conftest import demo_config, metrics

    (source,) = [body for _, body in blocks("python") if body.startswith("# my_rewards.py")]
    (tmp_path / "my_rewards.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    ((_, argv),) = [
        (n, a) for n, a in COMMANDS if n.startswith("rewards.md") and "my_rewards:brevity_reward" in " ".join(a)
    ]
    from grpo_lightning.cli import main

    args = [
        a if a != "configs/cpu-demo.yaml" else str(demo_config(tmp_path, trainer={"max_steps": 2})) for a in argv[2:]
    ]
    main(args)
    rows = [r for r in metrics(tmp_path) if r.get("train/rewards/brevity_reward")]
    assert len(rows) == 2 and all(0 < float(r["train/rewards/brevity_reward"]) <= 0.5 for r in rows)


@pytest.mark.e2e
def test_gpu_benchmark_smoke_runs_on_cpu():
    """BENCHMARKS.md calls `benchmarks/gpu.py --tiny` its CPU smoke test: it must run and print the estimate."""
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--tiny"], capture_output=True, text=True,
                         cwd=REPO, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "optimizer step (s)" in out.stdout and "epoch estimate:" in out.stdout


def test_readme_says_which_python_runs_train_py_and_what_ctrl_c_returns():
    """A fresh clone has no `python` with the project's packages: the help command names the venv's (issue 20)."""
    readme = (REPO / "README.md").read_text()
    assert "`.venv/bin/python train.py fit --help`" in readme and "source .venv/bin/activate" in readme
    assert "exit status 130" in readme  # tests/test_reliability.py checks that Ctrl-C really exits 130
    assert (REPO / "scripts" / "setup.sh").read_text().count(".venv") > 0  # the venv the README names is the one set up
