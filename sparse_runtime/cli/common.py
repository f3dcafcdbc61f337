"""Arguments and helpers several subcommands share."""
from __future__ import annotations

import argparse

from ..format.codec import FLOAT_DTYPES, dtype_name

# --dtype: the dtypes the format stores, by name and short name ("bfloat16", "bf16") -> torch attribute name
DTYPES = {dtype_name(d, short): dtype_name(d) for d in FLOAT_DTYPES for short in (False, True)}


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="model folder, sparse checkpoint, .gguf file, or a known name (default: smollm2-135m)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="weight dtype (default: as stored)")
    p.add_argument("--backend", default="auto", help="SparseLinear backend (default: auto)")


def add_tp_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=None, metavar="W",
                   help="tensor parallelism over W processes: launch with torchrun --nproc_per_node W; rank 0 "
                        "prints, the other ranks' output is discarded (kept with SPARSE_RUNTIME_DEBUG=1)")


def add_bos_argument(p: argparse.ArgumentParser, what: str) -> None:
    from ..data.calibration import BOS_MODES

    p.add_argument("--bos", choices=BOS_MODES, default="auto",
                   help=f"BOS in the {what}: 'window' puts the tokenizer's BOS in front of every window, 'document' "
                        "only where the tokenizer puts it (the reference Wanda/SparseGPT protocol); 'auto' is "
                        "'window'. A tokenizer that adds no BOS (SmolLM2) makes all three the same")


def device_dtype(args):
    """``(device, dtype or None)`` from ``--device`` / ``--dtype``: CUDA when available, dtype as stored."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, getattr(torch, DTYPES[args.dtype]) if args.dtype else None


def load_from_args(args):
    from ..models.sources import load_model

    device, dtype = device_dtype(args)
    if getattr(args, "tp", None) not in (None, 1):
        return _load_tensor_parallel(args, dtype)
    return load_model(args.model, device=device, dtype=dtype, backend=args.backend)


def _load_tensor_parallel(args, dtype):
    import os
    import sys

    from transformers import AutoTokenizer

    from ..models.sources import resolve
    from ..serving.tensor_parallel import load_tensor_parallel, start

    if getattr(args, "sparsify", None):
        raise ValueError("--sparsify does not combine with --tp: prune and save a checkpoint first, then shard it")
    rank, device = start(args.tp, args.device, getattr(args, "tp_timeout", None))
    if rank and not os.environ.get("SPARSE_RUNTIME_DEBUG"):
        sys.stdout = sys.stderr = open(os.devnull, "w")  # rank 0 speaks for all
    path = resolve(args.model)
    model = load_tensor_parallel(path, rank, args.tp, device=device, dtype=dtype, backend=args.backend)
    return model, AutoTokenizer.from_pretrained(path)
