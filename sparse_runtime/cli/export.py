"""``sparse-runtime export``: write a sparse checkpoint in another ecosystem's format."""
from __future__ import annotations

HELP = "write a sparse checkpoint as a compressed-tensors folder (sparse-24-bitmask; int4/int8 as marlin-24)"


def add_arguments(p) -> None:
    p.add_argument("--format", required=True, choices=["compressed-tensors"], help="output format")
    p.add_argument("--model", required=True, help="sparse checkpoint (or compressed-tensors folder) to export")
    p.add_argument("--out", required=True, help="output folder (written atomically)")


def run(args) -> int:
    from ..models.compressed_tensors import export_compressed_tensors
    from ..models.sources import load_model

    model, tok = load_model(args.model, device="cpu", backend="reference")
    out = export_compressed_tensors(model, args.out, tokenizer=tok)
    print(f"wrote {out} ({args.format})")
    return 0
