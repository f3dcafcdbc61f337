"""DenoiseRotator on SmolLM2-135M: WikiText-2 perplexity of 2:4 Wanda and SparseGPT without rotation, with the
paper's entropy objective (full and block-diagonal R1) and with this project's 2:4-aware objective (nm); rotation
steps, wall time and steps/s beside each; perplexity against rotation steps; CPU decode speed of the rotated
against the unrotated 2:4 model. Writes benchmarks/results/rotation_quality.json after every run, and a PNG.

    python -m benchmarks.rotation_quality                      # the protocol: 32 x 512 C4 calibration, 40,960 tokens
    python -m benchmarks.rotation_quality --runs wanda:nm:1:100 --out /tmp/r.json
    python -m benchmarks.rotation_quality --replot

A run is ``method:objective[:blocks[:steps[:importance]]]`` (objective ``none`` for no rotation; importance: whose
scores the rotation sees, by default the method's own).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sparse_runtime.data.perplexity import perplexity
from sparse_runtime.models.sources import load_model
from sparse_runtime.nn.sparsify import sparsify
from sparse_runtime.prune import prune
from sparse_runtime.prune.rotate import IMPORTANCE, OBJECTIVES

from .common import (RESULTS, add_protocol_arguments, calibration, cpu_model, finish_plot, metadata,
                     protocol_report, write_json)

DEFAULT_RUNS = ["wanda:none", "wanda:entropy:1:100", "wanda:entropy:4:100", "wanda:nm:1:100",
                "sparsegpt:none", "sparsegpt:entropy:1:100", "sparsegpt:entropy:4:100", "sparsegpt:nm:1:100",
                "sparsegpt:nm:1:100:wanda", "sparsegpt:nm:1:25", "wanda:nm:1:25"]
# LLaMA-3-8B, 2:4, seqlen 2048 (DenoiseRotator, Gu et al. 2025, table 1); context only
PAPER_REFERENCE = {"model": "LLaMA-3-8B", "seqlen": 2048, "dense": 6.14,
                   "wanda": {"none": 25.19, "entropy": 11.41}, "sparsegpt": {"none": 17.67, "entropy": 10.01}}


def parse_run(spec: str) -> dict:
    parts = spec.split(":")
    if len(parts) < 2 or parts[0] not in IMPORTANCE or parts[1] not in ("none", *OBJECTIVES):
        raise SystemExit(f"bad run {spec!r}: want method:objective[:blocks[:steps[:importance]]]")
    blocks = int(parts[2]) if len(parts) > 2 else 1
    steps = int(parts[3]) if len(parts) > 3 else 100
    importance = parts[4] if len(parts) > 4 else parts[0]
    if importance not in IMPORTANCE:
        raise SystemExit(f"bad run {spec!r}: unknown importance {importance!r}")
    return {"method": parts[0], "objective": parts[1], "blocks": blocks, "steps": 0 if parts[1] == "none" else steps,
            "importance": importance}


def run_key(r: dict) -> str:
    refit = f"/refit{r['refit']}" if r.get("refit") else ""
    if r["objective"] == "none":
        return f"{r['method']}/none{refit}"
    own = r.get("importance", r["method"]) == r["method"]
    return f"{r['method']}/{r['objective']}/b{r['blocks']}/{r['steps']}" + ("" if own else f"/{r['importance']}") + refit


def gflop_per_step(config, blocks: int, importance: str) -> float:
    """Matmul, QR and Cholesky work of one rotation step for one decoder layer (forward and backward), from the shapes.

    Rows rotated by R1 in one product: q, k, v, gate, up and the transposes of o, down; each [rows, d] @ [d, d/k]
    forward and the same again for the gradient of R1. QR of k blocks of d/k, ~4 (d/k)^3 each with backward. The
    rotated scales, ~3x their forward with backward: Wanda's two diagonals diag(Q^T H Q) (attention and MLP inputs,
    diagonal blocks only); SparseGPT's whole R^T H^-1 R (two products, block by block) and its Cholesky factor
    for the attention, MLP and o inputs. Elementwise work (scores, the objective) is memory-bound and not counted."""
    d, inner = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q_rows, kv_rows = config.num_attention_heads * hd, config.num_key_value_heads * hd
    rows = 2 * q_rows + 2 * kv_rows + 3 * inner
    b = d // blocks
    flops = 4 * rows * d * b + 4 * blocks * b**3
    if importance == "wanda":
        flops += 3 * 2 * 2 * blocks * b**3
    elif importance == "sparsegpt":
        inputs = ((d, blocks), (d, blocks), (q_rows, config.num_attention_heads))  # attention, MLP, o: n, blocks
        flops += 3 * sum(4 * n**3 / k + n**3 / 3 for n, k in inputs)
    return flops / 1e9


@torch.no_grad()
def decode_tokens_per_s(model, tok, new_tokens: int, repeats: int = 3) -> float:
    """Greedy decode speed (median of ``repeats``) of a sparsified model: what rotation costs at run time."""
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    times = []
    for _ in range(repeats + 1):  # the first run decompresses (decompressed backend) and warms up
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=tok.eos_token_id)
        times.append(time.perf_counter() - t0)
    return new_tokens / statistics.median(times[1:])


def sample(run: dict) -> tuple:
    """What a run's rounding follows: the thread count and the learning dtype (runs before the fields: 1, bf16)."""
    rotated = run.get("objective", "none") != "none"
    return run.get("threads", 1), run.get("rotation_dtype", "bfloat16" if rotated else None)


def merge_reports(reports: list[dict], out: Path) -> None:
    """One report from several runs of this script under the same protocol (e.g. two processes, one per core)."""
    def protocol(r):
        # reports written before these fields existed: concat sampling, and calibration windows never got a BOS
        cal = {"sampling": "concat", "bos": "none", **r["calibration"]}
        return r["model"], r["pattern"], cal, {k: v for k, v in r["eval"].items() if k != "bos"}, r["perplexity"]["dense"]

    first = reports[0]
    for r in reports[1:]:
        if protocol(r) != protocol(first):
            raise SystemExit("--merge: the reports differ in model, calibration, evaluation or dense perplexity")
    merged = {**first, "calibration": protocol(first)[2],
              "merged_from": [d for r in reports for d in r.get("merged_from", [r["date"]])]}
    merged["perplexity"], merged["runs"], merged["decode"] = (dict(first[k]) for k in ("perplexity", "runs", "decode"))
    for r in reports[1:]:
        merged["decode"].update(r["decode"])
        for key, run in r["runs"].items():
            kept = merged["runs"].get(key)
            (t0, d0), (t1, d1) = sample(kept or run), sample(run)
            key += (f"@{t1}t" if t1 != t0 else "") + (f"/{d1}" if d1 != d0 else "")  # rounded otherwise: a sample
            merged["runs"][key], merged["perplexity"][key] = run, run["perplexity"]
    write_json(out, merged)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppl = report["perplexity"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, color in (("wanda", "tab:blue"), ("sparsegpt", "tab:orange")):
        for objective, marker, ls in (("nm", "o", "-"), ("entropy", "s", "--")):
            for scores in IMPORTANCE:
                own = scores == method
                pts = sorted((r["steps"], r["perplexity"]) for r in report["runs"].values()
                             if r["method"] == method and r["blocks"] == 1 and not r.get("refit") and (
                                 r["objective"] == "none" or (
                                     r["objective"] == objective and r.get("importance", method) == scores)))
                if len(pts) > 1:
                    ax.plot(*zip(*pts), marker=marker, ls=ls if own else ":", color=color,
                            label=f"{method} 2:4, {objective}" + ("" if own else f" on {scores} scores"))
        for r in report["runs"].values():
            if r["method"] == method and r.get("refit"):  # a different pruner: its own markers, off the lines
                ax.plot(r["steps"], r["perplexity"], marker="*", ms=10, color=color, ls="none",
                        label=f"{method} 2:4, {r['objective']} + LS refit {r['refit']}")
            if r["method"] == method and r["blocks"] > 1:
                ax.plot(r["steps"], r["perplexity"], marker="^", color=color, ls="none",
                        label=f"{method} 2:4, {r['objective']}, {r['blocks']} blocks")
    ax.axhline(ppl["dense"], color="k", ls=":", lw=1, label=f"dense {ppl['dense']:.2f}")
    ax.set_xlabel("rotation steps per decoder layer (Adam)")
    finish_plot(fig, ax, report, path, f" {report['pattern']} + DenoiseRotator")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_arguments(p)
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS)
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens per CPU decode-speed sample (0: skip)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--refit", type=int, default=0, metavar="STEPS",
                   help="SparseGPT runs: re-solve the kept weights on the mask by this many CG steps (key /refitN)")
    p.add_argument("--out", default=str(RESULTS / "rotation_quality.json"))
    p.add_argument("--replot", action="store_true")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="fold the runs of these reports (same model and protocol) into --out, then replot")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.merge:
        merge_reports([json.loads(Path(f).read_text()) for f in args.merge], out)
        args.replot = True
    if args.replot:  # also (re)computes what follows from the shapes, for runs recorded before it was
        report = json.loads(out.read_text())
        from transformers import AutoConfig

        from sparse_runtime.models.sources import resolve

        config = AutoConfig.from_pretrained(resolve(report["model"]))
        for run in report["runs"].values():
            if run["objective"] != "none":
                scores = run.get("importance", run["method"])
                run["gflop_per_step"] = round(gflop_per_step(config, run["blocks"], scores), 2)
                run["gflop_per_s"] = round(run["gflop_per_step"] * run["steps_per_s"], 1)
        write_json(out, report)
        plot(report, out.with_suffix(".png"))
        return 0
    runs = [{**r, **({"refit": args.refit} if args.refit and r["method"] == "sparsegpt" else {})}
            for r in map(parse_run, args.runs)]
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    calib = calibration(args, model, tok)
    text = Path(args.eval_data).read_text(encoding="utf-8")
    report = {
        "model": args.model, **metadata("cpu"), "pattern": "2:4", **protocol_report(args, calib, tok),
        "notes": "Rotated runs prune true-sequentially with fresh statistics after rotating each layer; unrotated "
                 "runs use each method's default (Wanda: not true-sequential, SparseGPT: true-sequential). "
                 "Perplexity of the pruned weights run densely. Adam lr 0.01, gradient clip 1.0, best iterate kept.",
        "perplexity": {}, "runs": {}, "decode": {}, "paper_reference": PAPER_REFERENCE,
    }

    def save():
        write_json(out, report)

    def evaluate(m):
        return perplexity(m, tok, text, seqlen=args.eval_seqlen, max_tokens=args.eval_tokens, progress=False,
                          bos=args.bos)

    res = evaluate(model)
    report["perplexity"]["dense"] = round(res.ppl, 3)
    report["eval"]["tokens"], report["eval"]["bos"] = res.tokens, res.bos
    save()
    print(f"dense {res}", flush=True)
    for run in runs:
        key = run_key(run)
        model, _ = load_model(args.model)  # rotation changes the model's structure: start from a fresh copy
        result = prune(model, run["method"], "2:4", calib=calib, device="cpu", progress=True,
                       rotate=None if run["objective"] == "none" else run["objective"],
                       rotate_steps=run["steps"], rotate_blocks=run["blocks"], rotate_importance=run["importance"],
                       **({"refit": run["refit"]} if run.get("refit") else {}))
        rot = result.rotation
        rot_seconds = sum(layer["seconds"] for layer in rot["layers"]) if rot else 0.0
        ppl = round(evaluate(model).ppl, 3)
        total_steps = run["steps"] * len(rot["layers"]) if rot else 0
        report["runs"][key] = {
            **run, "perplexity": ppl, "threads": args.threads, "seconds": round(result.seconds, 1),
            "rotation_seconds": round(rot_seconds, 1), "cpu": cpu_model(),
            "rotation_dtype": rot["layers"][0]["dtype"] if rot else None,
            "layer_rotation_seconds": [round(layer["seconds"], 1) for layer in rot["layers"]] if rot else None,
            "steps_per_s": round(total_steps / rot_seconds, 2) if rot_seconds else None,
            "objective_initial": round(sum(layer["initial"] for layer in rot["layers"]), 3) if rot else None,
            "objective_best": round(sum(layer["best"] for layer in rot["layers"]), 3) if rot else None,
        }
        if rot:
            flop = gflop_per_step(model.config, run["blocks"], run["importance"])
            report["runs"][key]["gflop_per_step"] = round(flop, 2)
            report["runs"][key]["gflop_per_s"] = round(report["runs"][key]["gflop_per_step"] *
                                                       report["runs"][key]["steps_per_s"], 1)
        report["perplexity"][key] = ppl
        print(f"{key:28s} ppl {ppl:.2f}  [{result.seconds:.0f} s, rotation {rot_seconds:.0f} s]", flush=True)
        if args.decode_tokens and key in ("sparsegpt/none", "sparsegpt/nm/b1/100"):
            sparsify(model, masks=result.masks, pattern="2:4", backend="decompressed", progress=False)
            report["decode"][key] = {"tokens_per_s": round(decode_tokens_per_s(model, tok, args.decode_tokens), 2),
                                     "new_tokens": args.decode_tokens, "backend": "decompressed", "batch": 1}
        save()
        del model
    if len(report["decode"]) == 2:
        a, b = report["decode"]["sparsegpt/none"], report["decode"]["sparsegpt/nm/b1/100"]
        report["decode"]["rotation_overhead_pct"] = round(100 * (a["tokens_per_s"] / b["tokens_per_s"] - 1), 1)
    save()
    plot(report, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
