"""Why the attention sink needs its own weight in GPTQ's Hessian (``PruneConfig.sink_weight``): WikiText-2
perplexity of SmolLM2-135M with some of its linears quantized to int4 (groups of 64) by round-to-nearest, by GPTQ on
the plain Hessian, and by GPTQ with the first token of each calibration window weighted ``--seqlen`` times, in the
key and value projections only or in every linear. Every linear is solved on the dense model's inputs (one
calibration pass, no true-sequential chaining), so each run changes only what it names. Writes
benchmarks/results/sink_weight.json.

    python -m benchmarks.sink_weight                                 # the protocol's calibration and evaluation
    python -m benchmarks.sink_weight --smoke --out /tmp/s.json       # stories260K: seconds, proves it runs

A run is ``QUANTIZER:LINEARS``: QUANTIZER ``rtn``, ``gptq`` (every token alike), ``gptq-sink`` (the first token
weighted in k_proj's and v_proj's Hessians) or ``gptq-sink-all`` (in every linear's); LINEARS ``all`` or one kind
(``v_proj``, ``k_proj``, ...); the others stay dense.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from sparse_runtime.data.perplexity import perplexity
from sparse_runtime.format.quant import QuantScheme, fake_quantize
from sparse_runtime.models.architecture import KEY_VALUE, decoder_linears, matches
from sparse_runtime.models.sources import load_model
from sparse_runtime.prune.sparsegpt import sparsegpt_solve
from sparse_runtime.prune.statistics import Hessian

from .common import (RESULTS, ROOT, add_protocol_arguments, calibration, cpu_model, metadata, protocol_report,
                     write_json)

QUANTIZERS = ("rtn", "gptq", "gptq-sink", "gptq-sink-all")
DEFAULT_RUNS = ["rtn:v_proj", "gptq:v_proj", "gptq-sink:v_proj", "rtn:k_proj", "gptq:k_proj", "gptq-sink:k_proj",
                "rtn:all", "gptq:all", "gptq-sink:all", "gptq-sink-all:all"]
SMOKE = {"model": str(ROOT.parent / "shared" / "data" / "models" / "stories260K"), "nsamples": 4, "seqlen": 64,
         "text": str(ROOT.parent / "shared" / "data" / "text" / "tinystories_valid_head.txt"), "eval_seqlen": 128,
         "eval_tokens": 2048, "group_size": 32, "ignore": ["lm_head", "down_proj"]}


def parse_run(spec: str) -> tuple[str, str]:
    quantizer, _, linears = spec.partition(":")
    if quantizer not in QUANTIZERS or not linears:
        raise SystemExit(f"bad run {spec!r}: want QUANTIZER:LINEARS, QUANTIZER in {', '.join(QUANTIZERS)}, "
                         f"LINEARS 'all' or a linear's name (v_proj, ...)")
    return quantizer, linears


def input_hessians(linears: dict, model, calib, weight: float) -> dict:
    """``{name: (plain Hessian, first-token-weighted Hessian)}`` of each linear's inputs, from one pass of the dense
    model over the calibration windows."""
    pairs = {n: (Hessian(m.in_features, "cpu"), Hessian(m.in_features, "cpu", first_weight=weight))
             for n, m in linears.items()}

    def add(pair, x):
        for h in pair:
            h.add(x)

    hooks = [m.register_forward_pre_hook(lambda m, a, pair=pairs[n]: add(pair, a[0])) for n, m in linears.items()]
    try:
        with torch.no_grad():
            for window in calib:
                model(window[None])
    finally:
        for h in hooks:
            h.remove()
    return pairs


def quantize(weight, hessians, quantizer: str, name: str, scheme: QuantScheme) -> torch.Tensor:
    if quantizer == "rtn":
        return fake_quantize(weight, scheme)
    weighted = quantizer == "gptq-sink-all" or quantizer == "gptq-sink" and matches(name, KEY_VALUE)
    H = hessians[1 if weighted else 0].H
    return sparsegpt_solve(weight, H, keep=torch.ones_like(weight, dtype=torch.bool), quant=scheme).weight


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_arguments(p)
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS)
    p.add_argument("--group-size", type=int, default=64, help="int4: input columns per scale (default: 64)")
    p.add_argument("--ignore", nargs="+", default=["lm_head"], help="linears left dense")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="stories260K, 4 x 64 calibration, 2,048 eval tokens")
    p.add_argument("--out", default=str(RESULTS / "sink_weight.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.nsamples, args.seqlen = SMOKE["model"], SMOKE["nsamples"], SMOKE["seqlen"]
        args.calib = args.eval_data = SMOKE["text"]
        args.eval_seqlen, args.eval_tokens = SMOKE["eval_seqlen"], SMOKE["eval_tokens"]
        args.group_size, args.ignore = SMOKE["group_size"], SMOKE["ignore"]
    runs = [parse_run(r) for r in args.runs]
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    model.eval()
    calib = calibration(args, model, tok)
    text = Path(args.eval_data).read_text(encoding="utf-8")
    linears, _ = decoder_linears(model, "unstructured", ignore=args.ignore)
    dense = {n: m.weight.detach().clone() for n, m in linears.items()}
    t0 = time.perf_counter()
    hessians = input_hessians(linears, model, calib, float(args.seqlen))
    scheme = QuantScheme("int4", args.group_size)
    report = {"model": args.model, **metadata("cpu"), **protocol_report(args, calib, tok), "smoke": args.smoke,
              "group_size": args.group_size, "ignore": args.ignore, "sink_weight": args.seqlen, "cpu": cpu_model(),
              "statistics_seconds": round(time.perf_counter() - t0, 1), "perplexity": {}}

    def evaluate() -> float:
        res = perplexity(model, tok, text, seqlen=args.eval_seqlen, max_tokens=args.eval_tokens, progress=False,
                         bos=args.bos)
        report["eval"]["tokens"], report["eval"]["bos"] = res.tokens, res.bos
        return round(res.ppl, 3)

    with torch.no_grad():
        report["perplexity"]["dense"] = evaluate()
        for spec, (quantizer, kind) in zip(args.runs, runs):
            for n, m in linears.items():
                chosen = kind == "all" or matches(n, [kind])
                m.weight.copy_(quantize(dense[n], hessians[n], quantizer, n, scheme) if chosen else dense[n])
            report["perplexity"][spec] = evaluate()
            write_json(args.out, report)
            print(f"{spec:22s} ppl {report['perplexity'][spec]:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
