"""``sparse-runtime generate``: load a model or checkpoint and stream generated text."""
from __future__ import annotations

import argparse
import json
import sys
import time

from .common import add_model_arguments, add_tp_argument, load_from_args

HELP = "generate text from a model or sparse checkpoint, streaming tokens"


def add_arguments(p) -> None:
    add_model_arguments(p)
    add_tp_argument(p)
    p.add_argument("--prompt", default="Write one sentence about the ocean.")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before TEXT (repeatable)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap the prompt in the tokenizer's chat template when it has one (default: on)")
    p.add_argument("--sparsify", default=None, metavar="PATTERN",
                   help="magnitude-prune the decoder linears to PATTERN (e.g. 2:4) before generating")
    p.add_argument("--json", action="store_true", help="print one JSON object with the text instead of streaming")


def run(args) -> int:
    from ..serving.generate import stream_generate
    from ..nn.sparsify import sparsify

    model, tok = load_from_args(args)
    if args.tp and args.tp > 1:  # every rank must sample the same tokens
        from ..serving.tensor_parallel import shared_seed

        args.seed = shared_seed(args.seed)
    if args.sparsify:
        print(sparsify(model, pattern=args.sparsify, backend=args.backend), file=sys.stderr)
    t0, n, text = time.perf_counter(), 0, []
    for token in stream_generate(model, tok, args.prompt, args.max_new_tokens, args.temperature,
                                 args.top_k, args.top_p, args.seed, chat=args.chat, stop=tuple(args.stop)):
        text.append(token.text)
        n += 1
        if not args.json:
            sys.stdout.write(token.text)
            sys.stdout.flush()
    dt = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"model": str(args.model), "prompt": args.prompt, "text": "".join(text), "tokens": n,
                          "seconds": round(dt, 3), "tokens_per_second": round(n / dt, 2) if n else 0.0}))
        return 0
    if n == 0:  # say why nothing printed rather than leave an empty line
        print("[0 tokens: the model's first token was end-of-sequence; try --no-chat or sampling "
              "(--temperature 0.7)]", file=sys.stderr)
    else:
        print()  # the text ends with a newline, so a shell prompt or a pipe's next line starts on its own
        print(f"[{n} tokens in {dt:.2f} s, {n / dt:.1f} tok/s]", file=sys.stderr)
    return 0
