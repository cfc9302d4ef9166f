"""Security invariants of the tree: no unsafe deserialisation, safetensors for weights, a locked
cluster config, a loopback dashboard, and paths confined to their root.

The code scan parses every ``.py`` file of rosepo/, jobs/, bench/ and tests/ with `ast` rather
than grepping, so that a docstring saying "no pickle" or a method called ``model.eval()`` is
not a finding, while ``import pickle as p; p.loads(...)`` and calls split over lines are.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import sys
import types
from pathlib import Path

import pytest
import yaml

from rosepo.errors import ConfigError
from rosepo.storage import confined
from tools.cluster_check import LOOPBACK, check_cluster_security

REPO = Path(__file__).resolve().parents[1]
SCANNED = [REPO / d for d in ("rosepo", "jobs", "bench", "tests") if (REPO / d).is_dir()]

#: Calls that deserialise arbitrary objects (or run code) whatever their arguments.
UNSAFE_CALLS = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads",
    "cloudpickle.load", "cloudpickle.loads", "joblib.load", "marshal.load", "marshal.loads",
    "shelve.open", "pandas.read_pickle", "yaml.load", "yaml.load_all", "yaml.full_load",
    "yaml.full_load_all", "yaml.unsafe_load", "yaml.unsafe_load_all", "eval", "exec",
    "builtins.eval", "builtins.exec",
}
#: Modules whose only purpose here would be pickling more than pickle can.
UNSAFE_MODULES = {"dill"}
#: Conventional aliases, used when the import is not in the file being checked.
DEFAULT_ALIASES = {"np": "numpy", "pd": "pandas"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> qualified name, from every import in the module (any scope)."""
    names = dict(DEFAULT_ALIASES)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _qualname(func: ast.expr, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    return ".".join([aliases.get(func.id, func.id), *reversed(parts)])


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def find_unsafe(source: str | ast.AST, name: str = "<snippet>") -> list[str]:
    """Findings ``name:line: what`` of unsafe loads and non-safetensors saves in ``source``."""
    tree = ast.parse(source, filename=name) if isinstance(source, str) else source
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(m.split(".")[0] in UNSAFE_MODULES for m in modules):
                found.append(f"{name}:{node.lineno}: imports {', '.join(modules)}")
        if not isinstance(node, ast.Call):
            continue
        qual = _qualname(node.func, aliases) or ""
        where = f"{name}:{node.lineno}: {qual or 'call'}"
        if qual in UNSAFE_CALLS or qual.split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where} deserialises or runs arbitrary code")
        elif qual == "torch.load" and not _is_const(_keyword(node, "weights_only"), True):
            found.append(f"{where} without weights_only=True")
        elif qual == "numpy.load" and not _is_const(_keyword(node, "allow_pickle") or ast.Constant(False), False):
            found.append(f"{where} with allow_pickle")
        if isinstance(node.func, ast.Attribute) and node.func.attr == "save_pretrained":
            flag = _keyword(node, "safe_serialization")
            if flag is not None and not _is_const(flag, True):
                found.append(f"{where} without safetensors (safe_serialization must stay True)")
    return found


@pytest.mark.parametrize("source,count", [
    ("import pickle\npickle.loads(b)", 1),
    ("import pickle as p\np.load(f)", 1),
    ("from pickle import loads as l\nl(b)", 1),
    ("import pickle\npickle.dumps(x)", 0),
    ("import torch\ntorch.load(f)", 1),
    ("import torch\ntorch.load(\n    f,\n    map_location='cpu',\n    weights_only=False)", 1),
    ("import torch\ntorch.load(f, weights_only=flag)", 1),
    ("import torch\ntorch.load(f, map_location='cpu', weights_only=True)", 0),
    ("import numpy as np\nnp.load(f, allow_pickle=True)", 1),
    ("import numpy\nnumpy.load(f)", 0),
    ("np.load(f, allow_pickle=False)", 0),
    ("import yaml\nyaml.load(s, Loader=yaml.SafeLoader)", 1),
    ("from yaml import load\nload(s)", 1),
    ("import yaml\nyaml.safe_load(s)", 0),
    ("eval(text)", 1),
    ("exec(code, {})", 1),
    ("model.eval()\nmodel.train()", 0),
    ("'''no pickle.loads or eval( here'''", 0),
    ("import dill", 1),
    ("from joblib import load\nload(p)", 1),
    ("model.save_pretrained(d, safe_serialization=False)", 1),
    ("model.save_pretrained(d, safe_serialization=True)", 0),
    ("model.save_pretrained(d)", 0),
])
def test_scanner_finds_what_it_should(source, count):
    assert len(find_unsafe(source)) == count, find_unsafe(source)


@functools.cache
def parsed_tree() -> dict[str, ast.AST]:
    """Every scanned ``.py`` file, parsed once: repo-relative path -> module AST."""
    files = sorted(p for d in SCANNED for p in d.rglob("*.py"))
    return {str(p.relative_to(REPO)): ast.parse(p.read_text(encoding="utf-8"), filename=str(p)) for p in files}


def test_tree_has_no_unsafe_loads_and_saves_safetensors():
    trees = parsed_tree()
    assert "rosepo/data/readers.py" in trees  # the scan does see the package
    assert [f for name, tree in trees.items() for f in find_unsafe(tree, name)] == []


# --- cluster and dashboard ---------------------------------------------------------------------


def test_cluster_config_is_locked_down():
    config = yaml.safe_load((REPO / "cluster" / "config.yaml").read_text(encoding="utf-8"))
    assert check_cluster_security(config) == []
    config["head_start_ray_commands"] = [c.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")
                                         for c in config["head_start_ray_commands"]]
    assert any("dashboard binds to 0.0.0.0" in p for p in check_cluster_security(config))


def test_init_ray_binds_dashboard_to_loopback(monkeypatch):
    """Call `init_ray` with stand-ins for the ``ray`` and ``torch`` modules it imports: nothing
    starts (and nothing heavy is imported); the arguments of ``ray.init`` are checked."""
    from rosepo import runtime as raysetup

    calls = []
    def fake_init(*a, **kw):
        calls.append(kw)
        return types.SimpleNamespace(dashboard_url=f"127.0.0.1:{kw['dashboard_port']}")  # a RayContext's field

    fake_ray = types.SimpleNamespace(is_initialized=lambda: False, init=fake_init)
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: False))
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # init_ray sets these in os.environ: monkeypatch restores them afterwards
    monkeypatch.setenv(raysetup.API_SERVER_ENV, "unset")
    monkeypatch.setenv(raysetup.HEALTH_CHECK_ENV, raysetup.HEALTH_CHECK_INTERVAL_S)
    monkeypatch.setattr(raysetup, "_dashboard_url", raysetup._dashboard_url)  # restored afterwards
    monkeypatch.setattr(raysetup, "_started_here", raysetup._started_here)
    monkeypatch.setattr(raysetup, "_quiet_ray_data", lambda: None)  # it imports ray.data, which the stand-in lacks
    url = raysetup.init_ray(num_cpus=1)
    assert len(calls) == 1
    assert url == f"127.0.0.1:{calls[0]['dashboard_port']}"
    assert calls[0]["include_dashboard"] is True and calls[0]["dashboard_host"] == "127.0.0.1"
    assert os.environ[raysetup.API_SERVER_ENV] == f"http://127.0.0.1:{calls[0]['dashboard_port']}"


def test_no_ray_init_binds_dashboard_outside_loopback():
    """Every ``ray.init`` in the tree: a dashboard it asks for is bound to loopback explicitly."""
    seen = 0
    for name, tree in parsed_tree().items():
        aliases = _aliases(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _qualname(node.func, aliases) == "ray.init":
                seen += 1
                host = _keyword(node, "dashboard_host")
                where = f"{name}:{node.lineno}"
                if _is_const(_keyword(node, "include_dashboard"), True):
                    assert host is not None, f"{where}: include_dashboard=True without dashboard_host"
                if host is not None:
                    assert isinstance(host, ast.Constant) and host.value in LOOPBACK, where
    assert seen >= 2  # raysetup's two calls at least


def test_no_dashboard_host_flag_outside_loopback_in_scripts():
    """``--dashboard-host`` in jobs, configs, Makefile and the cluster YAML names loopback."""
    texts = [REPO / "Makefile", *(REPO / "cluster").glob("*.yaml"), *(REPO / "configs").rglob("*.yaml"),
             *(p for d in SCANNED if d.name != "tests" for p in d.rglob("*") if p.suffix in (".py", ".sh"))]
    flag = re.compile(r"--dashboard-host[= ]+['\"]?([^\s'\"]+)")
    hosts = {(p.name, h) for p in texts if p.is_file() for h in flag.findall(p.read_text(encoding="utf-8"))}
    assert {h for _, h in hosts} <= LOOPBACK, hosts


# --- path confinement --------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    """root/ with sub/, a link to sub (inside), a link to outside/, a link loop; outside/ and
    root2/ (a sibling whose name extends root's) next to it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (tmp_path / "root2").mkdir()
    (outside / "secret").write_text("s")
    (root / "in").symlink_to(root / "sub")
    (root / "out").symlink_to(outside)
    (root / "rel-out").symlink_to(Path("..") / "outside")
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    return tmp_path


@pytest.mark.parametrize("path,expected", [
    ("f.txt", "root/f.txt"),                # need not exist
    ("sub/new/f", "root/sub/new/f"),
    ("sub/../f", "root/f"),
    (".", "root"),
    ("in/f", "root/sub/f"),                 # a link that stays inside
])
def test_confined_inside(tree, path, expected):
    assert confined(tree / "root", path) == (tree / expected).resolve()


@pytest.mark.parametrize("path", [
    "../outside/secret", "sub/../../outside", "..", "../root2/f",   # root2 shares root's prefix
    "out", "out/secret", "rel-out/secret", "loop-a/f", "/etc/passwd", "f\x00",
    "out/../f",   # as the OS does it: the link first, so out/.. is outside/.. (not root)
])
def test_confined_escapes(tree, path):
    with pytest.raises(ConfigError, match="outside|cannot resolve") as e:
        confined(tree / "root", path)
    assert repr(path) in str(e.value)


def test_confined_absolute_and_linked_root(tree):
    """An absolute path inside root is fine; a root reached through a link is resolved too."""
    root = tree / "root"
    assert confined(root, root / "sub" / "f") == root.resolve() / "sub" / "f"
    (tree / "root-link").symlink_to(root)
    assert confined(tree / "root-link", "sub/f") == root.resolve() / "sub" / "f"
    with pytest.raises(ConfigError):
        confined(tree / "root-link", "../outside")
