"""The package's layering (docs/architecture.md): every import between rosepo modules, at the
top of a file or inside a function, points down the layers; stages import no other stage; no
import cycle; ``jobs/*.py`` go through the CLI only; names that config and the CLI check without
importing the layers above match the code that defines them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Layers, lowest first: (name, module prefixes). A module belongs to its longest matching prefix.
LAYERS = [
    ("foundation", ("rosepo.errors", "rosepo.schema", "rosepo.config", "rosepo.storage",
                    "rosepo.runtime", "rosepo.layout")),
    ("library", ("rosepo.data", "rosepo.model", "rosepo.losses", "rosepo.pairs", "rosepo.eval",
                 "rosepo.train", "rosepo.eval.metrics", "rosepo.train.loop")),
    ("stage", ("rosepo.model.base", "rosepo.train.sft", "rosepo.train.align", "rosepo.pairs.oracle",
               "rosepo.pairs.build", "rosepo.eval.evaluate")),
    ("pipeline", ("rosepo.pipeline",)),
    ("experiments", ("rosepo.experiments",)),
    ("cli", ("rosepo.cli", "rosepo.__main__")),
    # The package itself: its public API (``from rosepo import Recommender``), loaded lazily.
    ("api", ("rosepo",)),
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}


def layer_of(module: str) -> str:
    """The layer of ``module``: that of its longest matching prefix in `LAYERS`."""
    best, best_len = None, -1
    for name, prefixes in LAYERS:
        for p in prefixes:
            inside = module == p or (module.startswith(p + ".") and p != "rosepo")  # the root holds itself only
            if inside and len(p) > best_len:
                best, best_len = name, len(p)
    assert best is not None, f"{module} is in no layer: add it to LAYERS in tests/test_layering.py"
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p) for p in (REPO / "rosepo").rglob("*.py")}


def rosepo_imports(path: Path) -> list[tuple[str, int]]:
    """(imported rosepo module, line) of every import in ``path``, function-local ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            if name == "rosepo" or name.startswith("rosepo."):
                while name not in MODULES and "." in name:
                    name = name.rsplit(".", 1)[0]
                out.append((name, node.lineno))
    return out


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for path in (REPO / "rosepo").rglob("*.py"):
        edges[module_name(path)].update(t for t, _ in rosepo_imports(path) if t != module_name(path))
    return edges


def violations() -> list[str]:
    """Every import between rosepo modules that breaks the layering."""
    bad = []
    for path in sorted((REPO / "rosepo").rglob("*.py")):
        src = module_name(path)
        for target, line in rosepo_imports(path):
            if target == src or target == "rosepo":
                continue
            a, b = layer_of(src), layer_of(target)
            if RANK[b] > RANK[a]:
                bad.append(f"{path.relative_to(REPO)}:{line}: {src} ({a}) imports {target} ({b}), a layer above")
            elif a == b == "stage":
                bad.append(f"{path.relative_to(REPO)}:{line}: stage {src} imports stage {target}; pass "
                           "folders or objects from the pipeline, or move the shared code down")
    return bad


def test_imports_point_down_the_layers():
    assert violations() == []


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_jobs_are_delegates_of_the_cli():
    for job in sorted((REPO / "jobs").glob("*.py")):
        assert {t for t, _ in rosepo_imports(job)} == {"rosepo.cli"}, job.name


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_names_checked_below_match_their_definitions():
    from rosepo.cli import STAGES
    from rosepo.config import METHOD_NAMES, STRATEGY_NAMES
    from rosepo.experiments.methods import METHODS
    from rosepo.pairs.strategies import STRATEGIES
    from rosepo.pipeline import GRAPH

    assert tuple(STRATEGIES) == STRATEGY_NAMES
    assert tuple(METHODS) == METHOD_NAMES
    assert tuple(GRAPH) == STAGES
