"""Batch-1 decode tokens/s of a dense model and a 2:4 checkpoint side by side, on the same engine, dtype and
threads (what ``make demo`` prints after building its checkpoint).

    python -m benchmarks.decode_speed --dense smollm2-135m --sparse checkpoints/smollm2-135m-2of4

Rate = (N - 1) / (time for N tokens - time for 1 token), greedy with EOS ignored, median of --repeats runs: the
prompt's prefill and the first token cancel, as in ``benchmarks.engine``."""
from __future__ import annotations

import argparse

import torch

from sparse_runtime.models.sources import load_model
from sparse_runtime.nn.linear import SparseLinear
from sparse_runtime.serving.engine import Engine, Request, SamplingParams

from .common import device_name
from .engine import timer

HELP = "batch-1 decode tokens/s of a dense model and a 2:4 checkpoint, side by side"


def decode_rate(model, tok, prompt: list[int], tokens: int, repeats: int) -> float:
    engine, median = Engine(model, tok, max_batch=1, max_seq_len=len(prompt) + tokens + 1), timer("cpu")

    def run(n):
        return lambda: engine.generate([Request(list(prompt), SamplingParams(max_tokens=n, ignore_eos=True))])
    with torch.inference_mode():
        run(2)()  # warm-up
        return (tokens - 1) / (median(run(tokens), repeats) - median(run(1), repeats))


def backends_of(model) -> str:
    names = sorted({m.active_backend for m in model.modules() if isinstance(m, SparseLinear)})
    return ", ".join(names) or "dense nn.Linear"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode_speed", description=HELP)
    p.add_argument("--dense", default="smollm2-135m")
    p.add_argument("--sparse", required=True, help="a 2:4 checkpoint (e.g. what make demo built)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt", default="The capital of France is")
    args = p.parse_args(argv)
    if args.tokens < 2 or args.repeats < 1:
        p.error("--tokens must be >= 2 and --repeats >= 1")
    rates = {}
    for label, spec in (("dense", args.dense), ("2:4", args.sparse)):
        model, tok = load_model(spec)
        prompt = tok(args.prompt)["input_ids"]
        rates[label] = (spec, decode_rate(model, tok, prompt, args.tokens, args.repeats), backends_of(model))
        del model
    print(f"decode at batch 1, eager engine, {args.tokens} tokens, {device_name('cpu')}:")
    for label, (spec, rate, backend) in rates.items():
        ratio = f"  {rate / rates['dense'][1]:.2f}x dense" if label != "dense" else ""
        print(f"  {label:<6} {rate:7.1f} tok/s  {spec}  (linears: {backend}){ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
