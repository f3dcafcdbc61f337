"""``sparse-runtime eval``: perplexity of a model or sparse checkpoint on a text file."""
from __future__ import annotations

import json

HELP = "perplexity of a model or sparse checkpoint over non-overlapping windows of a text (default: WikiText-2)"


def add_arguments(p) -> None:
    from .common import add_bos_argument, add_model_arguments, add_tp_argument

    add_model_arguments(p)
    add_tp_argument(p)
    add_bos_argument(p, "evaluation windows")
    p.add_argument("--data", default=None, help="text or jsonl file (default: shared WikiText-2 raw test)")
    p.add_argument("--seqlen", type=int, default=2048, help="window length, clipped to the model's context")
    p.add_argument("--stride", type=int, default=None, help="window step (default: seqlen, non-overlapping)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    from pathlib import Path

    from ..data.perplexity import perplexity
    from ..data.calibration import DEFAULT_EVAL, context_length, read_texts
    from .common import load_from_args

    data = Path(args.data or DEFAULT_EVAL)
    text = "\n\n".join(read_texts(data))
    model, tok = load_from_args(args)
    seqlen = min(args.seqlen, context_length(model) or args.seqlen)
    res = perplexity(model, tok, text, seqlen=seqlen, stride=args.stride, max_tokens=args.max_tokens,
                     bos=args.bos)
    if args.json:
        print(json.dumps({"model": str(args.model), "data": str(data), **res.to_dict()}))
    else:
        print(f"{data.name}: {res}")
    return 0
