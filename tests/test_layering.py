"""Enforces the layering of ARCHITECTURE.md by scanning every import in the tree."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"recserve", "kernels", "shardd", "gateway", "loadgen"}

# package -> our packages it must never import
FORBIDDEN = {
    "kernels": {"recserve", "shardd", "gateway", "loadgen"},
    "recserve": {"shardd", "gateway", "loadgen"},
    "shardd": {"gateway", "loadgen"},
    "gateway": {"shardd", "loadgen"},
    "loadgen": {"shardd", "gateway", "kernels"},
}
KERNELS_THIRD_PARTY = {"numpy", "numba", "llvmlite"}
# torch is an optional extra for reading checkpoints; serving code never imports it.
TORCH_ALLOWED = ("recserve/importers/",)


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layering(package: str) -> None:
    problems = []
    for path in sources(package):
        rel = path.relative_to(ROOT).as_posix()
        for line, top in imports_of(path):
            where = f"{rel}:{line} imports {top}"
            if top in FORBIDDEN[package]:
                problems.append(f"{where} (layer violation)")
            if top == "torch" and not rel.startswith(TORCH_ALLOWED):
                problems.append(f"{where} (torch only in importers)")
            allowed = OURS | KERNELS_THIRD_PARTY | sys.stdlib_module_names
            if package == "kernels" and top not in allowed:
                problems.append(f"{where} (kernels may use numpy/numba only)")
    assert not problems, "\n".join(problems)


def test_scanner_sees_imports(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("import gateway.app\nfrom shardd import x\nfrom . import y\n")
    assert imports_of(sample) == [(1, "gateway"), (2, "shardd")]
