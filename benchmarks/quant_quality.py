"""Joint 2:4 + quantization on SmolLM2-135M: WikiText-2 perplexity of the dense model and of 2:4 SparseGPT, each in
full precision, int8 and int4, without and with the best DenoiseRotator configuration of
``benchmarks/rotation_quality`` (nm objective, full R1, 100 Adam steps per layer on SparseGPT's scores, least-squares
refit 50). Dense rows are quantized by GPTQ (``method="gptq"``: SparseGPT's sweep with nothing pruned), 2:4 rows by
SparseGPT's joint sweep; every model runs as fake-quantized ``nn.Linear`` (the weights hold ``code * scale``, the
same numbers a quantized SparseLinear computes with). Writes benchmarks/results/quant_quality.json after every run.

    python -m benchmarks.quant_quality                           # the protocol: 32 x 512 C4 calibration, 40,960 tokens
    python -m benchmarks.quant_quality --runs 2:4/int4/nm --out /tmp/q.json
    python -m benchmarks.quant_quality --smoke --out /tmp/q.json # stories260K, tiny calibration: seconds, proves it runs
    python -m benchmarks.quant_quality --runs 2:4/int8/nm --add  # one more row in the report, the others kept

A run is ``PRUNE/QUANT/ROTATION``: PRUNE ``dense`` or ``2:4``, QUANT ``fp32`` or a scheme (int8, int4, fp8; int4 takes
``--group-size``), quantized in SparseGPT's sweep, or ``SCHEME-after`` (2:4 only): the full-precision prune, then GPTQ on
its fixed masks (``PruneConfig.quantize_after``; runs of one invocation share that prune), either with ``-search``
after it: scales by the clipping search (``PruneConfig.scale_search``) instead of absmax, and any QUANT with ``-sink``
last: the first token of each calibration window weighs the window's length (``--seqlen``) in the key and value
projections' Hessians (``PruneConfig.sink_weight``), in the prune and in its GPTQ stage; ROTATION ``none`` or a
rotation objective. ``dense/fp32`` takes no rotation (a rotation is
function-preserving: it is the dense model). SmolLM2's hidden size 576 is not a multiple of 128: int4's groups are
``--group-size 64`` (the multiple of 8 closest to 128 that divides 576 and 1536).
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from sparse_runtime.data.perplexity import perplexity
from sparse_runtime.format.quant import SCHEMES
from sparse_runtime.models.sources import load_model
from sparse_runtime.prune import PruneConfig, prune, quantize_pruned
from sparse_runtime.prune.config import OBJECTIVES

from .common import (AFTER, RESULTS, ROOT, add_protocol_arguments, calibration, cpu_model, metadata, now,
                     protocol_report, quant_parts, write_json)

PRUNES = ("dense", "2:4")
DEFAULT_RUNS = [f"{p}/{q}/{r}" for r in ("none", "nm") for p in PRUNES
                for q in ("fp32", "int8", "int4", "int8" + AFTER, "int4" + AFTER)
                if not (p == "dense" and (q.endswith(AFTER) or q == "fp32" and r != "none"))]
# The best rotated SparseGPT run of benchmarks/rotation_quality (docs/results.md): nm, full R1, 100 steps, refit 50
ROTATION = {"steps": 100, "blocks": 1, "importance": "sparsegpt"}
REFIT = 50
SMOKE = {"model": str(ROOT.parent / "shared" / "data" / "models" / "stories260K"), "nsamples": 4, "seqlen": 64,
         "text": str(ROOT.parent / "shared" / "data" / "text" / "tinystories_valid_head.txt"), "eval_seqlen": 128,
         "eval_tokens": 2048, "rotate_steps": 2, "refit": 5, "group_size": 32,
         "ignore": ["lm_head", "down_proj"]}  # down_proj's 172 inputs take no int4 group


def parse_run(spec: str) -> dict:
    parts = spec.split("/")
    scheme, after, search, sink = quant_parts(parts[1]) if len(parts) == 3 else (None, False, False, False)
    if (len(parts) != 3 or parts[0] not in PRUNES or scheme not in ("fp32", *SCHEMES)
            or scheme == "fp32" and (after or search) or parts[2] not in ("none", *OBJECTIVES)):
        raise SystemExit(f"bad run {spec!r}: want PRUNE/QUANT/ROTATION, PRUNE in {', '.join(PRUNES)}, QUANT fp32 or "
                         f"{', '.join(SCHEMES)} (then -after, -search, -sink), ROTATION none or "
                         f"{', '.join(OBJECTIVES)}")
    if parts[0] == "dense" and scheme == "fp32" and (parts[2] != "none" or sink):
        raise SystemExit(f"bad run {spec!r}: dense/fp32 prunes and quantizes nothing (a rotation alone is "
                         f"function-preserving); dense/fp32/none is that model")
    if parts[0] == "dense" and after:
        raise SystemExit(f"bad run {spec!r}: {AFTER} quantizes a prune's result; dense rows are GPTQ already")
    return {"prune": parts[0], "quant": parts[1], "rotation": parts[2]}


SETTINGS = ("model", "pattern", "calibration", "smoke", "group_size", "ignore", "rotation", "refit")


def previous_runs(out: Path, report: dict) -> dict:
    """``--add``: the runs of the report at ``out``, which must have been made with the same settings and evaluation
    as ``report`` (a clear error otherwise)."""
    import json

    try:
        old = json.loads(out.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--add: no report to add to at {out} ({e})") from None
    evaluation = lambda r: {k: v for k, v in r.get("eval", {}).items() if k not in ("tokens", "bos")}  # noqa: E731
    differ = [k for k in SETTINGS if old.get(k) != report[k]] + (["eval"] if evaluation(old) != evaluation(report) else [])
    if differ:
        raise SystemExit(f"--add: {out} was made with other settings ({', '.join(differ)}); write a new --out")
    return old.get("runs", {})


def run_config(run: dict, args) -> PruneConfig | None:
    """The prune a run asks for (None: the dense model as loaded)."""
    if run["prune"] == "dense" and run["quant"] == "fp32":
        return None
    rotated, (scheme, after, search, sink) = run["rotation"] != "none", quant_parts(run["quant"])
    return PruneConfig("gptq" if run["prune"] == "dense" else "sparsegpt", "2:4", device=args.device,
                       ignore=tuple(args.ignore), progress=args.progress,
                       quantize=None if scheme == "fp32" else scheme, quantize_after=after, scale_search=search,
                       group_size=args.group_size if scheme == "int4" else None,
                       refit=args.refit if run["prune"] == "2:4" else 0, sink_weight=args.seqlen if sink else 1.0,
                       rotate=run["rotation"] if rotated else None, rotate_steps=args.rotate_steps,
                       rotate_blocks=ROTATION["blocks"], rotate_importance=ROTATION["importance"] if rotated else None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_arguments(p)
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS)
    p.add_argument("--group-size", type=int, default=64, help="int4: input columns per scale (default: 64)")
    p.add_argument("--rotate-steps", type=int, default=ROTATION["steps"])
    p.add_argument("--refit", type=int, default=REFIT, help="2:4 rows: least-squares refit steps (default: 50)")
    p.add_argument("--ignore", nargs="+", default=["lm_head"], help="linears left dense and full precision")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--progress", action="store_true", help="per-layer progress bars")
    p.add_argument("--smoke", action="store_true",
                   help="stories260K, 4 x 64 TinyStories calibration, 2,048 eval tokens, 2 rotation steps, refit 5, "
                        "int4 groups of 32, down_proj left dense: proves the benchmark runs, measures nothing")
    p.add_argument("--out", default=str(RESULTS / "quant_quality.json"))
    p.add_argument("--add", action="store_true",
                   help="add the runs to the report at --out (same settings), replacing runs of the same name")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.nsamples, args.seqlen = SMOKE["model"], SMOKE["nsamples"], SMOKE["seqlen"]
        args.calib = args.eval_data = SMOKE["text"]
        args.eval_seqlen, args.eval_tokens = SMOKE["eval_seqlen"], SMOKE["eval_tokens"]
        args.rotate_steps, args.refit, args.group_size = SMOKE["rotate_steps"], SMOKE["refit"], SMOKE["group_size"]
        args.ignore = SMOKE["ignore"]
    runs = [parse_run(r) for r in args.runs]
    configs = [run_config(r, args) for r in runs]  # every bad flag refused before the first model load
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    model, tok = load_model(args.model)
    calib = calibration(args, model, tok)
    text = Path(args.eval_data).read_text(encoding="utf-8")
    report = {
        "model": args.model, **metadata(args.device), "pattern": "2:4", **protocol_report(args, calib, tok),
        "smoke": args.smoke, "group_size": args.group_size, "ignore": args.ignore,
        "rotation": {**ROTATION, "steps": args.rotate_steps}, "refit": args.refit,
        "notes": "Dense rows: GPTQ (SparseGPT's sweep, nothing pruned); 2:4 rows: SparseGPT, quantized in its sweep "
                 "(with refit: pruned, refit, then quantized by a second sweep on the fixed mask); -after rows: the "
                 "2:4 full-precision prune, then GPTQ on its fixed masks, calibrated through the quantized layers. Rotated rows learn "
                 "DenoiseRotator rotations per layer (on SparseGPT's scores for the 2:4 pattern, also for the dense "
                 "GPTQ rows) and prune true-sequentially. int8/fp8: one scale per output row; int4: one per row and "
                 "group_size input columns; symmetric absmax scales (-search rows: each group's clipped scale of "
                 "least rounding error). Perplexity of fake-quantized nn.Linear weights.",
        "perplexity": {}, "runs": {},
    }
    if args.add:
        for spec, run in previous_runs(out, report).items():
            report["runs"][spec], report["perplexity"][spec] = run, run["perplexity"]
    print(f"{len(runs)} runs on {args.model}", flush=True)
    pruned = {}  # (rotation, sink) -> (2:4 full-precision model, its result, seconds): what -after runs start from
    for spec, run, config in zip(args.runs, runs, configs):
        model, _ = load_model(args.model)  # rotation changes the model's structure: start from a fresh copy
        result, t0, shared = None, time.perf_counter(), 0.0
        if config is not None and (config.quantize_after or config.quant is None) and config.method == "sparsegpt":
            key = (run["rotation"], config.sink_weight)
            if key in pruned:
                model, result, shared = (copy.deepcopy(x) for x in pruned[key])
            else:
                result = prune(model, config.full_precision(), calib=calib)
                shared = time.perf_counter() - t0
                pruned[key] = (copy.deepcopy(model), copy.deepcopy(result), shared)
            t0 = time.perf_counter()
            if config.quantize_after:  # PruneConfig.quantize_after's second stage, on the shared prune
                result = quantize_pruned(model, result, config, calib)
        elif config is not None:
            result = prune(model, config, calib=calib)
        seconds = time.perf_counter() - t0 + shared
        res = perplexity(model.to(args.device), tok, text, seqlen=args.eval_seqlen, max_tokens=args.eval_tokens,
                         progress=False, bos=args.bos)
        report["eval"]["tokens"], report["eval"]["bos"] = res.tokens, res.bos
        rot = result.rotation if result is not None else None
        report["perplexity"][spec] = round(res.ppl, 3)
        report["runs"][spec] = {
            **run, "method": None if config is None else config.method, "perplexity": round(res.ppl, 3),
            "date": now(),
            "quantization": None if config is None or config.quant is None else config.quant.to_dict(),
            "refit": 0 if config is None else config.refit, "threads": args.threads, "cpu": cpu_model(),
            "seconds": round(seconds, 1),
            "rotation_seconds": round(sum(layer["seconds"] for layer in rot["layers"]), 1) if rot else 0.0,
            "quantized_linears": 0 if result is None else len(result.scales),
            "pruned_linears": 0 if result is None else len(result.masks),
        }
        write_json(out, report)
        print(f"{spec:20s} ppl {res.ppl:.3f}  [{seconds:.0f} s]", flush=True)
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
