"""The package follows its data flow: no import cycle between rlhf's packages, short functions."""

from __future__ import annotations

import ast
import subprocess
import sys

from support.paths import ROOT

PACKAGE = ROOT / "rlhf"
MAX_FUNCTION_LINES = 60
# docs/design.md's package diagram, bottom up: a package imports only packages of lower layers.
LAYERS = (
    {"errors"},
    {"config", "metrics", "registry", "runtime"},
    {"data", "tracking"},
    {"models", "store"},
    {"eval", "cli"},
    {"train"},
    {"dpo", "ppo", "serve"},
    {"online"},
)


def _package_of(module: str) -> str | None:
    """``rlhf.ppo.trainer`` -> ``ppo``; top-level modules (``rlhf.cli``) are their own package."""
    parts = module.split(".")
    return parts[1] if parts[0] == "rlhf" and len(parts) > 1 else None


def package_imports() -> dict[str, set[str]]:
    """{package: packages it imports}, from every import statement (also those inside functions)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(ROOT).with_suffix("")
        own = _package_of(".".join(relative.parts).removesuffix(".__init__"))
        if own is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for other in {_package_of(name) for name in names} - {None, own}:
                graph.setdefault(own, set()).add(other)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle in ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":  # back to a package on the current path
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_no_import_cycle_between_packages() -> None:
    graph = package_imports()
    assert graph["ppo"] >= {"config", "models"}  # the scan sees real imports
    assert "config" not in graph  # the config layer depends on no other package
    assert find_cycle(graph) is None, find_cycle(graph)


def test_packages_import_only_lower_layers() -> None:
    layer = {package: k for k, packages in enumerate(LAYERS) for package in packages}
    graph = package_imports()
    assert set(graph) | {p for imported in graph.values() for p in imported} <= set(layer), \
        "a package missing from LAYERS: add it to its layer here and in docs/design.md"
    upward = sorted(f"{own} -> {other}" for own, imported in graph.items() for other in imported
                    if layer[other] >= layer[own])
    assert not upward, upward


def test_no_function_longer_than_the_limit() -> None:
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


# Modules loaded by processes that never run a model: Serve's HTTP ingress replica and the driver
# that deploys the app (jobs/serve.py, alive as long as the app), and Ray Train's controller, which
# unpickles the train function. Each would otherwise pay torch + transformers (~4 CPU-s, ~0.4 GiB).
MODEL_FREE = ("rlhf.serve.app", "rlhf.serve.api", "rlhf.train.rank_entry")


def test_processes_that_run_no_model_import_neither_torch_nor_transformers() -> None:
    probe = ("import importlib, sys\n"
             f"for name in {MODEL_FREE!r}:\n"
             "    importlib.import_module(name)\n"
             "    heavy = ('torch', 'transformers', 'peft', 'deepspeed')\n"
             "    print(name, sorted(m for m in heavy if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [f"{name} []" for name in MODEL_FREE]
