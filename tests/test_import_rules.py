"""The package's dependency rules, read from the source with ``ast`` (nothing is imported or run)."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "sparse_runtime"
SOURCES = sorted(PKG.rglob("*.py"))
SHARED = {"m_bucket": "caches", "LRU": "caches", "DiskCache": "caches", "device_key": "caches",
          "cache_dir": "caches", "cuda_unavailable": "devices"}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path):
    """``(module imported from, name)`` for every import in ``path``, relative imports resolved."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                yield base, a.name


def test_the_sources_are_found():
    assert len(SOURCES) > 30 and PKG / "cusparselt.py" in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: _module(p))
def test_rules(path):
    mod = _module(path)
    tree = ast.parse(path.read_text())
    for base, name in _imports(path):
        full = f"{base}.{name}" if name else base
        if mod != "sparse_runtime.cusparselt":
            assert full != "sparse_runtime._C", f"{mod} imports the extension; use sparse_runtime.cusparselt"
        if name in SHARED and base.startswith("sparse_runtime"):
            assert base == f"sparse_runtime.{SHARED[name]}", f"{mod} takes {name} from {base}"
        if base == "sparse_runtime.sparsify" and name:
            assert not name.startswith("_"), f"{mod} reaches into sparsify's private {name}"
    if mod != "sparse_runtime.cusparselt":
        reads = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "_C"
                 and not (isinstance(n.value, ast.Name) and n.value.id == "torch")]  # torch._C is torch's
        assert not reads, f"{mod} reads ._C at line {reads[0].lineno}; use sparse_runtime.cusparselt.versions()"
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert "SPARSE_RUNTIME_CACHE_DIR" not in strings, f"{mod}: one cache variable, SPARSE_RUNTIME_CACHE"
    if mod != "sparse_runtime.caches":
        assert "SPARSE_RUNTIME_CACHE" not in strings, f"{mod} reads SPARSE_RUNTIME_CACHE; use caches.cache_dir()"
