"""Where the CUDA toolkit, cuSPARSELt, pybind11 and ninja are, and the build.ninja of each extension.

Used by setup.py and by tests/test_build_ext.py (which checks the extension exists wherever it can be built).
The CPU extension ``_cpu24`` has its own config (``cpu_config``/``build_ninja_cpu``): it needs only a C++
compiler, ninja, pybind11 and torch, so it builds where CUDA is missing.
"""
import glob
import os
import platform
import re
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("80", "86", "89", "90")  # Ampere, Ada, Hopper: every arch with 2:4 sparse tensor cores we target


def _nvcc_toolkit():
    """Where the ``nvcc`` on PATH says its toolkit is. It may be a wrapper script (``exec
    /usr/local/cuda-X.Y/bin/nvcc``), so its own folder says nothing: ask it (``--dryrun`` prints
    ``TOP=<toolkit>/bin/..``), else follow its links, else the versioned folder its ``--version`` names."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return []

    def run(*args):
        try:
            out = subprocess.run([nvcc, *args], capture_output=True, text=True, timeout=30, check=False)
            return out.stdout + out.stderr
        except (OSError, subprocess.SubprocessError):
            return ""

    dry = run("--dryrun", "-x", "cu", "-E", os.devnull)
    found = [Path(top).resolve() for top in re.findall(r"^#\$ TOP=(\S+)", dry, re.M)]
    found.append(Path(nvcc).resolve().parent.parent)
    version = re.search(r"release (\d+)\.(\d+)", run("--version"))
    if version:
        found.append(Path(f"/usr/local/cuda-{version[1]}.{version[2]}"))
    return found


def _cuda_home():
    """The toolkit folder: $CUDA_HOME/$CUDA_PATH, the one of the ``nvcc`` on PATH, /usr/local/cuda, the newest
    /usr/local/cuda-X.Y, else the pip wheels' (``nvidia/cu13``, CUDA 13; ``nvidia/cuda_nvcc``, CUDA 12); the first
    that holds bin/nvcc and include/cuda_runtime.h."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), *_nvcc_toolkit(), "/usr/local/cuda"]
    cands += sorted(glob.glob("/usr/local/cuda-*"), key=lambda p: [int(x) for x in re.findall(r"\d+", p)],
                    reverse=True)
    cands += [d / "nvidia" / sub for d in _site_dirs() for sub in ("cu13", "cuda_nvcc")]
    for c in cands:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c)
    return None


def _site_dirs():
    dirs = [Path(p) for p in sys.path if p and Path(p).is_dir()]
    try:
        dirs += [Path(p) for p in site.getsitepackages()]
    except AttributeError:
        pass
    return list(dict.fromkeys(d.resolve() for d in dirs))


def _cusparselt(cuda):
    """(include dir, lib dir) holding cusparseLt.h and libcusparseLt.so.0.

    Wheel layouts: 0.10.x ``nvidia/cu13/{include,lib}``, 0.8.x ``nvidia/cusparselt/{include,lib}``."""
    roots = [Path(os.environ["CUSPARSELT_HOME"])] if os.environ.get("CUSPARSELT_HOME") else []
    for d in _site_dirs():
        roots += [d / "nvidia" / "cu13", d / "nvidia" / "cu12", d / "nvidia" / "cusparselt"]
    roots.append(cuda)
    for r in roots:
        inc = r / "include"
        for lib in (r / "lib", r / "lib64"):
            if (inc / "cusparseLt.h").exists() and (lib / "libcusparseLt.so.0").exists():
                return inc, lib
    return None


def _cusparse_include(cslt_inc, cuda):
    """Where cusparse.h is, when cusparseLt.h needs it (0.8.x includes it unconditionally; 0.10.x has a stub)."""
    if "cusparseLt_cusparse_stub.h" in (cslt_inc / "cusparseLt.h").read_text(errors="ignore"):
        return []
    cands = [cuda / "include"] + [d / "nvidia" / sub / "include" for d in _site_dirs()
                                  for sub in ("cusparse", "cu13", "cu12")]
    for c in cands:
        if (c / "cusparse.h").exists():
            return [c]
    return None


def _cudart_static(cuda):
    for lib in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        p = cuda / lib / "libcudart_static.a"
        if p.exists():
            return p
    return None


def _ninja():
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja  # the PyPI wheel puts the binary in its package
        return str(Path(ninja.BIN_DIR) / "ninja")
    except (ImportError, AttributeError):
        return None


def _build_tools():
    """``({"ninja", "pybind_inc"}, None)``, what every extension build needs, or ``(None, why)``."""
    ninja = _ninja()
    if ninja is None:
        return None, "ninja not found; pip install ninja"
    try:
        import pybind11
    except ImportError:
        return None, "pybind11 not found; pip install pybind11"
    return {"ninja": ninja, "pybind_inc": pybind11.get_include()}, None


def config():
    """Everything the build needs, or the reason it cannot happen. cuSPARSELt is needed by ``_C`` only:
    without it ``cfg["cslt"]`` says why, and :func:`unbuildable` skips ``_C`` alone."""
    if os.environ.get("SPARSE_RUNTIME_NO_EXT", "") not in ("", "0"):
        return None, "SPARSE_RUNTIME_NO_EXT is set"
    cuda = _cuda_home()
    if cuda is None:
        return None, "no CUDA toolkit (nvcc with include/cuda_runtime.h) found; set CUDA_HOME"
    cudart = _cudart_static(cuda)
    if cudart is None:
        return None, f"libcudart_static.a not found under {cuda}"
    tools, why = _build_tools()
    if tools is None:
        return None, why
    cfg = {"cuda": cuda, "cudart": cudart, **tools,
           "cslt_inc": None, "cslt_lib": None, "extra_inc": [], "cslt": None}
    cslt = _cusparselt(cuda)
    extra_inc = None if cslt is None else _cusparse_include(cslt[0], cuda)
    if cslt is None:
        cfg["cslt"] = "cuSPARSELt not found; pip install nvidia-cusparselt-cu13 (or set CUSPARSELT_HOME)"
    elif extra_inc is None:
        cfg["cslt"] = "this cuSPARSELt needs cusparse.h; pip install nvidia-cusparse-cu12/cu13"
    else:
        cfg.update(cslt_inc=cslt[0], cslt_lib=cslt[1], extra_inc=extra_inc)
    return cfg, None


# Extension -> (C++ sources, CUDA sources, links cuSPARSELt). _mmasp is the mma.sp decode kernel, apart from
# _C so that it needs nothing but the CUDA runtime.
EXTENSIONS = {"_C": (["cusparselt_ext.cpp"], ["decompress24.cu"], True),
              "_mmasp": (["mmasp_ext.cpp"], ["mmasp.cu"], False)}


def unbuildable(cfg, ext: str) -> str | None:
    """Why extension ``ext`` cannot be built with ``cfg`` (a :func:`config`), or None."""
    return cfg["cslt"] if EXTENSIONS[ext][2] else None


def build_ninja(cfg, build_dir: Path, output: Path, ext: str = "_C") -> str:
    py_inc = sysconfig.get_paths()["include"]
    cslt_incs = [cfg["cslt_inc"], *cfg["extra_inc"]] if EXTENSIONS[ext][2] else []  # _C alone needs cuSPARSELt
    incs = " ".join(f"-I{p}" for p in [ROOT / "csrc", py_inc, cfg["pybind_inc"], cfg["cuda"] / "include",
                                         *cslt_incs])
    gencode = " ".join(f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS)
    gencode += f" -gencode=arch=compute_{ARCHS[-1]},code=compute_{ARCHS[-1]}"  # PTX for newer GPUs
    lib = cfg["cslt_lib"]
    # The wheel's lib dir, absolute (editable installs, venvs) and relative to an installed package.
    rpaths = [str(lib), "$$ORIGIN/../nvidia/cu13/lib", "$$ORIGIN/../nvidia/cusparselt/lib"]
    rpath = ",".join(f"-rpath,{r}" for r in rpaths)  # quoted: the shell must not expand $ORIGIN
    cxx_srcs, cu_srcs, links_cslt = EXTENSIONS[ext]
    objs = [(f"{build_dir}/{Path(src).stem}.o", rule, src) for rule, srcs in (("cxx", cxx_srcs), ("nvcc", cu_srcs))
            for src in srcs]
    builds = "\n".join([f"build {o}: {rule} {ROOT}/csrc/{src}" for o, rule, src in objs]
                       + [f"build {output}: link {' '.join(o for o, _, _ in objs)}"])
    return f"""ninja_required_version = 1.3
cxx = {os.environ.get("CXX", "c++")}
nvcc = {cfg["cuda"] / "bin" / "nvcc"}
cflags = -O2 -std=c++17 -fPIC -fvisibility=hidden -Wall {incs}
nvflags = -O2 -std=c++17 --threads 0 -Xcompiler -fPIC -Xcompiler -fvisibility=hidden {gencode} {incs}
ldflags = -shared {f"-L{lib} -l:libcusparseLt.so.0 " if links_cslt else ""}{cfg["cudart"]} -ldl -lrt -lpthread {f"'-Wl,{rpath}'" if links_cslt else ""}

rule cxx
  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out
  depfile = $out.d
  deps = gcc
rule nvcc
  command = $nvcc -MD -MF $out.d $nvflags -c $in -o $out
  depfile = $out.d
  deps = gcc
rule link
  command = $cxx $in -o $out $ldflags

{builds}
"""


# The CPU extension: (source, extra flags). The ISA kernels get their own -m flags and include no torch headers
# (csrc/cpu24.h); the torch-facing TU has no -m flags and picks a kernel at run time.
CPU_X86 = platform.machine().lower() in ("x86_64", "amd64")
CPU_SOURCES = {"_cpu24": [("cpu24_ext.cpp", "torch"), ("cpu24_scalar.cpp", "")]
               + ([("cpu24_avx2.cpp", "-mavx2 -mfma"),
                   ("cpu24_avx512.cpp", "-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma"),
                   ("cpu24_avx512bf16.cpp", "-mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mfma")]
                  if CPU_X86 else [])}


def cpu_config():
    """Everything the CPU extension build needs, or the reason it cannot happen."""
    if os.environ.get("SPARSE_RUNTIME_NO_EXT", "") not in ("", "0"):
        return None, "SPARSE_RUNTIME_NO_EXT is set"
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        return None, f"no C++ compiler ({os.environ.get('CXX', 'c++')}) found; set CXX"
    tools, why = _build_tools()
    if tools is None:
        return None, why
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        return None, f"torch is not importable in the build environment ({e}); install with --no-build-isolation"
    return {"cxx": cxx, **tools,
            "torch_inc": cpp_extension.include_paths(), "torch_lib": cpp_extension.library_paths(),
            "cxx11_abi": int(torch._C._GLIBCXX_USE_CXX11_ABI)}, None


def build_ninja_cpu(cfg, build_dir: Path, output: Path, ext: str = "_cpu24") -> str:
    py_inc = sysconfig.get_paths()["include"]
    # torch's bundled pybind11 first: the one its tensor casters were written against.
    incs = " ".join(f"-I{p}" for p in [ROOT / "csrc", *cfg["torch_inc"], py_inc, cfg["pybind_inc"]])
    libs = " ".join(f"-L{p}" for p in cfg["torch_lib"])
    rpath = ",".join(f"-rpath,{p}" for p in cfg["torch_lib"])
    x86 = " -DSR_CPU24_X86" if CPU_X86 else ""
    objs = [(f"{build_dir}/{Path(src).stem}.o", src, flags) for src, flags in CPU_SOURCES[ext]]
    lines = []
    for obj, src, flags in objs:
        if flags == "torch":  # torch 2.13's headers are C++20 (they warn under C++17); the kernels are C++17
            lines.append(f"build {obj}: cxx {ROOT}/csrc/{src}\n  flags = -O2 -std=c++20 $torchflags")
        else:
            lines.append(f"build {obj}: cxx {ROOT}/csrc/{src}\n  flags = -O3 -std=c++17 {flags}".rstrip())
    lines.append(f"build {output}: link {' '.join(o for o, _, _ in objs)}")
    builds = "\n".join(lines)
    # -fopenmp: at::parallel_for is header code that runs on the calling thread alone unless compiled with OpenMP.
    # The libgomp.so.1 it links is the one torch has already loaded (same soname; rpath to torch's lib first).
    return f"""ninja_required_version = 1.3
cxx = {cfg["cxx"]}
cflags = -fPIC -fvisibility=hidden -Wall -D_GLIBCXX_USE_CXX11_ABI={cfg["cxx11_abi"]}{x86} {incs}
torchflags = -DTORCH_API_INCLUDE_EXTENSION_H -fopenmp
ldflags = -shared -fopenmp {libs} -lc10 -ltorch -ltorch_cpu -ltorch_python '-Wl,{rpath}'

rule cxx
  command = $cxx -MMD -MF $out.d $cflags $flags -c $in -o $out
  depfile = $out.d
  deps = gcc
rule link
  command = $cxx $in -o $out $ldflags

{builds}
"""
