"""Architecture numbers of the rosepo package (issue #15): import cycles, function-local imports
between rosepo modules, long modules and functions, ``cfg.get(key, default)`` calls, entry points.

    python tools/arch_metrics.py [repo root]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(tree: ast.AST, modules: set[str]):
    """(target module, is inside a function) of every import of a rosepo module."""
    out = []

    def visit(node, in_func):
        for child in ast.iter_child_nodes(node):
            f = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                targets = [f"{child.module}.{a.name}" if f"{child.module}.{a.name}" in modules else child.module
                           for a in child.names]
            resolved = set()
            for t in targets:
                if t.split(".")[0] == "rosepo":
                    while t not in modules and "." in t:
                        t = t.rsplit(".", 1)[0]
                    resolved.add(t)
            out.extend((t, f) for t in sorted(resolved))  # one per module an import statement names
            visit(child, f)

    visit(tree, False)
    return out


def simple_cycles(graph: dict[str, set[str]]) -> int:
    """Number of elementary cycles (each counted once, from its smallest node)."""
    count = 0
    nodes = sorted(graph)
    for start in nodes:
        stack = [(start, iter(sorted(graph[start])))]
        on_path = {start}
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                on_path.discard(node)
            elif nxt == start:
                count += 1
            elif nxt > start and nxt not in on_path:
                on_path.add(nxt)
                stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
    return count


def main(root: Path) -> None:
    pkg = root / "rosepo"
    files = sorted(p for p in pkg.rglob("*.py"))
    modules = {module_name(root, p) for p in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    total = local = 0
    long_modules, long_functions, cfg_gets = [], [], []
    for p in files:
        src = p.read_text(encoding="utf-8")
        tree = ast.parse(src)
        name = module_name(root, p)
        for target, in_func in internal_imports(tree, modules):
            if target != name and target != "rosepo":
                graph[name].add(target)
                total += 1
                local += in_func
        if len(src.splitlines()) > 400:
            long_modules.append(f"{name} ({len(src.splitlines())})")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long_functions.append(f"{name}.{node.name} ({n})")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and len(node.args) == 2 and isinstance(node.func.value, ast.Name)
                    and "cfg" in node.func.value.id):
                cfg_gets.append(f"{name}:{node.lineno}")
    # Strongly connected components with more than one module.
    sccs = [s for s in _sccs(graph) if len(s) > 1]
    entry = []
    for p in sorted([*files, *(root / "jobs").glob("*.py")]):
        tree = ast.parse(p.read_text(encoding="utf-8"))
        if any(isinstance(n, ast.Attribute) and n.attr == "ArgumentParser" for n in ast.walk(tree)):
            entry.append(f"{p.relative_to(root)} (own argparse parser)")
    print(f"modules in an import cycle: {sum(map(len, sccs))} in {len(sccs)} cycle group(s) "
          f"{[sorted(s) for s in sccs]}")
    print(f"elementary import cycles: {simple_cycles(graph)}")
    print(f"imports between rosepo modules: {total}, inside functions: {local}")
    print(f"modules > 400 lines: {len(long_modules)} {long_modules}")
    print(f"functions > 60 lines: {len(long_functions)} {long_functions}")
    print(f"cfg.get(key, default) calls: {len(cfg_gets)} {cfg_gets}")
    print(f"argparse parsers (entry points with their own parser): {len(entry)} {entry}")
    jobs = sorted((root / "jobs").glob("*.py"))
    print("jobs/*.py lines of code (no docstring/comments/blank): "
          + ", ".join(f"{j.name} {_code_lines(j)}" for j in jobs))


def _code_lines(path: Path) -> int:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    body = tree.body[1:] if tree.body and isinstance(tree.body[0], ast.Expr) else tree.body
    lines = set()
    for node in body:
        lines.update(range(node.lineno, node.end_lineno + 1))
    return len(lines)


def _sccs(graph: dict[str, set[str]]) -> list[set[str]]:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve())
