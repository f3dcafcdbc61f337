"""2:4 against dense linears on the CPU, per layer: ``SparseLinear`` on the ``cpu`` backend (the kernels of
``sparse_runtime.ops.cpu24``, what ``auto`` runs on a CPU) against the dense paths a user has (torch's ``F.linear`` on MKL/oneDNN, and the inductor-compiled frozen linear the engine uses).

What it counts first: a decode call reads the weight once, so it is bound by memory bandwidth. Dense fp32 reads
4 bytes per weight; 2:4 reads half the values plus 2 bits per kept value, 17/32 of that, so the bound on the
speedup is 32/17 = 1.88x. Every timed pass runs a stack of distinct layers whose bytes exceed the last-level
cache several times (the CPUs these runs see range from 32 MiB to 480 MiB of L3), as a model's decode step does,
so the numbers are memory numbers, not cache numbers; the machine's read bandwidth is read between the timed
passes with the same threads (:class:`BandwidthProbe`), and each row reports the bytes it read per second against
the bandwidth of its own passes.

Quantized values (``--quant int8,int4``) add the 2:4 kernel on int8 codes (``cpu24-int8``, per-row scales) and
int4 codes (``cpu24-int4``, groups of 128 columns, or the largest of 64/32 that divides K), and two dense int8
baselines (int8 [N, K], per-row scales): torch's weight-only int8 kernel ``torch._weight_int8pack_mm``
(``dense-int8``) and the engine's compiled dense int8 path (``compiled-int8``: ``nn.int8_dense.int8_matmul`` under
``torch.compile``, a broadcast-multiply-sum inductor fuses into one pass over the codes), at decode sizes (M <= 16);
at the ``--compiled`` M the 2:4 int8 layers run compiled too (``compiled-cpu24-int8``: the registered cpu24 op
inside the graph, as in the engine), each compiled stack one graph, so neither pays Python per layer. Their bytes are
the codes, the 2:4 indices and the scales.

    python -m benchmarks.cpu_kernels                       # SmolLM2-135M and Llama-3-8B shapes, fp32
    python -m benchmarks.cpu_kernels --shapes 4096x4096 --ms 1,8 --compiled none
    python -m benchmarks.cpu_kernels --quant int8,int4 --compiled none
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

from .common import RESULTS, metadata, parse_ints, parse_shapes, write_json

HELP = "2:4 CPU kernels vs dense F.linear and the inductor-compiled linear, per layer over M (CPU)"
SMOLLM2 = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # q/o, k/v, gate/up, down (N x K)
LLAMA3_8B = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
DEFAULT_MS = (1, 2, 4, 8, 16, 64, 512)
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
QUANT = ("int8", "int4")  # --quant: the 2:4 kernel's provider "cpu24-<scheme>" each, and "dense-int8" with them
INT4_GROUPS = (128, 64, 32)  # the first that divides K (whole SIMD steps: the kernels' fast path)


def llc_bytes() -> int:
    """The last-level cache of this CPU (sysfs), 32 MiB where it cannot be read."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    best = 0
    for index in base.glob("index*"):
        try:
            size = (index / "size").read_text().strip()
            level = int((index / "level").read_text())
        except (OSError, ValueError):
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1], 1)
        if level >= 2:
            best = max(best, int(size.rstrip("KMG")) * scale)
    return best or 32 << 20


def int4_group(k: int) -> int | None:
    """The int4 group size a shape runs: the first of :data:`INT4_GROUPS` that divides K (None: none does)."""
    return next((g for g in INT4_GROUPS if k % g == 0), None)


def weight_bytes(provider: str, n: int, k: int, elem: int) -> int:
    """Bytes of the weight one call reads: dense N*K elements (``dense-int8``: N*K int8 codes and N scales); 2:4
    N*K/2 values and N*K/8 bytes of indices, its quantized providers their codes (int8 N*K/2 bytes, int4 N*K/4)
    instead of the values plus their scales (N per row, N*K/group for int4), in the compute dtype."""
    if provider in ("dense", "compiled"):
        return n * k * elem
    if provider in ("dense-int8", "compiled-int8"):
        return n * k + n * elem
    meta = n * (k // 8)
    if provider == "cpu24":
        return n * (k // 2) * elem + meta
    if provider in ("cpu24-int8", "compiled-cpu24-int8"):
        return n * (k // 2) + meta + n * elem
    if provider == "cpu24-int4":
        return n * (k // 4) + meta + n * (k // int4_group(k)) * elem
    raise ValueError(f"unknown provider {provider!r}")


def call_bytes(provider: str, m: int, n: int, k: int, elem: int) -> int:
    """Everything one call moves: the weight, x read, y written, the bias."""
    return weight_bytes(provider, n, k, elem) + (m * k + m * n + n) * elem


def stack_size(layer_bytes: int, llc: int, budget: int) -> int:
    """Distinct layers per timed pass: at least 4x the last-level cache, at least 2, within ``budget`` bytes (at
    most 2048: a tiny layer measures the Python around a call anyway)."""
    return max(2, min(math.ceil(4 * llc / layer_bytes), budget // layer_bytes, 2048))


class BandwidthProbe:
    """The machine's read bandwidth with torch's threads: full reads of a buffer of 4x the last-level cache (at
    least 256 MiB), by the faster of torch's sum and the kernels' own vector loads (``cpu24.read_bandwidth_probe``).

    A shared VM's bandwidth moves between processes and within one (29 to 47 GB/s here), so a share of a figure
    measured minutes earlier says more about the neighbours than about the kernel: :func:`time_pass` interleaves
    reads of this buffer with the kernel's passes, and each row is set against the bandwidth of its own passes."""

    def __init__(self, llc: int, repeats: int = 7):
        import torch

        from sparse_runtime.ops import cpu24

        self.buffer = torch.ones(max(4 * llc, 256 << 20) // 4)
        self.nbytes = self.buffer.numel() * 4
        reads = (self.buffer.sum, lambda: cpu24.read_bandwidth_probe(self.buffer))
        for read in reads:
            read()  # warm-up
        seconds = [statistics.median(_seconds(read) for _ in range(repeats)) for read in reads]
        self.read = reads[seconds.index(min(seconds))]
        self.gbps = self.nbytes / min(seconds) / 1e9


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_pass(calls, probe: BandwidthProbe, min_seconds: float = 0.3, min_passes: int = 5, probes: int = 7):
    """Median seconds of one pass over ``calls`` (one warm-up pass first), and the read bandwidth (GB/s) of
    ``probe`` read between the first ``probes`` passes."""
    def one_pass():
        for c in calls:
            c()
    one_pass()
    times, reads, start = [], [], time.perf_counter()
    while len(times) < min_passes or time.perf_counter() - start < min_seconds:
        times.append(_seconds(one_pass))
        if len(reads) < probes:
            reads.append(_seconds(probe.read))
    return statistics.median(times), probe.nbytes / statistics.median(reads) / 1e9


DENSE_INT8, SPARSE_INT8 = ("dense-int8", "compiled-int8"), ("cpu24-int8", "compiled-cpu24-int8")


def fastest(times: dict, providers) -> float:
    """The least of ``times`` (provider -> seconds) among ``providers``."""
    return min(t for p, t in times.items() if p in providers)


def compiled(fn, settings: dict | None = None):
    """``fn`` (x -> the outputs of a whole stack) as one graph, compiled under the inductor ``settings`` (default:
    the engine's, ``Engine(compile=True)``: a dense int8 layer becomes one fused pass over its codes, a 2:4 layer a
    call of the registered cpu24 op)."""
    import torch

    torch._dynamo.reset()  # each stack is a new graph: dynamo's recompile limit would fall back to eager
    graph = torch.compile(fn, dynamic=False)

    def call(x):
        with torch._inductor.config.patch(settings or {}), torch.no_grad():
            return graph(x)
    return call


def compiled_stack(dense):
    """The engine's compiled CPU path over a whole stack of dense linears, one graph: inductor with frozen
    weights and its C++ GEMM template (``serving.engine.CPU_COMPILE["max-autotune"]``), the fastest dense path."""
    import torch.nn.functional as F

    from sparse_runtime.serving.engine import CPU_COMPILE

    return compiled(lambda x: [F.linear(x, w, b) for w, b in dense], CPU_COMPILE["max-autotune"])


def bench_shape(n, k, dtype, ms, compiled_ms, llc, budget, probe, log=print, quant=()):
    """Rows of one weight shape, yielded per M: each provider's median time per layer, the bytes it moved per
    second and their share of the read bandwidth measured between its passes, and its speedup over the best
    full-precision dense path at that M. ``quant``: schemes of :data:`QUANT` to time too."""
    import torch
    import torch.nn.functional as F

    from sparse_runtime.format.codec import SparseWeight
    from sparse_runtime.format.masks import pattern_mask
    from sparse_runtime.format.quant import QuantScheme, absmax_scales, quantize_codes
    from sparse_runtime.nn.int8_dense import int8_matmul
    from sparse_runtime.nn.linear import SparseLinear
    from sparse_runtime.ops.caches import DECODE_MAX_M

    elem = torch.empty((), dtype=dtype).element_size()
    schemes = [q for q in quant if q != "int4" or int4_group(k)]
    if len(schemes) < len(quant):
        log(f"{n}x{k}: no int4 group of {'/'.join(map(str, INT4_GROUPS))} columns divides K={k}; int4 skipped")
    stored = ["cpu24", *(f"cpu24-{q}" for q in schemes), *(["dense-int8"] if quant else [])]
    held = sum(weight_bytes(p, n, k, elem) for p in ["dense", *stored])  # what one layer holds across providers
    smallest = min(weight_bytes(p, n, k, elem) for p in stored)
    layers = stack_size(smallest, llc, budget * smallest // held)  # the smallest weights' stack exceeds the LLC too
    gen = torch.Generator().manual_seed(0)
    dense, sparse, quantized, int8_dense = [], [], {q: [] for q in schemes}, []
    for _ in range(layers):
        w = torch.randn(n, k, generator=gen).to(dtype)
        mask = pattern_mask(w.float().abs(), "2:4")
        sw = SparseWeight.compress(w * mask, mask)
        dense.append((w * mask, torch.randn(n, generator=gen).to(dtype)))
        sparse.append(SparseLinear.from_sparse_weight(sw, dense[-1][1], backend="cpu"))
        for q in schemes:
            scheme = QuantScheme.parse(q, int4_group(k) if q == "int4" else None)
            qw = SparseWeight.compress(w * mask, mask, quant=scheme)
            quantized[q].append(SparseLinear.from_sparse_weight(qw, dense[-1][1], backend="cpu"))
        if quant:  # torch's weight-only int8: per-row scales of the same masked weight
            scheme = QuantScheme.parse("int8")
            scales = absmax_scales(w * mask, scheme)
            int8_dense.append((quantize_codes(w * mask, scales, scheme), scales[:, 0].contiguous(), dense[-1][1]))
        del w, mask, sw
    for m in ms:
        x = torch.randn(m, k, generator=gen).to(dtype)
        calls = {"dense": [lambda w=w, b=b: F.linear(x, w, b) for w, b in dense],
                 "cpu24": [lambda layer=layer: layer(x) for layer in sparse]}  # what auto runs: the cpu backend
        for q, stack in quantized.items() if m <= DECODE_MAX_M else ():
            calls[f"cpu24-{q}"] = [lambda layer=layer: layer(x) for layer in stack]
        if int8_dense and m <= DECODE_MAX_M:  # torch's fp32 int8 kernel takes seconds per stack at prefill sizes
            calls["dense-int8"] = [lambda c=c, sc=sc, b=b: torch._weight_int8pack_mm(x, c, sc) + b
                                   for c, sc, b in int8_dense]
            if m in compiled_ms:
                dense8 = compiled(lambda x: [int8_matmul(x, c, sc.view(-1, 1)) + b for c, sc, b in int8_dense])
                calls["compiled-int8"] = [lambda: dense8(x)]
                if "int8" in quantized:
                    sparse8 = compiled(lambda x: [layer(x) for layer in quantized["int8"]])
                    calls["compiled-cpu24-int8"] = [lambda: sparse8(x)]
        if m in compiled_ms:
            stack = compiled_stack(dense)
            calls["compiled"] = [lambda: stack(x)]
        with torch.no_grad():
            timed = {p: time_pass(c, probe) for p, c in calls.items()}
        times = {p: t / layers for p, (t, _) in timed.items()}
        best_dense = min(t for p, t in times.items() if p in ("dense", "compiled"))
        rows = []
        for provider, t in times.items():
            nbytes = call_bytes(provider, m, n, k, elem)
            group = {"group_size": int4_group(k)} if provider == "cpu24-int4" else {}
            rows.append({"shape": f"{n}x{k}", "n": n, "k": k, "m": m, "dtype": str(dtype).removeprefix("torch."),
                         "provider": provider, **group, "layers_per_pass": layers, "us": round(t * 1e6, 2),
                         "bytes": nbytes, "gbps": round(nbytes / t / 1e9, 2),
                         "read_bandwidth_gbps": round(timed[provider][1], 2),
                         "bandwidth_fraction": round(nbytes / t / 1e9 / timed[provider][1], 3),
                         "speedup_vs_best_dense": round(best_dense / t, 3)})
        log(f"{n}x{k} M={m:<4} " + "  ".join(f"{p} {t * 1e6:9.1f} us" for p, t in times.items())
            + f"  2:4 {best_dense / times['cpu24']:.2f}x the best dense, "
            f"{next(r['bandwidth_fraction'] for r in rows if r['provider'] == 'cpu24'):.0%} of the bandwidth"
            + (f", int8 2:4 {fastest(times, DENSE_INT8) / fastest(times, SPARSE_INT8):.2f}x the best dense int8"
               if "dense-int8" in times and "cpu24-int8" in times else ""))
        yield rows


def plot(path: Path, report: dict) -> Path:
    """Speedup of the 2:4 kernel over the best dense path against M, one line per shape, the byte bound drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["provider"] == "cpu24"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for shape in dict.fromkeys(r["shape"] for r in rows):
        pts = sorted((r["m"], r["speedup_vs_best_dense"]) for r in rows if r["shape"] == shape)
        ax.plot(*zip(*pts), marker="o", label=shape)
    ax.axhline(32 / 17, ls="--", c="gray", lw=1, label="byte bound 32/17 (decode)")
    ax.axhline(1.0, ls=":", c="black", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (rows of x per call)")
    ax.set_ylabel("2:4 speedup over the best dense path")
    ax.set_title(f"2:4 CPU kernel vs dense, {report['dtype']}, per layer (stacks > 4x LLC)\n{report['device']}, "
                 f"read bandwidth {report['read_bandwidth_gbps']:.1f} GB/s, {report['date'][:10]}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def parse_named_shapes(text: str) -> list[tuple[int, int]]:
    """NxK,... where a part may also name a model's set: ``smollm2``, ``llama3-8b``."""
    named = {"smollm2": SMOLLM2, "llama3-8b": LLAMA3_8B}
    return [s for part in text.split(",") for s in named.get(part.strip()) or parse_shapes(part, k_multiple=8)]


def parse_quant(text: str) -> tuple[str, ...]:
    """``int8,int4`` -> the schemes, each of :data:`QUANT` ('' : none)."""
    schemes = tuple(dict.fromkeys(q.strip() for q in text.split(",") if q.strip()))
    bad = [q for q in schemes if q not in QUANT]
    if bad:
        raise ValueError(f"--quant: unknown scheme(s) {', '.join(bad)}; choose from {', '.join(QUANT)}")
    return schemes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", default="smollm2,llama3-8b", help="NxK,... or the names smollm2, llama3-8b")
    p.add_argument("--ms", default=",".join(map(str, DEFAULT_MS)), help="comma-separated M to sweep")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--compiled", default="1,8",
                   help="M values at which to time the inductor-compiled dense linear too ('none': never); each is "
                        "a compilation per shape")
    p.add_argument("--quant", default="", help=f"comma-separated schemes of {', '.join(QUANT)} to time the 2:4 kernel "
                   "on quantized codes too, with torch's dense weight-only int8 kernel as their baseline")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--memory-budget-gib", type=float, default=6.0, help="most GiB of weights a shape may hold")
    p.add_argument("--out", type=Path, default=None, help="the JSON (default benchmarks/results/cpu_kernels_DTYPE.json; "
                   "the PNG beside it)")


def measure(shapes, ms, dtype_name: str = "fp32", compiled_ms=(1, 8), out: Path | None = None,
            budget_gib: float = 6.0, log=print, quant=()) -> dict:
    """The report of every (shape, M), written to ``out`` (JSON, after every M) and ``out`` .png; ``quant``: the
    schemes of :data:`QUANT` to time too."""
    import torch

    from sparse_runtime.ops import cpu24

    dtype = getattr(torch, DTYPES[dtype_name])
    out = out or RESULTS / f"cpu_kernels_{dtype_name}.json"
    llc, budget = llc_bytes(), int(budget_gib * (1 << 30))
    probe = BandwidthProbe(llc)
    report = {**metadata("cpu"), "kind": "cpu_kernels", "dtype": dtype_name, "best_isa": cpu24.isas()[-1],
              "llc_bytes": llc, "read_bandwidth_gbps": round(probe.gbps, 2),
              "probe_bytes": probe.nbytes,
              "timer": "median of >= 5 passes over a stack of distinct layers >= 4x the LLC, per layer", "rows": []}
    log(f"{report['device']}, best ISA {report['best_isa']}, LLC {llc >> 20} MiB, read bandwidth {probe.gbps:.1f} GB/s "
        "(at the start; each row against the bandwidth read between its own passes)")
    for n, k in shapes:
        for rows in bench_shape(n, k, dtype, ms, compiled_ms, llc, budget, probe, log, quant):
            report["rows"] += rows
            write_json(out, report)  # after every M: a run cut short keeps what it measured
    log(f"wrote {out} and {plot(out.with_suffix('.png'), report)}")
    return report


def run(args) -> int:
    import torch

    from sparse_runtime.ops import cpu24

    if not cpu24.available():
        print(f"cpu_kernels: {cpu24.unavailable_reason()}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        shapes, ms = parse_named_shapes(args.shapes), parse_ints(args.ms)
        compiled = [] if args.compiled == "none" else parse_ints(args.compiled, "--compiled")
        quant = parse_quant(args.quant)
    except ValueError as e:
        print(f"cpu_kernels: {e}", file=sys.stderr)
        return 2
    measure(shapes, ms, args.dtype, compiled, args.out, args.memory_budget_gib, quant=quant)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_kernels", description=HELP)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
