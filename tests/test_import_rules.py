"""The package's layering, read from the source with ``ast`` (nothing is imported or run).

Each subpackage may import only the layers below it (``ALLOWED``); the runtime never imports the pruning
package; ``kernels/`` imports only triton and torch; a compiled extension has exactly one importer; no import
cycles; imports inside functions only for optional dependencies (triton and the kernels that need it, plotting, the
server's packages; and in the CLI, which defers the runtime's
imports into each subcommand's ``run`` so that ``--help`` stays fast)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sparse_runtime"
SOURCES = sorted(p for p in PKG.rglob("*.py") if "kernels" not in p.relative_to(PKG).parts)
KERNELS = sorted((ROOT / "kernels").glob("*.py"))
SHARED = {"m_bucket": "ops.caches", "LRU": "ops.caches", "DiskCache": "ops.caches", "device_key": "ops.caches",
          "cache_dir": "ops.caches", "cuda_unavailable": "ops.devices"}
# layer -> the layers it may import (besides itself and sparse_runtime.errors)
ALLOWED = {
    "format": set(),
    "kernels": set(),
    "ops": {"format", "kernels"},
    "backends": {"format", "ops"},
    "nn": {"format", "backends", "models.architecture"},
    "models": {"format", "ops", "backends", "nn"},
    "data": set(),
    "serving": {"format", "ops", "backends", "nn", "models", "data"},
    # prune and recover reach ops only for ops.devices' capability probes (whether a CPU multiplies bf16 natively)
    "prune": {"format", "models", "data", "nn", "ops.devices"},
    # recovery trains SparseLinear's kept values (nn), loads, walks and saves models (models), reads the text (data)
    "recover": {"format", "models", "data", "nn", "ops.devices"},
    # a gradual schedule alternates pruning and recovery: the one front-end besides the CLI that needs both, kept
    # out of each so that prune and recover stay independent of one another
    "gradual": {"format", "models", "data", "nn", "prune", "recover"},
    "cli": {"format", "ops", "backends", "nn", "models", "data", "serving", "prune", "recover", "gradual"},
}
EXTENSIONS = {"sparse_runtime._C": "sparse_runtime.ops.cusparselt",
              "sparse_runtime._mmasp": "sparse_runtime.ops.mmasp",
              "sparse_runtime._cpu24": "sparse_runtime.ops.cpu24"}
OPTIONAL = {"triton", "matplotlib", "uvicorn", "starlette", "openai", "httpx", "gguf"}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path, top_level_only: bool = False):
    """``(line, module imported, in a function)`` for every import in ``path``, relative imports resolved; a
    ``from P import name`` that names a submodule yields ``P.name``."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    for node in ast.walk(tree):
        nested = id(node) in inner
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, nested
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            yield node.lineno, base, nested
            for a in node.names:
                sub = f"{base}.{a.name}"
                if _is_module(sub):
                    yield node.lineno, sub, nested


def _is_module(name: str) -> bool:
    if not name.startswith("sparse_runtime."):
        return False
    rel = Path(*name.split(".")[1:])
    return (PKG / rel).with_suffix(".py").exists() or (PKG / rel / "__init__.py").exists() or name in EXTENSIONS


def _layer(mod: str) -> str | None:
    parts = mod.split(".")
    if len(parts) < 2 or parts[1] in ("errors", "__main__"):
        return None
    if len(parts) > 2 and f"{parts[1]}.{parts[2]}" in SUBLAYERS:
        return f"{parts[1]}.{parts[2]}"
    return parts[1] if parts[1] in ALLOWED else None


SUBLAYERS = {"models.architecture": "models", "ops.devices": "ops"}  # modules a layer's importers may use alone


def _allowed(src_layer: str, dst_layer: str) -> bool:
    if dst_layer == src_layer or (src_layer, dst_layer) in {("models.architecture", "format"),
                                                              ("models", "models.architecture"),
                                                              ("ops", "ops.devices")}:
        return True
    ok = ALLOWED[SUBLAYERS.get(src_layer, src_layer)]
    return dst_layer in ok or SUBLAYERS.get(dst_layer) in ok


def test_the_sources_are_found():
    assert len(SOURCES) > 40 and PKG / "ops" / "cusparselt.py" in SOURCES and KERNELS


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: _module(p))
def test_layering(path):
    mod = _module(path)
    src = _layer(mod)
    for line, imported, nested in _imports(path):
        if imported in EXTENSIONS:
            assert EXTENSIONS[imported] == mod, f"{mod}:{line} imports {imported}; use {EXTENSIONS[imported]}"
            continue
        if nested and not mod.startswith("sparse_runtime.cli"):
            assert imported.split(".")[0] in OPTIONAL or imported.startswith("sparse_runtime.kernels"), \
                f"{mod}:{line} imports {imported} inside a function; only optional dependencies may be"
        dst = _layer(imported) if imported.startswith("sparse_runtime.") else None
        if src and dst:
            assert _allowed(src, dst), f"{mod}:{line} ({src}) imports {imported} ({dst}): not a layer below it"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: _module(p))
def test_shared_helpers_have_one_home(path):
    mod = _module(path)
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("sparse_runtime"):
            raise AssertionError(f"{mod}:{node.lineno}: absolute import of the package; use a relative one")
    for line, imported, _ in _imports(path):
        for name, home in SHARED.items():
            if imported.endswith("." + name):
                assert imported == f"sparse_runtime.{home}.{name}", f"{mod}:{line} takes {name} from elsewhere"
    reads = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "_C"
             and not (isinstance(n.value, ast.Name) and n.value.id == "torch")]  # torch._C is torch's
    if mod != "sparse_runtime.ops.cusparselt":
        assert not reads, f"{mod} reads ._C at line {reads[0].lineno}; use sparse_runtime.ops.cusparselt.versions()"
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    if mod != "sparse_runtime.ops.caches":
        assert "SPARSE_RUNTIME_CACHE" not in strings, f"{mod} reads SPARSE_RUNTIME_CACHE; use caches.cache_dir()"


def test_the_runtime_never_imports_the_pruning_package():
    bad = [(_module(p), line, m) for p in SOURCES if not _module(p).startswith(("sparse_runtime.prune",
                                                                             "sparse_runtime.gradual",
                                                                             "sparse_runtime.cli"))
           for line, m, _ in _imports(p) if m == "sparse_runtime.prune" or m.startswith("sparse_runtime.prune.")]
    assert not bad, f"runtime modules import the pruning package: {bad}"


@pytest.mark.parametrize("path", KERNELS, ids=lambda p: p.name)
def test_kernels_import_only_triton_and_torch(path):
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        for n in names:
            assert n.split(".")[0] in {"triton", "torch", "functools", "os", "math"}, f"{path.name} imports {n}"


def _graph() -> dict[str, set[str]]:
    graph = {}
    for p in SOURCES:
        mod = _module(p)
        graph[mod] = {m for _, m, nested in _imports(p) if not nested and m.startswith("sparse_runtime.")
                      and m != mod and _is_module(m) and m not in EXTENSIONS}
    return graph


def _cycle(graph):
    """One import cycle as a list of modules, or None (iterative DFS, white/grey/black)."""
    state, stack = {}, []
    for start in graph:
        if start in state:
            continue
        todo = [(start, iter(sorted(graph[start])))]
        state[start] = 1
        stack.append(start)
        while todo:
            node, it = todo[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                todo.pop()
            elif state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            elif nxt not in state and nxt in graph:
                state[nxt] = 1
                stack.append(nxt)
                todo.append((nxt, iter(sorted(graph[nxt]))))
    return None


def test_no_import_cycles():
    # a package's __init__ runs before its submodules, so "sparse_runtime" -> its re-exports is not a cycle edge
    graph = _graph()
    for mod in graph:
        graph[mod] = {m for m in graph[mod] if not mod.startswith(m + ".")}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"b"}}) is None
