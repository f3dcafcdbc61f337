"""Time 2:4 sparse matmuls against dense cuBLAS over Llama-3-8B linear shapes.

    python -m benchmarks.kernels [--shapes 4096x4096,...] [--ms 1,16] [--dtypes fp16] [--providers dense,triton]
    sparse-runtime bench kernels ...   (the same)

Providers: ``dense`` (``F.linear``, cuBLAS), every ``SparseLinear`` backend
available on the device (found through ``sparse_runtime.backends``, so new
backends appear as columns with no edit here), and the Triton rotation variants:
``triton:fused-rot-b128`` / ``triton:rot-b128-first`` (block-diagonal R, b=128,
fused into the prologue vs ``x @ R`` then the kernel) and the same for a full R.

Each timing is one CUDA graph of a pass over enough copies of weights and inputs
(and rotations) to exceed three L2 sizes, replayed between two CUDA events
(``sparse_runtime.ops.timing.cycle_time_us``, median of the replays, per call): each
call finds its weight out of L2, and no flush leaves dirty lines for it to write
back. A provider that cannot be captured is timed the same way eagerly (``timer``
in its row says which). Bytes count weight values + meta (or the dense
weight) + R + X + Y; GB/s is compared with a measured device-to-device copy.
Results go to ``benchmarks/results/`` as JSON (device, versions, settings,
rows) and a PNG of speedup over dense vs M per shape.

Heavy imports (torch, triton) happen inside functions: the CLI loads this
module to build its parser.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from . import cpu_kernels
from .common import RESULTS, metadata, parse_ints, parse_shapes, write_json

HELP = "time sparse matmul backends against dense cuBLAS over Llama-3-8B shapes (needs CUDA)"
DEFAULT_MS = (1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 8192)
LLAMA3_8B = {(4096, 4096): "q/o_proj", (1024, 4096): "k/v_proj", (14336, 4096): "gate/up_proj",
             (4096, 14336): "down_proj"}
DTYPES = ("fp16", "bf16")
ELEM_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
# name -> (rotation block size or None for a full R, fused into the kernel?)
ROTATION_PROVIDERS = {
    "triton:fused-rot-b128": (128, True),
    "triton:rot-b128-first": (128, False),
    "triton:fused-rot-full": (None, True),
    "triton:rot-full-first": (None, False),
}
# The fused full-R prologue re-reads R per program: beyond decode it runs for minutes.
FUSED_FULL_MAX_M = 16


# -- pure logic (unit-tested on the CPU) --------------------------------------------------------------------
def parse_choices(text: str, allowed, name: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"{name}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return values


def select_providers(availability: dict[str, str | None], wanted: list[str] | None = None) -> list[str]:
    """Providers to time: dense, available backends (not ``reference``/``decompressed``, which are dense
    matmuls), Triton rotation variants."""
    backends = [name for name, why in availability.items()
                if why is None and name not in ("reference", "decompressed")]
    known = ["dense", *backends, *(ROTATION_PROVIDERS if "triton" in backends else ())]
    if wanted is None:
        return known
    everything = ["dense", *availability, *ROTATION_PROVIDERS]
    unknown = [p for p in wanted if p not in everything]
    if unknown:
        raise ValueError(f"--providers: unknown {', '.join(unknown)}; known: {', '.join(everything)}")
    missing = [p for p in wanted if p not in known]
    if missing:
        why = "; ".join(f"{p}: {availability.get(p) or 'needs the triton backend'}" for p in missing)
        raise ValueError(f"--providers: not available on this device ({why})")
    return wanted


def weight_bytes(provider: str, n: int, k: int, elem: int) -> int:
    if provider == "dense":
        return n * k * elem
    return n * k // 2 * elem + n * math.ceil(k / 8)  # 2:4 values + 2-bit meta


def rotation_bytes(provider: str, k: int, elem: int) -> int:
    if provider not in ROTATION_PROVIDERS:
        return 0
    block = ROTATION_PROVIDERS[provider][0] or k
    return k * block * elem


def call_bytes(provider: str, m: int, n: int, k: int, elem: int) -> int:
    """Bytes one call must move at least: weight (+ meta, + R) + X + Y."""
    return weight_bytes(provider, n, k, elem) + rotation_bytes(provider, k, elem) + (m * k + m * n) * elem


def call_flops(m: int, n: int, k: int) -> int:
    """Dense-equivalent FLOPs (2MNK), so TFLOP/s compares across providers."""
    return 2 * m * n * k


def copies_needed(bytes_per_copy: int, l2_bytes: int, cap: int = 64) -> int:
    """Copies to cycle through so that a pass over them exceeds three L2 sizes."""
    return max(1, min(cap, math.ceil(3 * l2_bytes / max(bytes_per_copy, 1))))


def make_row(provider, shape, dtype, m, ms, dense_ms, copy_gbps) -> dict:
    n, k = shape
    nbytes = call_bytes(provider, m, n, k, ELEM_BYTES[dtype])
    gbps = nbytes / (ms * 1e-3) / 1e9
    return {
        "provider": provider, "N": n, "K": k, "layer": LLAMA3_8B.get(shape, ""), "dtype": dtype, "M": m,
        "ms": ms, "speedup_vs_dense": dense_ms / ms if dense_ms else None,
        "bytes": nbytes, "GBps": gbps, "pct_copy_bw": 100 * gbps / copy_gbps if copy_gbps else None,
        "TFLOPs": call_flops(m, n, k) / (ms * 1e-3) / 1e12,
    }


def plot(path: Path, rows: list[dict], title: str = "") -> Path:
    """Speedup over dense vs M, one panel per (shape, dtype), one line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["N"], r["K"], r["dtype"]) for r in rows})
    cols = min(4, len(panels)) or 1
    nrows = math.ceil(len(panels) / cols) or 1
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.6 * nrows), squeeze=False)
    for ax, (n, k, dtype) in zip(axes.flat, panels):
        sel = [r for r in rows if (r["N"], r["K"], r["dtype"]) == (n, k, dtype) and r["provider"] != "dense"]
        for provider in sorted({r["provider"] for r in sel}):
            pts = sorted((r["M"], r["speedup_vs_dense"]) for r in sel if r["provider"] == provider and r["speedup_vs_dense"])
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=provider)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.axhline(16 / 9, color="gray", lw=0.8, ls="--")  # bytes ceiling of the 2:4 format
        ax.set_xscale("log", base=2)
        ax.set_title(f"{n}x{k} {LLAMA3_8B.get((n, k), '')} {dtype}", fontsize=9)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("speedup over dense")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if panels:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(rows: list[dict]) -> str:
    lines = [f"{'provider':24s} {'shape':>11s} {'dtype':5s} {'M':>5s} {'us':>9s} {'x dense':>8s} {'GB/s':>8s} "
             f"{'%copy':>6s} {'TFLOP/s':>8s}"]
    for r in rows:
        sp = f"{r['speedup_vs_dense']:.2f}" if r["speedup_vs_dense"] else "-"
        pct = f"{r['pct_copy_bw']:.0f}" if r["pct_copy_bw"] else "-"
        lines.append(f"{r['provider']:24s} {r['N']:>5d}x{r['K']:<5d} {r['dtype']:5s} {r['M']:>5d} {r['ms'] * 1e3:>9.1f} "
                     f"{sp:>8s} {r['GBps']:>8.0f} {pct:>6s} {r['TFLOPs']:>8.1f}")
    return "\n".join(lines)


# -- GPU side --------------------------------------------------------------------------------------------
def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (read + write bytes): back-to-back copies between two CUDA events."""
    import torch

    from sparse_runtime.ops.timing import time_us

    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = time_us(lambda: dst.copy_(src), warmup=2, iters=10, repeats=3) / 1000.0
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _layer_fns(provider, weights, xs, rotations):
    """One zero-argument callable per (weight copy, input copy)."""
    import torch.nn.functional as F

    from sparse_runtime import SparseLinear
    from sparse_runtime.ops import triton_ops
    from sparse_runtime.format.rotation import apply_rotation

    if provider == "dense":
        dense = [sw.to_dense() for sw in weights]
        return [lambda w=w, x=x: F.linear(x, w) for w, x in zip(dense, xs)]
    backend = "triton" if provider in ROTATION_PROVIDERS else provider
    layers = [SparseLinear.from_sparse_weight(sw, backend=backend) for sw in weights]
    if provider not in ROTATION_PROVIDERS:
        return [lambda l=l, x=x: l(x) for l, x in zip(layers, xs)]
    block, fused = ROTATION_PROVIDERS[provider]
    if fused:  # prepared layers own their split-K counters (M <= 16 splits K), so the pass can be captured
        prepared = [triton_ops.Sparse24Layer(sw.values, sw.meta) for sw in weights]
        return [lambda p=p, r=r, x=x: p(x, rotation=r) for p, r, x in zip(prepared, rotations, xs)]
    return [lambda l=l, r=r, x=x: l(apply_rotation(x, r)) for l, r, x in zip(layers, rotations, xs)]


def bench_shape(shape, dtype_name, ms_list, providers, copy_gbps, l2_bytes, log=print) -> list[dict]:
    import torch

    from sparse_runtime.format.codec import SparseWeight
    from sparse_runtime.format.masks import nm_mask

    from sparse_runtime.ops.timing import cycle_time_us

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    n, k = shape
    elem = ELEM_BYTES[dtype_name]
    n_copies = copies_needed(weight_bytes("triton", n, k, elem), l2_bytes)
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = []
    for _ in range(n_copies):
        w = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen)
        weights.append(SparseWeight.compress(w, nm_mask(w.abs())))
    rot_sets = {}
    for provider in set(providers) & set(ROTATION_PROVIDERS):
        block = ROTATION_PROVIDERS[provider][0]
        if block in rot_sets or (block and k % block):
            continue
        b = block or k
        q = torch.linalg.qr(torch.randn(k // b, b, b, device="cuda", generator=gen))[0].to(dtype)
        rot_sets[block] = [(q if block else q[0]).clone() for _ in range(n_copies)]  # one per copy, as per layer
    from sparse_runtime import backends

    max_m = {p: backends.get(p).capabilities.max_m for p in providers
             if p in backends.names() and backends.get(p).capabilities.max_m}
    rows = []
    log(format_table([]))
    for m in ms_list:
        copies = n_copies  # sized on the smallest weight (2:4), so every provider's pass exceeds 3x L2
        xs = [torch.randn(m, k, device="cuda", dtype=dtype, generator=gen) for _ in range(copies)]
        times, timers = {}, {}
        for provider in providers:
            if provider == "triton:fused-rot-full" and m > FUSED_FULL_MAX_M:
                continue
            if m > max_m.get(provider, m):  # a decode-only backend (mmasp: M <= 16)
                continue
            rots = [None] * copies
            if provider in ROTATION_PROVIDERS:
                block = ROTATION_PROVIDERS[provider][0]
                if block not in rot_sets:
                    log(f"  {provider}: skipped, K={k} is not a multiple of the block {block}")
                    continue
                rots = rot_sets[block][:copies]
            try:
                fns = _layer_fns(provider, weights[:copies], xs, rots)
                for f in fns:  # one eager call per layer at this M before any capture: Triton compiles and
                    f()  # autotunes, cuSPARSELt searches, the dispatcher measures (all fail inside a capture)
                try:
                    times[provider], timers[provider] = cycle_time_us(fns), "graph"
                except Exception as e:  # noqa: BLE001 -- will not capture: time the same pass eagerly
                    log(f"  {provider}: not capturable ({type(e).__name__}), timed eagerly")
                    times[provider], timers[provider] = cycle_time_us(fns, graph=False), "eager"
                times[provider] /= 1000.0  # ms, as the rows hold
            except Exception as e:  # one failing provider must not end the sweep
                log(f"  {provider} {n}x{k} {dtype_name} M={m}: failed: {type(e).__name__}: {e}")
            finally:
                fns = None
                torch.cuda.empty_cache()
        dense_ms = times.get("dense")
        for provider, t in times.items():
            rows.append({**make_row(provider, shape, dtype_name, m, t, dense_ms, copy_gbps), "timer": timers[provider]})
        if times:
            log(format_table(rows[-len(times):]).split("\n", 1)[-1])
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in LLAMA3_8B),
                   help="comma-separated NxK (out x in features); default: Llama-3-8B linears")
    p.add_argument("--ms", default=",".join(map(str, DEFAULT_MS)), help="comma-separated M (tokens) to sweep")
    p.add_argument("--dtypes", default=None, help="fp16, bf16 or both (default fp16); on a machine without a GPU the "
                   "CPU kernels' fp32, bf16 or both (default fp32; benchmarks.cpu_kernels)")
    p.add_argument("--providers", default=None,
                   help="comma-separated subset of: dense, any available backend, " + ", ".join(ROTATION_PROVIDERS))
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and PNG (default benchmarks/results)")


def run(args) -> int:
    import torch

    gpu = torch.cuda.is_available()
    try:
        shapes = parse_shapes(args.shapes, k_multiple=4 if gpu else 8)  # the CPU kernels take whole meta bytes
        ms_list = parse_ints(args.ms)
        allowed = DTYPES if gpu else tuple(cpu_kernels.DTYPES)
        dtypes = parse_choices(args.dtypes or allowed[0], allowed, "--dtypes")
    except ValueError as e:
        print(f"bench kernels: {e}", file=sys.stderr)
        return 2
    if not gpu:  # the same sweep on the CPU kernels, against the CPU's dense paths
        print("bench kernels: no CUDA GPU here; timing the CPU kernels (benchmarks.cpu_kernels)", file=sys.stderr)
        for dtype in dtypes:
            cpu_kernels.measure(shapes, ms_list, dtype, out=args.out / f"cpu_kernels_{dtype}.json")
        return 0
    import triton

    from sparse_runtime import backends
    from sparse_runtime.ops.triton_plan import CONFIGS_ENV

    try:
        wanted = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
        providers = select_providers(backends.availability("cuda"), wanted)
    except ValueError as e:
        print(f"bench kernels: {e}", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    copy_gbps = copy_bandwidth_gbps()
    l2_bytes = getattr(props, "L2_cache_size", 50 << 20)
    print(f"{props.name}: copy bandwidth {copy_gbps:.0f} GB/s, L2 {l2_bytes >> 20} MiB; providers: {', '.join(providers)}")
    meta = {
        **metadata("cuda"), "cuda": torch.version.cuda, "copy_bandwidth_GBps": copy_gbps,
        "l2_bytes": l2_bytes, "timer": "timing.cycle_time_us: CUDA graph of a pass over copies > 3x L2, no flush, "
                                       "median of replays per call",
        "triton_configs": os.environ.get(CONFIGS_ENV) or "full",  # pinned: one config per schedule, no autotuning
        "settings": {"shapes": shapes, "ms": ms_list, "dtypes": dtypes, "providers": providers},
    }
    stem = f"kernels-{props.name.replace(' ', '_')}-{meta['date'][:19].replace('-', '').replace(':', '')}"
    rows = []
    for dtype in dtypes:
        for shape in shapes:
            rows += bench_shape(shape, dtype, ms_list, providers, copy_gbps, l2_bytes)
            write_json(args.out / f"{stem}.json", {**meta, "rows": rows}, indent=1)  # a cut-off run keeps its rows
    print(f"wrote {args.out / f'{stem}.json'}")
    print(f"wrote {plot(args.out / f'{stem}.png', rows, f'{props.name}, torch {torch.__version__}, triton {triton.__version__}')}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=HELP)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
