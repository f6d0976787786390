"""The package's layering, read from its source: lower files never import higher ones, there is no import cycle,
the GRPO maths, configs, log-probs and rollout stay importable without Lightning, and only rollout.py knows vLLM."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "grpo_lightning"
LIGHTNING_FREE = {
    "algorithm",
    "batch",
    "config",
    "data",
    "distributed",
    "dynamic_sampling",
    "evaluation",
    "export",
    "hardware",
    "inference",
    "logprobs",
    "metrics",
    "models",
    "optimization",
    "preflight",
    "rewards",
    "rollout",
    "rollout_worker",
    "shared_prompt",
    "tiny",
}  # everything but the module, callbacks, CLI


def imports(name: str) -> tuple[set[str], set[str]]:
    """The grpo_lightning modules and the other top-level packages that ``name`` imports (anywhere in the file)."""
    ours, others = set(), set()
    for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text())):
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module]
        for module in modules:
            if module.startswith("grpo_lightning."):
                ours.add(module.split(".")[1])
            else:
                others.add(module.split(".")[0])
    return ours, others


def graph() -> dict[str, set[str]]:
    return {path.stem: imports(path.stem)[0] for path in PACKAGE.glob("*.py") if path.stem != "__init__"}


def test_imports_have_no_cycle():
    edges, done, order = graph(), set(), []

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' → '.join(path + (name,))}"
        if name not in done:
            for dependency in sorted(edges[name]):
                visit(dependency, path + (name,))
            done.add(name)
            order.append(name)

    for name in sorted(edges):
        visit(name, ())
    assert order.index("module") > order.index("logprobs") and order[-1] in {"cli", "module"}


def test_the_maths_configs_and_rollout_never_reach_lightning():
    edges = graph()
    for name in sorted(LIGHTNING_FREE):
        reachable, todo = set(), [name]
        while todo:
            current = todo.pop()
            if current not in reachable:
                reachable.add(current)
                todo += edges[current]
        for module in reachable:
            assert "lightning" not in imports(module)[1], f"{name} reaches Lightning through {module}"


def test_only_rollout_imports_vllm():
    users = {path.stem for path in PACKAGE.glob("*.py") if "vllm" in imports(path.stem)[1]}
    assert users == {"rollout"}


def test_only_the_lightning_modules_build_optimizers():
    """GRPOModule, and WarmupModule for the supervised stage before it; no callback, engine or CLI code."""
    users = {name for name, deps in graph().items() if "optimization" in deps}
    assert users == {"module", "warmup"}
