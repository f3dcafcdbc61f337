"""Render the README's result tables from the JSON files under benchmarks/results/.

    python benchmarks/tables.py          # print the tables
    python benchmarks/tables.py --write  # rewrite the marked blocks of README.md in place

The README holds no number typed by hand: each table sits between ``<!-- table:NAME -->`` and
``<!-- /table -->`` and tests/test_readme_tables.py fails when it differs from what this script renders.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- table:(\w+) -->\n)(.*?)(<!-- /table -->)", re.S)


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def prune_quality() -> str:
    r = _load("prune_quality.json")
    if r is None:
        return "_not measured yet: run `python benchmarks/prune_quality.py`_\n"
    ppl, cal, ev, ref = r["perplexity"], r["calibration"], r["eval"], r.get("paper_reference", {})
    lines = [
        f"WikiText-2 raw test perplexity of {r['model']}: seqlen {ev['seqlen']}, {ev['tokens']:,} tokens "
        f"({ev['windows']}); calibration {cal['nsamples']} x {cal['seqlen']} tokens of {cal['file']} "
        f"(seed {cal['seed']}); {r['device']}, torch {r['torch']}, {r['date'][:10]}. "
        f"Dense: **{ppl['dense']:.2f}**.",
        "",
        "| method | 2:4 | 4:8 | 50% unstructured |",
        "|---|---|---|---|",
    ]
    for method in ("magnitude", "wanda", "sparsegpt"):
        cells = [f"{ppl[k]:.1f}" if (k := f"{method}/{p}") in ppl else "-" for p in ("2:4", "4:8", "unstructured")]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if ref:
        lines += ["", f"Paper reference ({ref['model']}, seqlen {ref['seqlen']}): dense {ref['dense']}; 2:4 "
                  + ", ".join(f"{m} {v}" for m, v in ref["2:4"].items())
                  + f"; 4:8 Wanda {ref['4:8']['wanda']}; 50% Wanda {ref['unstructured_50%']['wanda']}."]
    return "\n".join(lines) + "\n"


def prune_speed() -> str:
    lines = []
    for name in ("prune_speed.json", "prune_speed_llama3_8b.json"):
        r = _load(name)
        if r is None:
            continue
        lines += ["", f"{r['model']}, pattern {r['pattern']}, calibration {r['nsamples']} x {r['seqlen']} tokens; "
                  f"{r['device']}, torch {r['torch']}, {r['date'][:10]}:", "",
                  "| method | seconds | peak device memory | peak host RSS |", "|---|---|---|---|"]
        for method, run in r["runs"].items():
            scaled = next((f" ({v:.0f} s scaled to {k.split('_')[1]} layers)" for k, v in run.items()
                           if k.endswith("_layers_scaled")), "")
            dev = f"{run['peak_device_bytes'] / 2**30:.2f} GiB" if run.get("peak_device_bytes") else "-"
            lines.append(f"| {method} | {run['seconds']:.1f}{scaled} | {dev} | {run['peak_rss_bytes'] / 2**30:.2f} GiB |")
    return ("\n".join(lines[1:]) if lines else "_not measured yet_") + "\n"


def _latest(prefix: str) -> dict | None:
    files = sorted(RESULTS.glob(f"{prefix}*.json"))
    return _load(files[-1].name) if files else None


def gpu_pending(what: str) -> str:
    return (f"_No GPU measurement committed yet for {what}: no GPU machine has been lent to a session since this "
            "code was written. `benchmarks/gpu_check.sh` runs it (see its header)._\n")


def decode() -> str:
    r = _latest("kernels-")
    if r is None:
        return gpu_pending("the decode kernels (`benchmarks/kernels.py`)")
    rows = [row for row in r["rows"] if row["dtype"] == "fp16"]
    shapes = list(dict.fromkeys((row["N"], row["K"]) for row in rows))
    lines = [f"fp16, speedup over dense cuBLAS (median of CUDA-event timings) and, for `triton`, the share of the "
             f"measured copy bandwidth ({r['copy_bandwidth_GBps']:.0f} GB/s); {r['device']}, torch {r['torch']}, "
             f"triton {r['triton']}, {r['date'][:10]}. Bound at decode: 1.78x.", "",
             "| M | " + " | ".join(f"{n}x{k}" for n, k in shapes) + " |", "|---" * (len(shapes) + 1) + "|"]
    for m in sorted({row["M"] for row in rows}):
        cells = []
        for n, k in shapes:
            at = {row["provider"]: row for row in rows if (row["N"], row["K"], row["M"]) == (n, k, m)}
            t, d = at.get("triton"), at.get("dispatch")
            cell = f"{t['speedup_vs_dense']:.2f}x ({t['pct_copy_bw']:.0f}%)" if t else "-"
            cells.append(cell + (f", auto {d['speedup_vs_dense']:.2f}x" if d else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def prefill() -> str:
    r = _latest("prefill-")
    if r is None:
        return gpu_pending("prefill (`benchmarks/prefill.py`)")
    cols = ("torch", "cusparselt", "dispatch")
    lines = [f"{r['dtype']}, speedup over dense cuBLAS (median of CUDA-event timings), host overhead per call in "
             f"brackets; {r['device']}, torch {r['torch']}, {r['date'][:10]}. Bound: 2x.", "",
             "| shape | M | " + " | ".join(cols) + " | extension call, host |", "|---|---|" + "---|" * (len(cols) + 1)]
    for row in r["rows"]:
        cells = [f"{row[c + '_speedup']:.2f}x ({row[c + '_host_us']:.0f} us)" if c + "_speedup" in row else "-"
                 for c in cols]
        call = row.get("cusparselt_call_host_us")
        cells.append(f"{call:.1f} us" if call else "-")
        lines.append(f"| {row['shape']} | {row['m']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def kernel_resources() -> str:
    r = _load("kernel_report.json")
    if r is None:
        return "_not generated: run `python benchmarks/kernel_report.py`_\n"
    lines = [f"Compiled ahead of time (no GPU), {r['dtype']}, triton {r['triton']}, {r['date'][:10]}; "
             f"{r['specialisation']}.", "",
             "Shared memory against the arch's per-block limit; 'pruned': the launch's estimate "
             "(`kernels.sparse24.smem_estimate`) exceeds it, so the autotuner never tries it.", "",
             "| arch | config (BMxBNxBK, warps, stages) | registers | shared memory | spilled | 16-byte loads | MMA |",
             "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        if "error" in row:
            lines.append(f"| sm_{row['arch']} | {row['config']} | compile error: {row['error'][:60]} | | | | |")
            continue
        smem = f"{row['shared'] / 1024:.1f} / {row['smem_limit'] / 1024:.0f} KiB" + ("" if row["reachable"] else ", pruned")
        ops = row["ops"]
        wide = sum(v for k, v in ops.items() if k.startswith("LDG") and ".128" in k)
        mma = ", ".join(f"{k.split('.')[0]} {k.split('.')[1]}" for k in ops if k.startswith(("HGMMA", "HMMA")))
        spill = sum(v for k, v in ops.items() if k.startswith(("LDL", "STL")))
        lines.append(f"| sm_{row['arch']} | {row['config']} | {row['reg']} | {smem} | "
                     f"{f'{spill} LDL/STL' if spill else 'no'} | {wide} | {mma} |")
    return "\n".join(lines) + "\n"


TABLES = {"prune_quality": prune_quality, "prune_speed": prune_speed, "decode": decode, "prefill": prefill,
          "kernel_resources": kernel_resources}


def render(text: str) -> str:
    def sub(m):
        if m.group(2) not in TABLES:
            raise SystemExit(f"README names an unknown table {m.group(2)!r}")
        return m.group(1) + TABLES[m.group(2)]() + m.group(4)
    return BLOCK.sub(sub, text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="rewrite README.md's table blocks")
    args = p.parse_args(argv)
    if args.write:
        README.write_text(render(README.read_text()))
        print(f"updated {README}")
    else:
        for name, fn in TABLES.items():
            print(f"## {name}\n{fn()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
