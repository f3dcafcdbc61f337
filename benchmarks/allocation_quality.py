"""Layer-wise sparsity allocation quality: WikiText-2 perplexity of a model (default SmolLM2-135M) pruned
unstructured with Wanda / SparseGPT under uniform, OWL, AlphaPruning and ATP (beta searched on held-out C4),
and deployment plans (which linears run 2:4) against naive plans at equal predicted decode speedup.
Writes benchmarks/results/allocation_quality.json after every row, and PNGs beside it.

    python -m benchmarks.allocation_quality --threads 1                       # the full protocol grid
    python -m benchmarks.allocation_quality --sparsities 0.7 --methods wanda --allocations uniform atp \\
        --plans --label partial                                               # one cell, no plans

Protocol: calibration 32 x 512 tokens of the C4 sample (reference sampling, seed 0); ATP's beta is chosen on
``--val-windows`` windows of C4 documents disjoint from the calibration windows; perplexity on WikiText-2 raw
test, the first 40,960 tokens at seqlen 512. ``--merge`` keeps the rows of an existing ``--out``.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import time
from pathlib import Path

import torch

from sparse_runtime.data.calibration import validation_windows
from sparse_runtime.data.perplexity import perplexity
from sparse_runtime.models.architecture import find_decoder_layers
from sparse_runtime.models.sources import load_model
from sparse_runtime.prune import PruneConfig, prune
from sparse_runtime.prune.allocation import ALPHA_EPS, Allocation, AllocationError, allocate, plot_rates
from sparse_runtime.prune.atp_search import STATISTICS, search_beta
from sparse_runtime.prune.plan import linear_costs, naive, search_depth_weight

from .common import RESULTS, add_protocol_arguments, calibration, metadata, protocol_report, write_json

ALLOCATIONS = ("uniform", "owl", "alphapruning", "atp")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_arguments(p)
    p.add_argument("--val-windows", type=int, default=16, help="held-out C4 windows (of --seqlen) the beta search scores")
    p.add_argument("--beta-step", type=float, default=0.002, help="ATP beta grid step (the paper's 0.002)")
    p.add_argument("--beta-patience", type=int, default=None, help="stop the beta search after this many worse betas")
    p.add_argument("--beta-statistics", choices=STATISTICS, default="dense",
                   help="beta-search trials on the dense model's statistics (fast) or pruned layer by layer")
    p.add_argument("--sparsities", nargs="*", type=float, default=[0.5, 0.6, 0.7, 0.8],
                   help="mean unstructured sparsities of the allocation rows (none: only the plans)")
    p.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    p.add_argument("--allocations", nargs="+", default=list(ALLOCATIONS), choices=ALLOCATIONS)
    p.add_argument("--plans", nargs="*", type=float, default=[0.75, 0.9],
                   help="target fractions of linear weights at 2:4 for the deployment plans (none: skip)")
    p.add_argument("--plan-method", default="wanda")
    p.add_argument("--random-seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--label", default="", help="a note stored with the run (e.g. 'partial')")
    p.add_argument("--merge", action="store_true", help="keep the rows already in --out")
    p.add_argument("--out", default=str(RESULTS / "allocation_quality.json"))
    p.add_argument("--replot", action="store_true", help="only redraw the PNGs from --out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.replot:
        plot(json.loads(out.read_text()), out)
        return 0

    model, tok = load_model(args.model, device=args.device)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    used: set[int] = set()
    calib = calibration(args, model, tok, used=used)
    val = validation_windows(tok, args.calib, args.val_windows, calib.shape[1], exclude=used, bos=args.bos)
    text = Path(args.eval_data).read_text(encoding="utf-8")
    report = {
        "model": args.model, **metadata(args.device), "label": args.label,
        "blocks": len(find_decoder_layers(model)[0]), **protocol_report(args, calib, tok),
        "validation": {"file": Path(args.calib).name, "windows": val.shape[0], "seqlen": val.shape[1],
                       "documents": f"in file order, skipping the {len(used)} calibration documents"},
        "notes": "unstructured sparsity, Wanda per output row, SparseGPT adaptive per 128-column block; pruned "
                 "weights run densely. OWL lambda 0.08, M 5; AlphaPruning eps 0.2 (lowered by 0.02 steps where a "
                 "block would reach 1, the row says eps); ATP beta on the paper's 0.002 grid, scored on held-out C4 "
                 "(never on WikiText-2). Plans: 2:4 Wanda for the chosen linears (the depth weight of the "
                 "error_depth plan searched on the held-out C4 windows, each candidate pruned from dense "
                 "statistics), "
                 "the rest dense; predicted decode speedup from the byte model (2:4 = 9/16 of dense bytes).",
        "dense": None, "rows": {}, "plans": {},
    }

    own = {"rows": {}, "plans": {}}  # what this run measured; with --merge, other rows on disk are kept

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.with_suffix(".lock"), "w") as lock:  # runs of disjoint cells may share one --out
            fcntl.flock(lock, fcntl.LOCK_EX)
            disk = json.loads(out.read_text()) if args.merge and out.is_file() else {}
            for key in own:
                report[key] = {**disk.get(key, {}), **own[key]}
            write_json(out, report)

    def evaluate():
        res = perplexity(model, tok, text, seqlen=args.eval_seqlen, max_tokens=args.eval_tokens, progress=False,
                         bos=args.bos)
        report["eval"]["tokens"], report["eval"]["bos"] = res.tokens, res.bos
        return round(res.ppl, 3)

    report["dense"] = evaluate()
    save()
    print(f"dense: {report['dense']}", flush=True)
    for sparsity in args.sparsities:
        for method in args.methods:
            for strategy in args.allocations:
                model.load_state_dict(original)
                t0 = time.perf_counter()
                row = {}
                if strategy == "atp":
                    search = search_beta(model, PruneConfig(method, "unstructured", sparsity, device=args.device,
                                                            progress=False), calib, val,
                                         step=args.beta_step, patience=args.beta_patience,
                                         statistics=args.beta_statistics,
                                         log=lambda m: print(f"{method} {sparsity:g} {m}", flush=True))
                    alloc = search.allocation
                    row |= {"beta": alloc.params["beta"], "trials": len(search.trials), "statistics": search.statistics,
                            "search_seconds": round(search.seconds, 1), "search": search.trials}
                else:
                    alloc = _allocate(model, strategy, sparsity, calib, args.device)
                    res = prune(model, method, "unstructured", sparsity, calib=calib, allocation=alloc,
                                device=args.device, progress=False)
                if "eps" in alloc.params:
                    row["eps"] = alloc.params["eps"]
                row |= {"ppl": evaluate(), "seconds": round(time.perf_counter() - t0, 1),
                        "rates": [round(r, 5) for r in alloc.rates], "mean_sparsity": round(alloc.mean(), 6)}
                own["rows"][f"{method}/{sparsity:g}/{strategy}"] = row
                save()
                print(f"{method} {sparsity:g} {strategy}: {row['ppl']} ({row['seconds']:.0f} s)", flush=True)
    if args.plans:
        model.load_state_dict(original)
        res = prune(model, args.plan_method, "2:4", calib=calib, device=args.device, record_errors=True,
                    progress=False)
        costs, other = linear_costs(model, res.errors)
        own["plans"]["all"] = _plan_row(naive(costs, "all", other=other), evaluate())
        save()
        for fraction in args.plans:
            model.load_state_dict(original)
            plan = search_depth_weight(model, costs, calib, val, fraction=fraction, other=other,
                                       method=args.plan_method, device=args.device,
                                       log=lambda m: print(f"plan {fraction:g} {m}", flush=True))
            # the naive plans get at most this plan's predicted speedup (within one linear): a lower
            # perplexity then means a better plan at no lower speedup
            rivals = [plan, naive(costs, "first_dense", speedup=plan.speedup, other=other, not_above=True)]
            rivals += [naive(costs, "random", speedup=plan.speedup, other=other, seed=s, not_above=True)
                       for s in args.random_seeds]
            for pl in rivals:
                model.load_state_dict(original)
                prune(model, args.plan_method, "2:4", calib=calib, targets=pl.sparse, device=args.device,
                      progress=False)
                key = f"{fraction:g}/{pl.strategy}" + (f"/{pl.info['seed']}" if pl.strategy == "random" else "")
                own["plans"][key] = _plan_row(pl, evaluate()) | (
                    {"depth_weight": pl.info["depth_weight"], "search": pl.info["search"]["trials"]}
                    if pl.strategy == "error_depth" else {})
                save()
                print(f"plan {key}: {own['plans'][key]}", flush=True)
    model.load_state_dict(original)
    save()
    plot(report, out)
    return 0


def _allocate(model, strategy, sparsity, calib, device) -> Allocation:
    """The strategy's default spread, or for AlphaPruning near the limit (80%: 0.8 x 1.2 > 1 after rescaling)
    the largest eps on a 0.02 grid below it that keeps every block's rate legal (the row records it as eps)."""
    eps = ALPHA_EPS
    while True:
        try:
            return allocate(model, strategy, sparsity, calib=calib, device=device,
                            **({"eps": eps} if strategy == "alphapruning" else {}))
        except AllocationError:
            if strategy != "alphapruning" or eps <= 0.02 + 1e-9:
                raise
            eps = round(eps - 0.02, 4)


def _plan_row(plan, ppl) -> dict:
    return {"ppl": ppl, "predicted_speedup": round(plan.speedup, 4), "fraction_24": round(plan.fraction, 4),
            "linears_24": len(plan.sparse), "linears_dense": len(plan.dense)}


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stamp = f"{report['model']}, {report['device']}, {report['date'][:10]}" + (
        f" ({report['label']})" if report.get("label") else "")
    rows = report["rows"]
    if rows:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for method in sorted({k.split("/")[0] for k in rows}):
            for strategy in ALLOCATIONS:
                pts = sorted((float(k.split("/")[1]), v["ppl"]) for k, v in rows.items()
                             if k.startswith(method + "/") and k.endswith("/" + strategy))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{method} {strategy}")
        ax.axhline(report["dense"], color="k", ls="--", lw=1, label=f"dense {report['dense']:.1f}")
        ax.set_yscale("log")
        ax.set_xlabel("mean unstructured sparsity")
        ax.set_ylabel(f"WikiText-2 perplexity (seqlen {report['eval']['seqlen']}, log)")
        ax.set_title(stamp, fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
        plt.close(fig)
        sample = max(rows, key=lambda k: (k.split("/")[1] == "0.7", k))  # the 70% rates, else any
        method, s = sample.split("/")[:2]
        chosen = [(k.split("/")[2], v) for k, v in rows.items() if k.startswith(f"{method}/{s}/")]
        allocs = [Allocation(name, float(s), v["rates"], params={"beta": v["beta"]} if "beta" in v else {})
                  for name, v in chosen]
        plot_rates(allocs, out.with_name(out.stem + "_rates.png"), title=f"{method} at {s}: {stamp}")
    plans = report["plans"]
    if plans:
        fig, ax = plt.subplots(figsize=(6, 4))
        for strategy, marker in (("error_depth", "o"), ("first_dense", "s"), ("random", "x"), ("all", "^")):
            pts = [(v["predicted_speedup"], v["ppl"]) for k, v in plans.items()
                   if (k.split("/")[1] if "/" in k else k) == strategy]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, label=strategy)
        ax.set_yscale("log")
        ax.set_xlabel("predicted decode speedup (byte model)")
        ax.set_ylabel("WikiText-2 perplexity (log)")
        ax.set_title(f"2:4 vs dense per linear: {stamp}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out.with_name(out.stem + "_plans.png"), dpi=120)
        plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
