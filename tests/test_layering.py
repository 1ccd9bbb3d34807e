"""Enforces the layering of ARCHITECTURE.md by scanning every import in the tree.

Rules are per package and per audience inside ``recserve/`` (a module's layer is the
longest prefix listed in ``ALLOWED``); every import counts, also those inside functions, so
a lazy import cannot hide a cycle or a layer violation.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("recserve", "kernels", "shardd", "gateway", "loadgen")

# layer -> the layers of ours it may import (its own always); a layer is a module prefix.
ALLOWED: dict[str, set[str]] = {
    "kernels": set(),
    "recserve.contracts": set(),
    "recserve.runtime": {"recserve.contracts"},
    "recserve.rpc": {"recserve.contracts"},
    "recserve.planning": {"recserve.contracts"},
    "recserve.model": {"recserve.contracts", "kernels"},
    "recserve.local": {
        "recserve.contracts",
        "recserve.model",
        "recserve.planning",
        "recserve.rpc",
        "recserve.runtime",
        "kernels",
    },
    # What a service calling the gateway imports: the HTTP contracts, nothing heavier.
    "recserve.client": {"recserve.contracts"},
    "recserve.cli": {"recserve", "kernels"},
    "recserve": set(),  # recserve/__init__.py
    "shardd": {"recserve", "kernels"},
    "gateway": {"recserve", "kernels"},
    # The load generator knows the HTTP schema and how traffic is drawn, nothing more.
    "loadgen": {
        "recserve.contracts",
        "recserve.model.workload",
        "recserve.runtime",
        "recserve.client",
    },
}
THIRD_PARTY: dict[str, set[str]] = {
    "kernels": {"numpy", "numba", "llvmlite"},
    "recserve.contracts": {"numpy", "orjson", "msgpack"},
}
# torch is an optional extra for reading checkpoints; serving code never imports it.
TORCH_ALLOWED = ("recserve/model/importers/",)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import; ``from a import b`` yields ``a.b`` (the
    caller resolves whether ``b`` is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else None
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module_name(path) if path.name == "__init__.py" else package or ""
                for _ in range(node.level - 1):
                    pkg = pkg.rsplit(".", 1)[0]
                base = f"{pkg}.{base}" if base else pkg
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def all_modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            out[module_name(path)] = path
    return out


def resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The module of ours ``target`` names (``a.b.name`` -> ``a.b`` when ``name`` is not a
    module), or None for a foreign one."""
    while target:
        if target in modules:
            return target
        target = target.rsplit(".", 1)[0] if "." in target else ""
    return None


def layer_of(module: str) -> str:
    return max((k for k in ALLOWED if module == k or module.startswith(k + ".")), key=len)


def within(module: str, layers: set[str]) -> bool:
    return any(module == x or module.startswith(x + ".") for x in layers)


@pytest.mark.parametrize("package", PACKAGES)
def test_layering(package: str) -> None:
    modules = all_modules()
    problems = []
    for name, path in modules.items():
        if name.split(".")[0] != package:
            continue
        layer = layer_of(name)
        rel = path.relative_to(ROOT).as_posix()
        for line, target in imports_of(path):
            where = f"{rel}:{line} imports {target}"
            ours = resolve(target, modules)
            top = target.split(".")[0]
            if ours is not None:
                if not within(ours, ALLOWED[layer] | {layer}):
                    problems.append(f"{where} (layer {layer} may not import {layer_of(ours)})")
            elif top in PACKAGES:
                problems.append(f"{where} (no such module)")
            elif top == "torch" and not rel.startswith(TORCH_ALLOWED):
                problems.append(f"{where} (torch only in importers)")
            elif (
                layer in THIRD_PARTY
                and top not in THIRD_PARTY[layer]
                and top not in sys.stdlib_module_names
                and top != "__future__"
            ):
                problems.append(f"{where} ({layer} may use {sorted(THIRD_PARTY[layer])})")
    assert not problems, "\n".join(problems)


def test_no_import_cycles() -> None:
    modules = all_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for _, target in imports_of(path):
            ours = resolve(target, modules)
            if ours is not None and ours != name:
                graph[name].add(ours)
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in cycles)


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.add(member)
                    if member == node:
                        break
                if len(comp) > 1:
                    found.append(comp)
    return found


def test_cycle_finder_finds_cycles() -> None:
    assert strongly_connected({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [{"a", "b"}]
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_scanner_sees_imports(tmp_path: Path) -> None:
    sample = ROOT / "gateway" / "_scan_probe.py"
    sample.write_text("import gateway.app\nfrom shardd import x\nfrom . import y\n")
    try:
        assert imports_of(sample) == [(1, "gateway.app"), (2, "shardd.x"), (3, "gateway.y")]
    finally:
        sample.unlink()


@pytest.mark.parametrize(
    ("module", "heavy"),
    [
        ("loadgen.main", ("numba", "llvmlite", "zmq", "kernels")),
        ("recserve.contracts.manifest", ("numba", "kernels")),
        ("recserve.planning", ("numba", "kernels")),
        ("recserve.client", ("numba", "kernels", "zmq", "torch")),
    ],
)
def test_light_imports(module: str, heavy: tuple[str, ...]) -> None:
    """What a module loads at run time, lazy imports and package ``__init__`` files included:
    the load generator must not pay numba's start-up, contracts never load kernels."""
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.check_output([sys.executable, "-c", code], text=True).split())
    assert not loaded & set(heavy), f"{module} loads {sorted(loaded & set(heavy))}"
