"""Build and install sparse_runtime.

The Triton kernels in ``kernels/`` install as the subpackage ``sparse_runtime.kernels`` (``sparse_runtime/kernels``
links to them).

The cuSPARSELt extension ``sparse_runtime._C`` and the mma.sp decode kernel ``sparse_runtime._mmasp``
(``csrc/``) are built with nvcc + ninja when the CUDA toolkit is found (``_C`` also needs cuSPARSELt: the
``nvidia-cusparselt-cu13``/``-cu12`` wheel, or ``CUSPARSELT_HOME``); what cannot be built is skipped, the
pure-Python package installs and the reason is printed. The CPU extension ``sparse_runtime._cpu24``
(2:4 linear with AVX-512/AVX2 kernels) needs only a C++ compiler, ninja, pybind11 and torch, and is built or
skipped on its own. ``SPARSE_RUNTIME_NO_EXT=1`` skips them all, ``SPARSE_RUNTIME_REQUIRE_EXT=1`` turns a skip or
a failed build into an error (for CI).
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "csrc"))
from build_config import CPU_SOURCES, build_ninja, build_ninja_cpu, config, cpu_config, unbuildable


class NinjaBuildExt(build_ext):
    """Builds the extensions from generated build.ninja files (not torch's CUDAExtension, which the CPU build of
    torch cannot build). The CUDA extensions and the CPU one are configured, skipped and built apart."""

    def run(self):
        cfg, why = config()
        cpu_cfg, cpu_why = cpu_config()
        if cfg is None:
            self._skip("the CUDA extensions", why)
        if cpu_cfg is None:
            self._skip("the CPU extension sparse_runtime._cpu24", cpu_why)
        self._cfg, self._cpu_cfg = cfg, cpu_cfg
        self.extensions = [e for e in self.extensions if (cpu_cfg if self._is_cpu(e) else cfg) is not None]
        if self.extensions:
            super().run()

    @staticmethod
    def _is_cpu(ext):
        return ext.name.rsplit(".", 1)[-1] in CPU_SOURCES

    def build_extension(self, ext):
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        # A fixed folder in the tree (ignored by git), so reinstalls rebuild only what changed.
        name = ext.name.rsplit(".", 1)[-1]
        build_dir = ROOT / "build" / f"sparse_runtime{name}"
        build_dir.mkdir(parents=True, exist_ok=True)
        output.parent.mkdir(parents=True, exist_ok=True)
        if self._is_cpu(ext):
            text, cfg, what = build_ninja_cpu(self._cpu_cfg, build_dir, output, name), self._cpu_cfg, "CPU"
        else:
            why = unbuildable(self._cfg, name)  # _C needs cuSPARSELt, _mmasp only the toolkit
            if why:
                self._skip(f"the CUDA extension {ext.name}", why)
                return
            text, cfg, what = build_ninja(self._cfg, build_dir, output, name), self._cfg, "CUDA"
        (build_dir / "build.ninja").write_text(text)
        jobs = os.environ.get("MAX_JOBS", "2")
        try:
            subprocess.run([cfg["ninja"], "-C", str(build_dir), "-j", jobs], check=True)
        except subprocess.CalledProcessError as e:
            self._skip(f"the {what} extension {ext.name}", f"the build failed ({e}); see the compiler output above")

    @staticmethod
    def _skip(what, why):
        msg = f"sparse_runtime: not building {what}: {why}"
        if os.environ.get("SPARSE_RUNTIME_REQUIRE_EXT", "") not in ("", "0"):
            raise RuntimeError(msg)
        print(msg, file=sys.stderr)


setup(
    name="sparse-runtime",
    version="0.1.0",
    description="2:4 sparse inference runtime: pruning, compressed format, Triton and cuSPARSELt kernels",
    python_requires=">=3.10",
    # sparse_runtime/kernels is a link to the top-level kernels/ (no __init__.py there, so that a checkout's root
    # on sys.path never shadows the Hub's `kernels` package that transformers imports)
    packages=find_packages(include=["sparse_runtime", "sparse_runtime.*"]) + ["sparse_runtime.kernels"],
    install_requires=[
        "torch>=2.11",
        "transformers>=5.0",
        "safetensors",
        "tqdm",
        "numpy",
    ],
    # optional: an extension that cannot be built here is skipped (NinjaBuildExt says why), not copied in place
    ext_modules=[Extension("sparse_runtime._C", sources=["csrc/cusparselt_ext.cpp", "csrc/decompress24.cu"],
                           optional=True),
                 Extension("sparse_runtime._mmasp", sources=["csrc/mmasp_ext.cpp", "csrc/mmasp.cu"],
                           optional=True),
                 Extension("sparse_runtime._cpu24", sources=[f"csrc/{src}" for src, _ in CPU_SOURCES["_cpu24"]],
                           optional=True)],
    cmdclass={"build_ext": NinjaBuildExt},
    entry_points={"console_scripts": ["sparse-runtime=sparse_runtime.cli:main"]},
)
