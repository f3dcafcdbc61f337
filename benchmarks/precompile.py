"""Compile, in parallel processes, the Triton kernels that ``benchmarks.kernels`` will autotune, so that its
autotuner finds them in Triton's on-disk cache instead of compiling some 10 configs one after another per
specialisation on a fresh GPU machine.

    python -m benchmarks.precompile [--shards 8] [--shapes 4096x4096,...] [--ms 1,16,64,2048] [--dtypes fp16]

Each of ``--shards`` workers runs with ``SPARSE_RUNTIME_TRITON_CONFIGS=shard:i/n`` (every n-th config) and makes
the benchmark's own Triton calls once per (dtype, shape, M): the same launch path, hence the same
specialisations and cache keys as the timed calls. Needs CUDA.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

from . import kernels as bench  # shapes, providers, the calls themselves
from .common import module_command, module_env


def worker(args) -> int:
    import torch

    from sparse_runtime import backends
    from sparse_runtime.format.codec import SparseWeight
    from sparse_runtime.format.masks import nm_mask

    providers = [p for p in bench.select_providers(backends.availability("cuda"))
                 if p == "triton" or p in bench.ROTATION_PROVIDERS]
    failed = 0
    for dtype_name in bench.parse_choices(args.dtypes, bench.DTYPES, "--dtypes"):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
        for n, k in bench.parse_shapes(args.shapes):
            w = torch.randn(n, k, device="cuda", dtype=dtype)
            sw = SparseWeight.compress(w, nm_mask(w.abs()))
            for m in bench.parse_ints(args.ms):
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                for provider in providers:
                    block = bench.ROTATION_PROVIDERS.get(provider, (0,))[0]
                    if provider == "triton:fused-rot-full" and m > bench.FUSED_FULL_MAX_M or block and k % block:
                        continue
                    rot = None
                    if provider in bench.ROTATION_PROVIDERS:
                        rot = torch.linalg.qr(torch.randn(k // (block or k), block or k, block or k,
                                                          device="cuda"))[0].to(dtype)
                        rot = rot if block else rot[0]
                    try:
                        bench._layer_fns(provider, [sw], [x], [rot])[0]()
                    except Exception as e:  # noqa: BLE001 -- the benchmark reports it; compile what else we can
                        failed += 1
                        print(f"  {provider} {n}x{k} M={m}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            torch.cuda.synchronize()
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--shard", help=argparse.SUPPRESS)  # "i/n": run as one worker
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in bench.LLAMA3_8B))
    p.add_argument("--ms", default="1,16,64,2048")
    p.add_argument("--dtypes", default="fp16")
    args = p.parse_args(argv)
    if args.shard:
        return worker(args)
    from sparse_runtime.kernels import sparse24 as k
    from sparse_runtime.ops.triton_plan import CONFIGS_ENV

    shards = max(1, min(args.shards, len(k.GPU_DECODE_CONFIGS), len(k.GPU_TILE_CONFIGS)))
    t0 = time.time()
    procs = [subprocess.Popen([*module_command(__spec__.name), "--shard", f"{i}/{shards}", "--shapes", args.shapes,
                               "--ms", args.ms, "--dtypes", args.dtypes],
                              env=module_env(**{CONFIGS_ENV: f"shard:{i}/{shards}"}))
             for i in range(shards)]
    codes = [proc.wait() for proc in procs]
    print(f"precompiled in {shards} processes: {time.time() - t0:.0f} s, {codes.count(0)} of {shards} without errors")
    return 0 if not any(codes) else 1


if __name__ == "__main__":
    sys.exit(main())
