"""``sparse-runtime bench SUITE``: a GPU benchmark of the source checkout's ``benchmarks`` package.

``bench kernels`` runs ``benchmarks.kernels`` (as ``python -m benchmarks.kernels`` does), ``bench prefill`` runs
``benchmarks.prefill``. The benchmarks are not part of the installed package: the suite's module is imported
only when that suite runs (its own parser reads the arguments after the suite's name), and where it cannot be
imported the command says how to run it from a checkout."""
from __future__ import annotations

import argparse
import importlib
import sys

HELP = ("benchmarks from a source checkout: 'bench kernels' times sparse matmuls against dense ones over M (GPU or CPU), "
        "'bench prefill' compares the cuSPARSELt paths at large M")
SUITES = {"kernels": "decode-size sparse matmuls against the dense paths over M (cuBLAS on a GPU; without one, the "
                      "CPU kernels against MKL/oneDNN and inductor); --help for its options",
          "prefill": "large-M GEMMs: dense vs torch vs cusparselt vs dispatch (GPU); --help for its options"}
TAKES_REST = True  # the arguments after the suite's name belong to the suite's own parser


def load_suite(name: str):
    """The module ``benchmarks.<name>``, or None where the ``benchmarks`` package of a checkout is not importable."""
    try:
        module = importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as e:
        if e.name not in ("benchmarks", f"benchmarks.{name}"):
            raise  # the suite is there but one of its own imports is missing: show that
        return None
    return module if hasattr(module, "run") and hasattr(module, "add_arguments") else None


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
        print(f"sparse-runtime bench {args.suite}: the benchmarks are not installed with the package; in a source "
              f"checkout of sparse_runtime, run 'python -m benchmarks.{args.suite}' (or 'python -m sparse_runtime "
              f"bench {args.suite}') from its root", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(prog=f"sparse-runtime bench {args.suite}", description=module.HELP)
    module.add_arguments(p)
    return module.run(p.parse_args(args.rest))
