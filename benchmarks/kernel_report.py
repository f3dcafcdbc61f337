"""The compiler's view of the Triton 2:4 kernel, with no GPU needed: registers, spills, shared memory and
the SASS instruction mix of every autotune config, compiled ahead of time for Hopper (sm_90) and Ampere (sm_80);
and the same for the CUDA mma.sp decode kernel (csrc/mmasp.cu, compiled with nvcc; ``--mmasp``: only it).

    python -m benchmarks.kernel_report [--arch 90] [--dtype fp16] [--only REGEX] [--mmasp] [--out benchmarks/results/kernel_report.json]

Per decode config it also counts the steady-state loop (the innermost backward branch around the MMAs):
warp instructions per iteration (SASS in the loop x warps) per weight byte the iteration streams, and the
issue rate each SM would need for 80% of a device's bandwidth at its boost clock (``ISSUE_DEVICES``; an SM
issues at most 4 warp instructions per clock, one per scheduler; the issue's target is <= 2).

What to read in it: decode is memory-bound, so the weight stream must go through wide loads (LDG.E.128 or
cp.async/TMA), nothing may spill to local memory (LDL/STL), and registers must leave room for enough warps
per SM to keep bytes in flight. The specialisation matches Llama-3-8B shapes: N, K and the strides are
multiples of 16, as Triton sees them at run time.

Quantized weights (the kernel's ``QUANT``: int8 and fp8 codes with a scale per row, int4 codes with a scale per
group of 128 or 32 columns) are reported for every decode config in the fp16 report, labelled ``+int8``,
``+fp8``, ``+int4 g128``, ``+int4 g32``: the dequantization's registers and instructions, and the issue rate per
byte of codes and scales streamed, which is 1/2 (int8, fp8) or 1/4 (int4) of the fp16 weight's. (bf16 dequantizes
the same way but for the final conversion; the tile schedule dequantizes once per BLOCK_M rows of x, and
``tests/test_kernels_sparse24.py`` compiles a few quantized tile variants.)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from .common import RESULTS, build_config, now, write_json
PTRS = ["x_ptr", "values_ptr", "meta_ptr", "scales_ptr", "rot_ptr", "bias_ptr", "out_ptr", "ws_ptr", "lock_ptr"]
INTS = ["M", "N", "K", "M_BUCKET", "stride_xm", "stride_vn", "stride_mn", "stride_om"]
DIV16 = {"N", "K", "stride_xm", "stride_vn", "stride_mn", "stride_om"}
# SASS opcode families worth counting: the memory path (widths, cp.async, TMA, spills) and the math.
ESIZE = {"fp16": 2, "bf16": 2, "fp32": 4}
FAMILIES = ("LDG", "LDGSTS", "UTMALDG", "STG", "LDL", "STL", "HMMA", "HGMMA", "ATOMG")
# name: (arch, DRAM bytes/s (spec sheet; a measured copy gets ~90% of it), SMs, boost clock Hz)
ISSUE_DEVICES = {"H200": (90, 4.8e12, 132, 1.98e9), "H100 SXM": (90, 3.35e12, 132, 1.98e9),
                 "A100 80GB SXM": (80, 2.039e12, 108, 1.41e9)}
BANDWIDTH_SHARE = 0.8
_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_x]+)*)([^;]*);")


def nvidia_bin(tool: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    return str(path) if path.exists() else tool


def compile_variant(fn, dtype: str, arch: int, const: dict, warps: int, stages: int, div16=DIV16):
    """AOT-compile ``fn`` for ``sm_{arch}``; pointers and the ints in ``div16`` are specialised as multiples of 16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sparse_runtime.kernels import sparse24 as k

    codes = {k.Q_INT8.value: "i8", k.Q_FP8.value: "u8", k.Q_INT4.value: "u8"}.get(const.get("QUANT", 0), dtype)
    sig = {a: "*" + {"meta_ptr": "i32", "ws_ptr": "fp32", "lock_ptr": "i32", "values_ptr": codes}.get(a, dtype)
           for a in PTRS}
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
    return {**usage, "ops": counts, "instructions": len(sass_lines(sass)), "main_loop": main_loop(sass)}


def sass_lines(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of every instruction in ``cuobjdump -sass`` text."""
    return [(int(a, 16), op, rest) for a, _, op, rest in _SASS.findall(sass)]


def main_loop(sass: str) -> dict | None:
    """The steady-state loop: the smallest span from a backward branch's target to the branch that holds MMAs
    (HGMMA/HMMA), i.e. the pipelined K loop. Its instruction count and opcode families (None: no such loop)."""
    lines = sass_lines(sass)
    loops = []
    for addr, op, rest in lines:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:
            body = [o for a, o, _ in lines if int(target.group(1), 16) <= a <= addr]
            if any(o.startswith(("HGMMA", "HMMA")) for o in body):
                loops.append(body)
    if not loops:
        return None
    body = min(loops, key=len)
    return {"instructions": len(body), "ops": dict(Counter(o.split(".")[0] for o in body).most_common())}


def weight_bytes_per_iteration(const: dict, esize: int, cfg) -> int:
    """Weight bytes one K-loop iteration of a CTA streams: BN x BK/2 values (or codes, and their scales) and
    BN x BK/32 int32 meta words."""
    from sparse_runtime.ops.triton_plan import scale_columns, value_bytes

    bn, bk = const["BLOCK_N"], const["BLOCK_K"]
    quant, qgroup = const.get("QUANT", 0), const.get("QGROUP", 0)
    scales = esize * bn * scale_columns(cfg, quant, qgroup) if qgroup else 0  # per-row scales load once
    return int(bn * bk // 2 * value_bytes(esize, quant)) + bn * (bk // 32) * 4 + scales


def issue_rate(loop: dict, warps: int, nbytes: int, arch: int) -> dict:
    """Warp instructions per weight byte and, per device of ``arch``, the warp instructions per clock per SM
    needed to stream the weight at ``BANDWIDTH_SHARE`` of its bandwidth."""
    per_byte = loop["instructions"] * warps / nbytes
    return {"warp_instructions_per_weight_byte": round(per_byte, 4),
            "needed_issue_per_clock_per_sm": {name: round(per_byte * BANDWIDTH_SHARE * bw / (sms * clock), 2)
                                              for name, (a, bw, sms, clock) in ISSUE_DEVICES.items() if a == arch}}


def quant_variants():
    """(label suffix, QUANT, QGROUP) of the quantized weights reported: per-row int8 and fp8, int4 in the default
    groups of 128 columns and in groups of 32 (several groups per K tile: the scale broadcast)."""
    from sparse_runtime.kernels import sparse24 as k

    return (("+int8", k.Q_INT8.value, 0), ("+fp8", k.Q_FP8.value, 0), ("+int4 g128", k.Q_INT4.value, 128),
            ("+int4 g32", k.Q_INT4.value, 32))


def variants(arch: int, dtype: str):
    """(label, constexprs, warps, stages, config) for every autotune config of both schedules, plus the fused
    rotation and (fp16 decode) the quantized weights."""
    from sparse_runtime.kernels import sparse24 as k
    from sparse_runtime.ops import triton_plan

    base = dict(HAS_BIAS=False, ROT=k.ROT_NONE.value, ROT_B=1, DOT_PREC="tf32", BLOCK_J=32, GROUP_M=8,
                QUANT=k.Q_NONE.value, QGROUP=0)
    for schedule, configs, swap in (("decode", k.GPU_DECODE_CONFIGS, True), ("tiles", k.GPU_TILE_CONFIGS, False)):
        for c in configs:
            kw = c.kwargs
            const = {**base, **{x: kw[x] for x in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}, "SWAP_AB": swap}
            label = f"{schedule} {kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{c.num_warps} s{c.num_stages}"
            yield label, const, c.num_warps, c.num_stages, c
            for suffix, quant, qgroup in quant_variants() if schedule == "decode" and dtype == "fp16" else ():
                yield f"{label} {suffix}", {**const, "QUANT": quant, "QGROUP": qgroup}, c.num_warps, c.num_stages, c
            if kw["BLOCK_K"] <= triton_plan.ROT_TILE_MAX_K:  # R's tile is [BK, BK] for any block size dividing BK
                b = kw["BLOCK_K"]
                rotated = {**const, "ROT": k.ROT_TILE.value, "ROT_B": b}
                yield label + f" +rot b{b}", rotated, c.num_warps, c.num_stages, c


def kernel_version() -> str:
    """A hash of the source of the module's jitted functions (the kernel and its helpers, not the config
    lists around them): rows compiled from another version are stale."""
    import hashlib

    import triton
    from sparse_runtime.kernels import sparse24 as k

    fns = sorted((name, f.src) for name, f in vars(k).items() if isinstance(f, triton.runtime.JITFunction))
    return hashlib.sha256(repr(fns).encode()).hexdigest()[:12]


def report_row(arch: int, label: str, const: dict, warps: int, stages: int, cfg, dtype: str) -> dict:
    from sparse_runtime.kernels import sparse24 as k
    from sparse_runtime.ops.triton_plan import SMEM_LIMIT, smem_estimate

    # reachable: the launch's prune (ops.triton_plan.within_shared_memory) keeps it on this arch
    est = smem_estimate(cfg, const["ROT"], ESIZE[dtype], const["QUANT"], const["QGROUP"])
    row = {"arch": arch, "config": label, "smem_estimate": est, "smem_limit": SMEM_LIMIT[arch],
           "reachable": est <= SMEM_LIMIT[arch], "kernel": kernel_version(),
           "compiled": now()}
    try:
        row.update(inspect(compile_variant(k.sparse24_matmul_kernel, dtype, arch, const, warps, stages)))
        row["fits"] = row["shared"] <= SMEM_LIMIT[arch]
    except Exception as e:  # a config the compiler rejects is a finding, not a crash
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    if label.startswith("decode") and row.get("main_loop"):
        row["weight_bytes_per_iteration"] = weight_bytes_per_iteration(const, ESIZE[dtype], cfg)
        row.update(issue_rate(row["main_loop"], warps, row["weight_bytes_per_iteration"], arch))
    return row


# -- the mma.sp decode kernel (csrc/mmasp.cu) ----------------------------------------------------------------
MMASP_SOURCES = ("csrc/mmasp.cu", "csrc/mmasp.h")
MMASP_STEP_BYTES = 16 * 16 * 2 + 16 * 16 * 2 // 8  # one mma.sp's A: 16 rows x 16 kept values + their 2-bit indices


def mmasp_version() -> str:
    import hashlib

    root = Path(__file__).resolve().parents[1]
    return hashlib.sha256(b"".join((root / f).read_bytes() for f in MMASP_SOURCES)).hexdigest()[:12]


def _nvcc() -> str:
    cuda = build_config()._cuda_home()
    if cuda is None:
        raise RuntimeError("no CUDA toolkit (nvcc) found; set CUDA_HOME")
    return str(cuda / "bin" / "nvcc")


def mmasp_rows(arch: int) -> list[dict]:
    """nvcc -cubin of mmasp.cu for ``sm_{arch}``: per instantiation (dtype, n-tiles) its registers, static
    shared memory, SASS families and steady-state loop, and the issue rate it needs (loop instructions of one
    warp per weight byte that warp streams: each warp has its own rows, so the CTA's warp count cancels)."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "mmasp.cubin"
        subprocess.run([_nvcc(), "-O2", "-std=c++17", f"-I{root / 'csrc'}", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                        "-cubin", "-o", str(cubin), str(root / "csrc" / "mmasp.cu")], check=True)
        res = subprocess.run([nvidia_bin("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
        sass = subprocess.run([nvidia_bin("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
    usage = dict(re.findall(r"Function (\S+):\s*\n\s*(.*)", res))
    rows = []
    for name, body in re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass, re.S):
        if "mmasp_kernel" not in name:
            continue
        dtype = "bf16" if "bfloat16" in name else "fp16"
        nt = int(re.search(r"Li(\d)E", name).group(1))
        counts = {k.lower(): int(v) for k, v in re.findall(r"(REG|SHARED|LOCAL|STACK):(\d+)", usage.get(name, ""))}
        opcodes = re.findall(r"\b([A-Z][A-Z0-9]+(?:\.[A-Z0-9x]+)*)\s", body)
        loop = main_loop(body)
        row = {"arch": arch, "config": f"mmasp {dtype} {nt} n-tile{'s' if nt > 1 else ''} (M {'9-16' if nt > 1 else '1-8'})",
               "dtype": dtype, "n_tiles": nt, **counts, "kernel": mmasp_version(),
               "ops": dict(sorted(Counter(o for o in opcodes if o.split(".")[0] in FAMILIES + ("LDSM",)).items())),
               "main_loop": loop,
               "compiled": now()}
        if loop:
            mmas = loop["ops"].get("HMMA", 0)
            row["weight_bytes_per_iteration"] = mmas // nt * MMASP_STEP_BYTES
            row.update(issue_rate(loop, 1, row["weight_bytes_per_iteration"], arch))
        rows.append(row)
    return sorted(rows, key=lambda r: (r["dtype"], r["n_tiles"]))


def describe(row: dict) -> str:
    if "error" in row:
        return row["error"]
    ops, loop = row.get("ops", {}), row.get("main_loop") or {}
    rate = " ".join(f"{d}={v}/clk" for d, v in row.get("needed_issue_per_clock_per_sm", {}).items())
    return (f"regs {row.get('reg', '?'):>3} smem {row['shared'] / 1024:5.1f}K (est {row['smem_estimate'] / 1024:5.1f}K"
            f"{'' if row['reachable'] else ', pruned'}) stack {row.get('stack', 0):>3} loop {loop.get('instructions')} "
            + " ".join(f"{n}={v}" for n, v in ops.items()) + (f" | needed {rate}" if rate else ""))


def main(argv=None) -> int:
    os.environ["TRITON_INTERPRET"] = "0"  # compile for real even on a machine without a GPU
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    p.add_argument("--dtype", default="fp16", choices=list(ESIZE))
    p.add_argument("--only", help="compile only the variants whose label matches this regex (e.g. 'decode', "
                                  "'^decode [^+]*$': without rotation); the other rows of the report are kept")
    p.add_argument("--stale", action="store_true", help="compile only rows from another version of the kernel")
    p.add_argument("--mmasp", action="store_true", help="compile only the mma.sp kernel (csrc/mmasp.cu) with "
                                                       "nvcc; the Triton rows are kept")
    p.add_argument("--out", type=Path, help="default: benchmarks/results/kernel_report[_DTYPE].json (fp16 unsuffixed)")
    args = p.parse_args(argv)
    args.out = args.out or RESULTS / ("kernel_report.json" if args.dtype == "fp16" else f"kernel_report_{args.dtype}.json")
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    old = {(r["arch"], r["config"]): r for r in previous.get("rows", [])}
    mmasp = [r for arch in args.arch for r in mmasp_rows(arch)]
    mmasp += [r for r in previous.get("mmasp", []) if r["arch"] not in args.arch]
    for row in mmasp:
        print(f"sm_{row['arch']} {row['config']:34s} regs {row.get('reg')} loop "
              f"{(row.get('main_loop') or {}).get('instructions')} needed {row.get('needed_issue_per_clock_per_sm')}")
    if args.mmasp:  # the rest of the report as it was
        write_json(args.out, {**previous, "mmasp_kernel": mmasp_version(), "mmasp": mmasp}, indent=1)
        print(f"wrote {args.out}")
        return 0
    import triton

    rows = {}
    for arch in args.arch:
        for label, const, warps, stages, cfg in variants(arch, args.dtype):
            current = old.get((arch, label), {}).get("kernel") == kernel_version()
            if (args.only and not re.search(args.only, label)) or (args.stale and current):
                if (arch, label) in old:
                    rows[arch, label] = old[arch, label]
                continue
            rows[arch, label] = row = report_row(arch, label, const, warps, stages, cfg, args.dtype)
            print(f"sm_{arch} {label:34s} {describe(row)}", flush=True)
            write_report(args.out, args.dtype, triton.__version__, {**old, **rows}, mmasp)  # a cut-off run keeps its rows
    print(f"wrote {args.out}")
    return 0


def write_report(path: Path, dtype: str, triton_version: str, rows: dict, mmasp: list) -> None:
    """Atomically, rows in config order (other archs' rows of an earlier run kept); ``mmasp``: the CUDA kernel's."""
    report = {"date": now(), "triton": triton_version,
              "dtype": dtype, "specialisation": "pointers and N, K, strides divisible by 16",
              "issue_devices": {n: {"arch": a, "bytes_per_s": bw, "sms": sms, "clock_hz": c}
                                for n, (a, bw, sms, c) in ISSUE_DEVICES.items()},
              "bandwidth_share": BANDWIDTH_SHARE, "kernel": kernel_version(), "rows": list(rows.values()),
              "mmasp_kernel": mmasp_version(), "mmasp": mmasp}
    write_json(path, report, indent=1)


if __name__ == "__main__":
    sys.exit(main())
