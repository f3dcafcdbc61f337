"""The compiler's view of the Triton 2:4 kernel, with no GPU needed: registers, spills, shared memory and
the SASS instruction mix of every autotune config, compiled ahead of time for Hopper (sm_90) and Ampere (sm_80).

    python benchmarks/kernel_report.py [--arch 90] [--dtype fp16] [--out benchmarks/results/kernel_report.json]

What to read in it: decode is memory-bound, so the weight stream must go through wide loads (LDG.E.128 or
cp.async/TMA), nothing may spill to local memory (LDL/STL), and registers must leave room for enough warps
per SM to keep bytes in flight. The specialisation matches Llama-3-8B shapes: N, K and the strides are
multiples of 16, as Triton sees them at run time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PTRS = ["x_ptr", "values_ptr", "meta_ptr", "rot_ptr", "bias_ptr", "out_ptr", "ws_ptr", "lock_ptr"]
INTS = ["M", "N", "K", "k_per_split", "M_BUCKET", "stride_xm", "stride_vn", "stride_mn", "stride_om"]
DIV16 = {"N", "K", "k_per_split", "stride_xm", "stride_vn", "stride_mn", "stride_om"}
# SASS opcode families worth counting: the memory path (widths, cp.async, TMA, spills) and the math.
ESIZE = {"fp16": 2, "bf16": 2, "fp32": 4}
FAMILIES = ("LDG", "LDGSTS", "UTMALDG", "STG", "LDL", "STL", "HMMA", "HGMMA", "ATOMG")


def nvidia_bin(tool: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    return str(path) if path.exists() else tool


def compile_variant(fn, dtype: str, arch: int, const: dict, warps: int, stages: int, div16=DIV16):
    """AOT-compile ``fn`` for ``sm_{arch}``; pointers and the ints in ``div16`` are specialised as multiples of 16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {a: "*" + {"meta_ptr": "i32", "ws_ptr": "fp32", "lock_ptr": "i32"}.get(a, dtype) for a in PTRS}
    sig.update({a: "i32" for a in INTS})
    sig.update({c: "constexpr" for c in const})
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in PTRS + sorted(div16)}
    return triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": warps, "num_stages": stages})


def inspect(compiled) -> dict:
    """Resource usage and SASS opcode counts of a compiled kernel's cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        res = subprocess.run([nvidia_bin("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([nvidia_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    usage = {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res)}
    opcodes = re.findall(r"\b([A-Z][A-Z0-9]+(?:\.[A-Z0-9x]+)*)\s", sass)
    counts = dict(sorted(Counter(op for op in opcodes if op.split(".")[0] in FAMILIES).items()))
    usage["shared"] = compiled.metadata.shared  # dynamic shared memory (pipeline stages); res-usage shows static only
    return {**usage, "ops": counts, "instructions": len(re.findall(r"/\*[0-9a-f]{4}\*/", sass))}


def variants(arch: int, dtype: str):
    """(label, constexprs, warps, stages, config) for every autotune config of both schedules, plus the fused rotation."""
    from sparse_runtime.kernels import sparse24 as k

    base = dict(HAS_BIAS=False, ACT=0, ROT=0, ROT_B=1, DOT_PREC="tf32", BLOCK_J=32, GROUP_M=8)
    for schedule, configs, split, swap in (("decode", k.GPU_DECODE_CONFIGS, True, True),
                                           ("tiles", k.GPU_TILE_CONFIGS, False, False)):
        for c in configs:
            kw = c.kwargs
            const = {**base, **{x: kw[x] for x in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}, "SPLIT": split, "SWAP_AB": swap}
            label = f"{schedule} {kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{c.num_warps} s{c.num_stages}"
            yield label, const, c.num_warps, c.num_stages, c
            if kw["BLOCK_K"] <= k.ROT_TILE_MAX_K:  # R's tile is [BK, BK] for any block size dividing BK
                b = kw["BLOCK_K"]
                yield label + f" +rot b{b}", {**const, "ROT": 1, "ROT_B": b}, c.num_warps, c.num_stages, c


def main(argv=None) -> int:
    os.environ["TRITON_INTERPRET"] = "0"  # compile for real even on a machine without a GPU
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    p.add_argument("--dtype", default="fp16", choices=list(ESIZE))
    p.add_argument("--out", type=Path, help="default: benchmarks/results/kernel_report[_DTYPE].json (fp16 unsuffixed)")
    args = p.parse_args(argv)
    args.out = args.out or RESULTS / ("kernel_report.json" if args.dtype == "fp16" else f"kernel_report_{args.dtype}.json")
    import triton

    from sparse_runtime.kernels import sparse24 as k

    rows = []
    for arch in args.arch:
        for label, const, warps, stages, cfg in variants(arch, args.dtype):
            # reachable: the launch's prune (kernels.sparse24.fitting) keeps it on this arch
            est = k.smem_estimate(cfg, const["ROT"], ESIZE[args.dtype])
            row = {"arch": arch, "config": label, "smem_estimate": est, "smem_limit": k.SMEM_LIMIT[arch],
                   "reachable": est <= k.SMEM_LIMIT[arch]}
            try:
                row.update(inspect(compile_variant(k.sparse24_matmul_kernel, args.dtype, arch, const, warps, stages)))
                row["fits"] = row["shared"] <= k.SMEM_LIMIT[arch]
            except Exception as e:  # a config the compiler rejects is a finding, not a crash
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            ops = row.get("ops", {})
            print(f"sm_{arch} {label:34s} " + (row["error"] if "error" in row else
                  f"regs {row.get('reg', '?'):>3} smem {row['shared'] / 1024:5.1f}K (est {est / 1024:5.1f}K"
                  f"{'' if row['reachable'] else ', pruned'}) stack {row.get('stack', 0):>3} "
                  + " ".join(f"{n}={v}" for n, v in ops.items())), flush=True)
    report = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "triton": triton.__version__,
              "dtype": args.dtype, "specialisation": "pointers and N, K, strides, k_per_split divisible by 16",
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
