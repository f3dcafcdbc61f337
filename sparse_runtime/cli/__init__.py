"""The ``sparse-runtime`` command line (also ``python -m sparse_runtime``).

Each subcommand lives in its own module of this package and defines ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. Modules import their heavy
dependencies inside ``run`` so ``--help`` and ``info`` stay fast."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import SparseRuntimeError

# subcommand -> module name in this package
COMMANDS = {
    "info": "info",
    "generate": "generate",
    "prune": "prune",
    "recover": "recover",
    "plan": "plan",
    "eval": "evaluate",
    "bench": "bench",
    "serve": "serve",
    "export": "export",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-runtime", description="2:4 sparse inference runtime")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd, mod in COMMANDS.items():
        try:
            module = importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                raise
            p = sub.add_parser(cmd, help="(not available in this version)")
            p.set_defaults(func=lambda args, cmd=cmd: _missing(cmd))
            continue
        p = sub.add_parser(cmd, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(func=module.run, takes_rest=getattr(module, "TAKES_REST", False))
    return parser


def _missing(cmd: str) -> int:
    print(f"sparse-runtime {cmd}: not available in this version", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_rest", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    try:
        return int(args.func(args) or 0)
    except (SparseRuntimeError, FileNotFoundError, ValueError, TypeError) as e:
        # User errors get one clear line; SPARSE_RUNTIME_DEBUG=1 shows the traceback.
        if os.environ.get("SPARSE_RUNTIME_DEBUG"):
            raise
        print(f"sparse-runtime {args.command}: error: {e}", file=sys.stderr)
        return 2
