"""The package's import graph: no cycles (lazy imports inside functions included), no side effects at import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "grokviz"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(mod: str, is_pkg: bool, level: int, target: str | None) -> str:
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict[str, set[str]]:
    """{module: grokviz modules it imports anywhere in its body} (``from x import y`` counts y when y is a module)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node.level, node.module) if node.level else (node.module or "")
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if t in mods and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def _is_ancestor_edge(a: str, b: str) -> bool:
    """A package's __init__ importing its own submodules (and a submodule importing a name the package
    re-exports) is the normal shape of a package, not a cycle between modules."""
    return b.startswith(a + ".") or a.startswith(b + ".")


def test_finder_detects_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_graph_sees_relative_and_lazy_imports():
    g = import_graph()
    assert "grokviz.checkpoint.release" in g["grokviz.loading"]  # imported inside load()
    assert "grokviz.config" in g["grokviz.checkpoint.names"]      # `from ..config import`


def test_no_import_cycle_in_the_package():
    g = import_graph()
    g = {a: {b for b in bs if not _is_ancestor_edge(a, b)} for a, bs in g.items()}
    cycle = find_cycle(g)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", ["grokviz", "grokviz.viz"])
def test_import_changes_nothing_in_the_process(module):
    """Importing grokviz (or its widgets) leaves the environment, JAX's flags and malloc alone, and imports
    neither the trainer nor optax."""
    code = f"""
import os, sys, json
before = dict(os.environ)
import jax
flags = {{k: v for k, v in jax.config.values.items()}}
import {module}
import grokviz.runtime as rt
after = dict(os.environ)
changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
flags2 = {{k: v for k, v in jax.config.values.items()}}
print(json.dumps(dict(env=changed, flags=sorted(k for k in flags if flags[k] != flags2.get(k)),
                      train=[m for m in sys.modules if m.startswith("grokviz.train") or m == "optax"],
                      malloc=str(rt.status()["mallopt"]))))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import json

    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["env"] == [] and got["flags"] == [] and got["train"] == [], got
    assert got["malloc"].startswith("not applied"), f"import tuned malloc: {got['malloc']}"
