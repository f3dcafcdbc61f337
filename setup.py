"""Build and install sparse_runtime.

The Triton kernels in ``kernels/`` install as the subpackage ``sparse_runtime.kernels``.
"""
from setuptools import find_packages, setup

setup(
    name="sparse-runtime",
    version="0.1.0",
    description="2:4 sparse inference runtime: pruning, compressed format, Triton and cuSPARSELt kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["sparse_runtime", "sparse_runtime.*"]) + ["sparse_runtime.kernels"],
    package_dir={"sparse_runtime.kernels": "kernels"},
    install_requires=[
        "torch>=2.11",
        "transformers>=5.0",
        "safetensors",
        "tqdm",
        "numpy",
    ],
    entry_points={"console_scripts": ["sparse-runtime=sparse_runtime.cli:main"]},
)
