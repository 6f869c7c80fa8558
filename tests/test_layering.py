"""The package's layers import downward only, and no module of urt/ takes part in an import cycle.

The order is written once, here: a unit (a subpackage of urt/, or a module at its root) may import from
its own unit and from the units before it, never from one after it. Imports inside functions count too:
a lazy import is still a dependency (it only moves the failure to run time). A package's `cli` module
(`urt/<package>/cli.py`, its commands) belongs to the command line, the top layer, whatever package it sits
in. The root package (`urt/__init__.py`) is the public facade and is left out."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "urt"

LAYERS = [
    "urt.errors", "urt.lazy",     # no urt imports
    "urt.config",                 # Hydra composition over conf/
    "urt.models",                 # loading, families, tiny models, transformers version gates (compat)
    "urt.prompts",                # templates, rendering, parsing
    "urt.rewards",
    "urt.data",                   # schema, shards, encoding, collators, the DataModule
    "urt.generation",
    "urt.rl",                     # GRPO maths, log-prob passes, collectives, rollout log
    "urt.stages",                 # the training stages
    "urt.plan",                   # the memory plan (urt train runs its check; it reads configs, loads nothing)
    "urt.train",                  # stage name -> builder
    "urt.eval",
    "urt.rollouts",               # reading a run's rollout logs
    "urt.judge",
    "urt.serve",
    "urt.pipeline",
    "urt.demo",
    "urt.cli",                    # the entry point and every package's cli module
]
RANK = {unit: i for i, unit in enumerate(LAYERS)}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The urt modules `name` imports (`from urt import x` resolves to urt.x where x is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name == "urt" or a.name.startswith("urt.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                (node.module == "urt" or node.module.startswith("urt.")):
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            out |= subs or {node.module}
    return out


def _unit(module: str) -> str:
    parts = module.split(".")
    if parts[-1] == "cli":  # the commands of a package: the command-line layer
        return "urt.cli"
    return ".".join(parts[:2])


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: {i for i in _imports(m, p, known) if i != "urt"} for m, p in mods.items() if m != "urt"}


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _modules() if m != "urt"}
    assert units <= set(RANK), f"add these to LAYERS (in order): {sorted(units - set(RANK))}"


def test_imports_go_downward():
    upward = []
    for mod, deps in _graph().items():
        for dep in deps:
            a, b = _unit(mod), _unit(dep)
            if a in RANK and b in RANK and RANK[b] > RANK[a]:
                upward.append(f"{mod} imports {dep} ({b} is above {a})")
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_private_name_crosses_modules():
    """A `_name` belongs to its module: another module that needs it needs a public name."""
    crossing = []
    known = set(_modules())
    for mod, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("urt") and \
                    node.module != mod:
                crossing += [f"{mod}: from {node.module} import {a.name}" for a in node.names
                             if a.name.startswith("_") and f"{node.module}.{a.name}" not in known
                             and a.name != "__version__"]
    assert not crossing, "\n".join(crossing)


@pytest.mark.parametrize("bad", ["upward", "cycle"])
def test_the_checks_catch_what_they_claim(bad, monkeypatch):
    """Negative controls: a planted upward import and a planted cycle are found."""
    graph = _graph()
    if bad == "upward":
        graph["urt.models.compat"] = graph["urt.models.compat"] | {"urt.stages.base"}
        monkeypatch.setattr(__import__(__name__), "_graph", lambda: graph)
        with pytest.raises(AssertionError, match="urt.models.compat imports urt.stages.base"):
            test_imports_go_downward()
    else:
        graph["urt.rl.objective"] = graph["urt.rl.objective"] | {"urt.rl.advantages"}
        monkeypatch.setattr(__import__(__name__), "_graph", lambda: graph)
        with pytest.raises(AssertionError, match="urt.rl.advantages <-> urt.rl.objective"):
            test_no_import_cycle()
