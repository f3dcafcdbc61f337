"""``sparse-runtime bench SUITE``: run a benchmark script of the source tree's ``benchmarks/`` folder.

``bench kernels`` is ``python benchmarks/kernels.py``, ``bench prefill`` is ``python benchmarks/prefill.py``. The
scripts are not part of the installed package, so this works from a source checkout (or an editable install)
and says so elsewhere. A suite's script is loaded only when that suite runs (its own parser reads the
arguments after the suite's name), never while the command line's parser is built."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

HELP = ("benchmarks from the source tree: 'bench kernels' times sparse matmuls against dense cuBLAS over M, "
        "'bench prefill' compares the cuSPARSELt paths at large M")
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SUITES = {"kernels": "decode-size sparse matmuls against dense cuBLAS over M (GPU); --help for its options",
          "prefill": "large-M GEMMs: dense vs torch vs cusparselt vs dispatch (GPU); --help for its options"}
TAKES_REST = True  # the arguments after the suite's name belong to the suite's own parser


def load_suite(name: str):
    """The module ``benchmarks/<name>.py``, or None if this is not a source checkout."""
    path = BENCHMARKS / f"{name}.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"sparse_runtime_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="suite", metavar="SUITE")
    for name, help_ in SUITES.items():
        sub.add_parser(name, help=help_, description=help_, add_help=False)


def run(args) -> int:
    if args.suite is None:
        print(f"sparse-runtime bench: name a suite: {', '.join(SUITES)} (e.g. 'sparse-runtime bench kernels --help')",
              file=sys.stderr)
        return 2
    module = load_suite(args.suite)
    if module is None:
        print(f"sparse-runtime bench {args.suite}: {BENCHMARKS / args.suite}.py not found; "
              "run it from a source checkout of sparse_runtime", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(prog=f"sparse-runtime bench {args.suite}", description=module.HELP)
    module.add_arguments(p)
    return module.run(p.parse_args(args.rest))
