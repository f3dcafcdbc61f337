"""The cuSPARSELt extension builds wherever its toolchain is, imports without a GPU, and fails clearly."""
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "csrc"))
import build_config

CFG, WHY = build_config.config()
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors raised without a GPU")


@pytest.fixture(scope="module")
def ext():
    if CFG is None:
        pytest.skip(f"the extension cannot be built here: {WHY}")
    return importlib.import_module("sparse_runtime._C")


def test_extension_built_where_buildable(ext):
    assert Path(ext.__file__).parent == ROOT / "sparse_runtime"
    assert len(ext.header_version) == 3


def test_import_needs_no_library_path():
    """The rpath finds libcusparseLt and cudart is linked statically: no LD_LIBRARY_PATH, no GPU."""
    if CFG is None:
        pytest.skip(WHY)
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    code = "import sparse_runtime._C as C; print(C.library_version())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    # torch may have loaded its own libcusparseLt.so.0 first; it must be the release we compiled against.
    header = importlib.import_module("sparse_runtime._C").header_version
    assert out.stdout.strip() == str(header), f"built against cuSPARSELt {header}, loaded {out.stdout.strip()}"


def test_linked_libraries(ext):
    ldd = subprocess.run(["ldd", ext.__file__], capture_output=True, text=True, check=True).stdout
    assert "not found" not in ldd, ldd
    assert "libcusparseLt.so.0" in ldd
    assert "libcudart" not in ldd  # static: nothing to resolve at import


def test_versions(ext):
    assert ext.runtime_version() >= 11000
    assert ext.cuda_header_version >= 11000


@no_gpu
def test_calls_without_gpu_name_the_call(ext):
    with pytest.raises(RuntimeError, match="cudaGetDevice failed"):
        ext.Plan(0, 8, 16, 16, "float16")
    with pytest.raises(RuntimeError, match="cudaGetDevice failed"):
        ext.compressed_size(0, 16, 16, "float16")


def test_skip_switch_and_ninja_file(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_RUNTIME_NO_EXT", "1")
    cfg, why = build_config.config()
    assert cfg is None and "SPARSE_RUNTIME_NO_EXT" in why
    if CFG is None:
        return
    text = build_config.build_ninja(CFG, tmp_path, tmp_path / "_C.so")
    for arch in build_config.ARCHS:
        assert f"code=sm_{arch}" in text
    assert "-l:libcusparseLt.so.0" in text and "libcudart_static.a" in text
    assert "'-Wl,-rpath," in text and "$$ORIGIN" in text  # quoted, so the shell keeps $ORIGIN


@pytest.mark.parametrize("defines, version", [
    ("#define CUSPARSELT_VERSION 802", (0, 8, 2)),  # 0.8.2, old MAJOR*1000 encoding
    ("#define CUSPARSELT_VERSION 1000", (0, 10, 0)),  # 0.10.0, new MAJOR*1000000 encoding
    ("#define CUSPARSELT_VERSION 1002503", (1, 25, 3)),
    ("#define CUSPARSELT_VERSION 1000\n#define CUSPARSELT_VER_MAJOR 0\n#define CUSPARSELT_VER_MINOR 10\n"
     + "#define CUSPARSELT_VER_PATCH 0", (0, 10, 0)),
])
def test_version_gate_decodes_both_encodings(defines, version):
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no C++ compiler")
    major, minor, patch = version
    src = (f'{defines}\n#include "cslt_version.h"\n'
           f"static_assert(SR_CSLT_MAJOR == {major} && SR_CSLT_MINOR == {minor} && SR_CSLT_PATCH == {patch});\n"
           f"#if !SR_CSLT_AT_LEAST({major}, {minor}, {patch}) || SR_CSLT_AT_LEAST({major}, {minor}, {patch + 1})\n"
           "#error AT_LEAST\n#endif\n#if !SR_CSLT_AT_LEAST(0, 5, 2)\n#error old\n#endif\n")
    out = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", f"-I{ROOT / 'csrc'}", "-x", "c++", "-"], input=src,
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


def _fake_toolkit(root: Path) -> Path:
    """A toolkit folder whose nvcc answers --dryrun as nvcc does (``#$ TOP=<toolkit>/bin/..`` on stderr)."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f'#!/bin/sh\ncase "$*" in *--dryrun*) echo "#$ TOP={root}/bin/.." >&2;; esac\n')
    nvcc.chmod(0o755)
    return root


def test_cuda_home_behind_a_wrapper_script(monkeypatch, tmp_path):
    """The nvcc on PATH may be a script that execs the real one elsewhere: its toolkit is found all the same,
    ahead of /usr/local/cuda."""
    toolkit = _fake_toolkit(tmp_path / "cuda-real")
    wrapper = tmp_path / "wrap" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:{os.environ['PATH']}")
    assert build_config._cuda_home() == toolkit
    (toolkit / "include" / "cuda_runtime.h").unlink()  # not a toolkit without its headers
    assert build_config._cuda_home() != toolkit


def test_mmasp_builds_without_cusparselt(monkeypatch, tmp_path):
    """Only _C links cuSPARSELt: without it _C is skipped with the reason and _mmasp still builds."""
    if CFG is None:
        pytest.skip(WHY)
    monkeypatch.setattr(build_config, "_cusparselt", lambda cuda: None)
    cfg, why = build_config.config()
    assert why is None and "cuSPARSELt not found" in build_config.unbuildable(cfg, "_C")
    assert build_config.unbuildable(cfg, "_mmasp") is None
    text = build_config.build_ninja(cfg, tmp_path, tmp_path / "_mmasp.so", "_mmasp")
    assert "mmasp.cu" in text and "cusparseLt" not in text and "None" not in text
