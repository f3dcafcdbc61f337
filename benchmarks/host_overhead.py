"""Host (Python) time of one eager ``SparseLinear`` call on the triton backend, with the driver's launch stubbed.

    OMP_NUM_THREADS=1 python -m benchmarks.host_overhead [--out benchmarks/results/host_overhead.json]

Runs on the CPU (the interpreter's device check admits CPU tensors; nothing is computed). A prepared layer keeps,
per M bucket, the autotuner's choice and the compiled kernel, and launches it through
``sparse_runtime.ops.triton_launch.direct_launch``; the stub stands in for the compiled kernel, and its ``run``, the
driver's launcher (C: argument packing and ``cuLaunchKernel``), is the only thing replaced. Everything from
``SparseLinear.forward`` to that call is timed: checks, the plan lookup, buffers, argument assembly, the
specialisation key, the launch adapter. The first call of each bucket (the autotuner, outside the timing) goes to
a stub autotuner that takes the first config. Target: <= 10 us per call. Median of ``--repeats`` batches of
``--calls`` calls, in process CPU time (``*_us``; wall time beside it). ``backend_forward``: the backend's share,
without ``SparseLinear.forward``'s own checks and ``nn.Module`` call.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from .common import RESULTS, metadata, write_json

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors pass the device check; nothing is launched anyway


class _StubCompiled:
    """Stands in for a ``CompiledKernel``: ``run`` is the driver's launcher, stubbed (counts, launches nothing)."""

    function, packed_metadata = 0, b""

    def __init__(self):
        self.launches = 0

    def run(self, *args):
        self.launches += 1

    def launch_metadata(self, grid, stream, *args):
        return None


class _StubKernel:
    """Stands in for an autotuned kernel: chooses its first config without benchmarking, compiles nothing, and
    returns the stub compiled kernel (whose first launch it counts as one)."""

    def __init__(self, configs):
        self.configs, self.fn, self.compiled, self.tunings = configs, self, _StubCompiled(), 0

    def __getitem__(self, grid):
        def tune_and_launch(*args, **kwargs):
            self.tunings += 1
            self.best_config = self.configs[0]
            return self.run(*args, grid=grid, warmup=False, **kwargs, **self.best_config.all_kwargs())
        return tune_and_launch

    def run(self, *args, grid, warmup, **kwargs):  # JITFunction.run with a config: grid, then the launch
        grid(kwargs)
        self.compiled.run()
        return self.compiled


def time_calls(fn, calls: int, repeats: int, clock=time.process_time) -> float:
    """Median over ``repeats`` batches of the mean time per call, in microseconds. The default clock is this
    process's CPU time: on a shared machine wall time mostly measures the other processes."""
    samples = []
    for _ in range(repeats):
        t0 = clock()
        for _ in range(calls):
            fn()
        samples.append((clock() - t0) / calls * 1e6)
    return statistics.median(samples)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--ms", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=RESULTS / "host_overhead.json")
    args = p.parse_args(argv)
    import torch

    from sparse_runtime import SparseLinear

    from sparse_runtime.ops import triton_plan

    stubs = []  # one per launch plan (the autotuner a plan makes)
    triton_plan.autotuner = lambda configs: stubs.append(_StubKernel(configs)) or stubs[-1]
    torch.manual_seed(0)
    lin = SparseLinear.from_linear(torch.nn.Linear(args.k, args.n).half(), backend="triton")
    rows = []
    with torch.inference_mode():
        for m in args.ms:
            x = torch.randn(m, args.k, dtype=torch.float16)
            lin(x)  # builds the runner (prepare) and the bucket's plan, consults the autotuner: outside the timing
            b, state = lin._runner[:2]
            stub = stubs[-1]  # the bucket's plan's
            before = stub.compiled.launches
            us = {"sparse_linear": time_calls(lambda: lin(x), args.calls, args.repeats),
                  "backend_forward": time_calls(lambda: b.forward(lin, state, x), args.calls, args.repeats),
                  "wall_sparse_linear": time_calls(lambda: lin(x), args.calls, args.repeats, time.perf_counter)}
            # every timed call reached the stubbed driver launch, directly: the autotuner ran once, before
            assert stub.compiled.launches - before == 3 * args.calls * args.repeats and stub.tunings == 1, m
            stub.tunings = 0
            rows.append({"m": m, **{f"{k}_us": round(v, 2) for k, v in us.items()}})
            print(f"M={m:5d}: " + "  ".join(f"{k} {v:6.2f} us" for k, v in us.items()), flush=True)
    report = {**metadata("cpu", f"{os.cpu_count()} cores, launch stubbed"), "python": platform.python_version(),
              "settings": {"n": args.n, "k": args.k, "dtype": "fp16", "calls": args.calls, "repeats": args.repeats,
                           "backend": "triton", "path": "SparseLinear.forward",
                           "stubbed": "CompiledKernel.run (the driver's launcher)",
                           "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
              "target_us": 10, "rows": rows}
    write_json(args.out, report, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
