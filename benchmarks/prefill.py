"""Prefill GEMMs at Llama-3-8B shapes: dense cuBLAS vs PyTorch's cuSPARSELt path vs ours vs dispatch.

    python -m benchmarks.prefill [--dtype float16] [--m 512 2048 8192] [--shapes 4096x4096,...] [--out DIR]

GPU time: after warm-up (plans built, algorithms searched), 50 calls back to back between two CUDA events,
no synchronisation between calls (the median of 3 such batches, per call; at these sizes the device, not the
host, sets the pace). Host
overhead is the CPU time of one call after warm-up (``cusparselt_call_host_us``: the extension call alone,
the issue's < 10 us target; ``*_host_us``: the whole SparseLinear forward), measured over a burst of calls that stays well under
the launch-queue depth, so the GPU never stalls the host. Writes ``prefill-<gpu>-<date>.json`` and a PNG
of the speedups over dense under ``--out``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from .common import RESULTS, metadata, write_json
from .kernels import parse_shapes

HELP = "prefill GEMMs at Llama-3-8B shapes: dense cuBLAS vs PyTorch's cuSPARSELt vs ours vs dispatch"
SHAPES = {"q/o 4096x4096": (4096, 4096), "gate/up 14336x4096": (14336, 4096), "down 4096x14336": (4096, 14336)}
COLUMNS = ("dense", "torch", "cusparselt", "dispatch")


def host_us(fn, calls: int = 50, repeats: int = 7) -> float:
    import torch

    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def runners(n: int, k: int, dtype) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from sparse_runtime import BackendUnavailable, SparseLinear

    torch.manual_seed(0)
    base = nn.Linear(k, n, bias=False, device="cuda", dtype=dtype)
    out = {}
    for name in COLUMNS[1:]:
        try:
            out[name] = SparseLinear.from_linear(base, backend=name)
        except BackendUnavailable as e:
            print(f"  {name}: skipped ({e})", file=sys.stderr)
    w = next(iter(out.values())).dense_weight() if out else base.weight.detach()
    out = {"dense": lambda x: F.linear(x, w), **out}
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--m", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES.values()),
                   help="comma-separated NxK (out x in features); default: the Llama-3-8B ones above")
    p.add_argument("--out", type=Path, default=RESULTS)


def run(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print("bench prefill: needs a CUDA GPU (none found); nothing was measured", file=sys.stderr)
        return 2

    from sparse_runtime.ops.timing import time_us

    try:
        shapes = parse_shapes(args.shapes)
    except ValueError as e:
        print(f"bench prefill: {e}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    gpu = torch.cuda.get_device_name()
    meta = {**metadata("cuda"), "dtype": args.dtype,
            "timer": "time_us: 3 batches of 50 back-to-back calls between two CUDA events, median per call"}
    stamp = meta["date"][:19].replace("-", "").replace(":", "")
    base = args.out / f"prefill-{gpu.replace(' ', '_')}-{stamp}"
    labels = {shape: label for label, shape in SHAPES.items()}
    rows = []
    for n, k in shapes:
        label = labels.get((n, k), f"{n}x{k}")
        run = runners(n, k, dtype)
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            row = {"shape": label, "n": n, "k": k, "m": m}
            for name, fn in run.items():
                fn(x)  # warm-up: plans, searches, dispatch measurements
                row[f"{name}_us"] = round(time_us(lambda f=fn, x=x: f(x), warmup=5, iters=50), 2)
                row[f"{name}_host_us"] = round(host_us(lambda f=fn, x=x: f(x)), 2)
            if "cusparselt" in run:  # the extension call alone, without SparseLinear's Python around it
                from sparse_runtime.ops import cusparselt

                w = run["cusparselt"]._resolve()[1]
                row["cusparselt_call_host_us"] = round(host_us(lambda x=x: cusparselt.linear(x, w)), 2)
            for name in COLUMNS[1:]:
                if f"{name}_us" in row:
                    row[f"{name}_speedup"] = round(row["dense_us"] / row[f"{name}_us"], 3)
            rows.append(row)
            print(" ".join(f"{key}={val}" for key, val in row.items()), flush=True)
            write_json(base.with_suffix(".json"), {**meta, "rows": rows}, indent=1)  # a cut-off run keeps its rows
    plot(rows, f"{gpu}, {args.dtype}, {meta['date'][:10]}", base.with_suffix(".png"))
    print(f"wrote {base}.json and {base}.png")
    return 0


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c for c in COLUMNS[1:] if any(f"{c}_speedup" in r for r in rows)]
    labels = [f"{r['shape']}\nM={r['m']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.9), 4.5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(rows))], [r.get(f"{name}_speedup", 0) for r in rows], width,
               label=name)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(rows))], labels, fontsize=7)
    ax.set_ylabel("speedup over dense cuBLAS")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=HELP)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
