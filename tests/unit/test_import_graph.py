"""The package's modules import each other in one direction only: the static
import graph (every ``import`` statement, at module level, inside functions and
under ``TYPE_CHECKING``) has no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def modules(package_dir: Path) -> dict[str, Path]:
    out = {}
    for path in package_dir.rglob("*.py"):
        if "_proto" in path.parts:
            continue  # generated code
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports. ``from P import X`` counts as
    importing ``P`` (its ``__init__`` runs) and ``P.X`` when that is a module."""
    mods = modules(package_dir)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                if node.level:  # relative import
                    anchor = name.split(".")[: len(name.split(".")) - node.level + 1]
                    if path.name != "__init__.py":
                        anchor = anchor[:-1] if len(anchor) > 1 else anchor
                    base = ".".join([*anchor, node.module])
                if base in mods:
                    edges.add(base)
                edges.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph(ROOT / "ray_alpcrun")
    # The root __init__ is the lazy public facade: it imports its names only
    # under TYPE_CHECKING and on first attribute access, never at import time
    # (test_public_api checks that a fresh import loads no submodule), so the
    # ``from ray_alpcrun import errors`` edges into it are not cycles.
    assert {m for m in graph["ray_alpcrun"] if m.count(".") == 1} >= {"ray_alpcrun.client"}
    del graph["ray_alpcrun"]
    graph = {name: edges - {"ray_alpcrun"} for name, edges in graph.items()}
    assert len(graph) > 40  # the walk found the package
    assert cycles(graph) == []


def test_the_check_finds_cycles(tmp_path: Path) -> None:
    # The cycles this repository had: a half-initialised package, and two modules
    # that know each other only under TYPE_CHECKING.
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.server import X\n")
    (pkg / "sub" / "server.py").write_text("from pkg.sub.core import Y\nX = 1\n")
    (pkg / "sub" / "core.py").write_text("def f():\n    from pkg.sub import scheduler\nY = 2\n")
    (pkg / "sub" / "scheduler.py").write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.b\n"
    )
    (pkg / "b.py").write_text("from pkg.a import nothing\n")
    found = cycles(import_graph(pkg))
    assert ["pkg.a", "pkg.b"] in found
    assert ["pkg.sub", "pkg.sub.core", "pkg.sub.server"] in found


def imports_ray(path: Path) -> bool:
    """Whether the module imports Ray anywhere (module level, functions, TYPE_CHECKING)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import) and any(
            a.name == "ray" or a.name.startswith("ray.") for a in node.names
        ):
            return True
        if (
            isinstance(node, ast.ImportFrom)
            and not node.level
            and node.module is not None
            and (node.module == "ray" or node.module.startswith("ray."))
        ):
            return True
    return False


# The examples are applications on top of the package, like the demo.
RAY_ROOMS = ("ray_alpcrun.pool", "ray_alpcrun.bridge", "ray_alpcrun.demo", "ray_alpcrun.examples")


def test_only_the_ray_side_imports_ray() -> None:
    mods = modules(ROOT / "ray_alpcrun")
    with_ray = {name for name, path in mods.items() if imports_ray(path)}
    assert "ray_alpcrun.pool.pool_actor" in with_ray  # the scan sees real imports
    outside = sorted(
        name
        for name in with_ray
        if not any(name == room or name.startswith(room + ".") for room in RAY_ROOMS)
    )
    assert outside == []


def test_dispatch_coalesce_and_scaling_stay_pure_asyncio() -> None:
    # Nothing they import, directly or through the package, imports Ray.
    mods = modules(ROOT / "ray_alpcrun")
    graph = import_graph(ROOT / "ray_alpcrun")
    for start in ("dispatch", "membership", "coalesce", "scaling"):
        seen, todo = set(), [f"ray_alpcrun.pool.{start}"]
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(graph[name])
        assert [m for m in sorted(seen) if imports_ray(mods[m])] == [], start


def test_no_module_is_over_450_lines() -> None:
    long = {
        name: n
        for name, path in modules(ROOT / "ray_alpcrun").items()
        if (n := len(path.read_text().splitlines())) > 450
    }
    assert long == {}
