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
    bos = {"window": "BOS per window", "document": "BOS per document", "none": "no BOS: the tokenizer adds none"}
    lines = [
        f"WikiText-2 raw test perplexity of {r['model']}: seqlen {ev['seqlen']}, {ev['tokens']:,} tokens "
        f"({ev['windows']}; {bos[ev.get('bos', 'document')]}); calibration {cal['nsamples']} x {cal['seqlen']} "
        f"tokens of {cal['file']} ({cal.get('sampling', 'concat')} sampling, seed {cal['seed']}; "
        f"{bos[cal.get('bos', 'none')]}); {r['device']}, torch {r['torch']}, {r['date'][:10]}. "
        f"Dense: **{ppl['dense']:.2f}**.",
        "",
        "| method | 2:4 | 4:8 | 50% unstructured |",
        "|---|---|---|---|",
    ]
    carried = r.get("carried_over", {})  # cells kept from an earlier run, each with why
    for method in ("magnitude", "wanda", "sparsegpt"):
        cells = [f"{ppl[k]:.1f}{' (*)' if k in carried else ''}" if (k := f"{method}/{p}") in ppl else "-"
                 for p in ("2:4", "4:8", "unstructured")]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if carried:
        lines += [""] + [f"- (*) {k}: {why}." for k, why in carried.items()]
    for cell, runs in r.get("seed_spread", {}).items():
        parts = [f"{sampling} sampling " + " / ".join(f"{v:.1f}" for v in by_seed.values())
                 + f" (seeds {', '.join(by_seed)})" for sampling, by_seed in runs.items() if by_seed]
        lines += ["", f"Seed-to-seed spread of {cell.replace('/', ' ')}: " + "; ".join(parts) + "."]
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
    current = r.get("kernel")
    lines = [f"Compiled ahead of time (no GPU), {r['dtype']}, triton {r['triton']}, {r['date'][:10]}; "
             f"{r['specialisation']}.", "",
             "Shared memory against the arch's per-block limit; 'pruned': the launch's estimate "
             "(`kernels.sparse24.smem_estimate`) exceeds it, so the autotuner never tries it."
             + (f" (*): compiled from an earlier version of the kernel source than the current one ({current})."
                if any(row.get("kernel") != current for row in r["rows"]) else ""),
             "", "| arch | config (BMxBNxBK, warps, stages) | registers | shared memory | spilled | 16-byte loads | MMA |",
             "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        stale = " (*)" if row.get("kernel") != current else ""
        if "error" in row:
            lines.append(f"| sm_{row['arch']} | {row['config']}{stale} | compile error: {row['error'][:60]} | | | | |")
            continue
        smem = f"{row['shared'] / 1024:.1f} / {row['smem_limit'] / 1024:.0f} KiB" + ("" if row["reachable"] else ", pruned")
        ops = row["ops"]
        wide = sum(v for k, v in ops.items() if k.startswith("LDG") and ".128" in k)
        mma = ", ".join(f"{k.split('.')[0]} {k.split('.')[1]}" for k in ops if k.startswith(("HGMMA", "HMMA")))
        spill = sum(v for k, v in ops.items() if k.startswith(("LDL", "STL")))
        lines.append(f"| sm_{row['arch']} | {row['config']}{stale} | {row['reg']} | {smem} | "
                     f"{f'{spill} LDL/STL' if spill else 'no'} | {wide} | {mma} |")
    return "\n".join(lines) + "\n"


ISSUE_TARGET = 2.0  # warp instructions per clock per SM the decode loop may need (issue 10's target)


def decode_issue() -> str:
    r = _load("kernel_report.json")
    rows = [x for x in (r or {}).get("rows", []) if "warp_instructions_per_weight_byte" in x
            and x.get("kernel") == r.get("kernel")]
    if not rows:
        return "_not generated: run `python benchmarks/kernel_report.py --only decode`_\n"
    devices = list(dict.fromkeys(d for x in rows for d in x["needed_issue_per_clock_per_sm"]))
    share = r["bandwidth_share"]
    spec = "; ".join(f"{d} {v['bytes_per_s'] / 1e12:.2f} TB/s, {v['sms']} SMs, {v['clock_hz'] / 1e9:.2f} GHz"
                     for d, v in r["issue_devices"].items() if d in devices)
    lines = [f"The decode K loop in SASS ({r['dtype']}, triton {r['triton']}, kernel {r['kernel']}, compiled "
             f"{rows[0]['compiled'][:10]}): instructions in the steady-state loop, warp instructions per weight "
             f"byte it streams, and the warp instructions per clock each SM must issue to stream the weight at "
             f"{share:.0%} of the device's bandwidth at its boost clock ({spec}). An SM issues at most 4 per "
             f"clock; target <= {ISSUE_TARGET:g}.", "",
             "| arch | config | loop instructions | weight bytes / iteration | warp instr. / byte | "
             + " | ".join(f"needed on {d}" for d in devices) + " | biggest families |",
             "|---|---|---|---|---|" + "---|" * len(devices) + "---|"]
    for x in rows:
        loop = x["main_loop"]
        need = x["needed_issue_per_clock_per_sm"]
        cells = [f"{need[d]:.2f}" + ("" if need[d] <= ISSUE_TARGET else " (missed)") if d in need else "-"
                 for d in devices]
        top = ", ".join(f"{k} {v}" for k, v in list(loop["ops"].items())[:4])
        _, bn, bk = (int(v) for v in x["config"].split()[1].split("x"))
        nbytes = bn * bk // 2 * {"fp32": 4}.get(r["dtype"], 2) + bn * (bk // 32) * 4  # values + int32 meta words
        lines.append(f"| sm_{x['arch']} | {x['config']} | {loop['instructions']} | {nbytes:,} | "
                     f"{x['warp_instructions_per_weight_byte']:.3f} | " + " | ".join(cells) + f" | {top} |")
    lines.append("")
    for d in devices:
        on = [x for x in rows if d in x["needed_issue_per_clock_per_sm"]]
        best = min(on, key=lambda x: x["needed_issue_per_clock_per_sm"][d])
        b = best["needed_issue_per_clock_per_sm"][d]
        ok = sum(x["needed_issue_per_clock_per_sm"][d] <= ISSUE_TARGET for x in on)
        lines.append(f"- {d}: best {best['config']} at {b:.2f} per clock, target <= {ISSUE_TARGET:g} "
                     f"{'met' if b <= ISSUE_TARGET else 'missed'} ({ok} of {len(on)} configs meet it).")
    return "\n".join(lines) + "\n"


# issue targets for SmolLM2-135M 2:4 with rotation (not measurements): the table says met or missed
ROTATION_TARGETS = {"sparsegpt": 58.0, "wanda": 80.0}


def rotation_quality() -> str:
    r = _load("rotation_quality.json")
    if r is None:
        return "_not measured yet: run `python benchmarks/rotation_quality.py`_\n"
    cal, ev, runs = r["calibration"], r["eval"], r["runs"]
    lines = [f"WikiText-2 raw test perplexity of {r['model']} at {r['pattern']}: seqlen {ev['seqlen']}, "
             f"{ev['tokens']:,} tokens ({ev['windows']}, BOS: {ev.get('bos', 'none')}); calibration {cal['nsamples']} "
             f"x {cal['seqlen']} tokens of {cal['file']} (seed {cal['seed']}, {cal.get('sampling', 'concat')} "
             f"sampling); {r['device']}, torch {r['torch']}, {r['date'][:10]}. "
             f"Dense: **{r['perplexity']['dense']:.2f}**.", "",
             "| method | rotation | R1 blocks | steps / layer | perplexity | rotate + prune | rotation steps/s "
             "(GFLOP/s) |", "|---|---|---|---|---|---|---|"]
    for run in sorted(runs.values(), key=lambda x: (x["method"] != "wanda", x["objective"] != "none", x["objective"],
                                                    x["blocks"], x["steps"])):
        rot = run["objective"] != "none"
        lines.append(f"| {run['method']} | {run['objective'] if rot else '-'} | {run['blocks'] if rot else '-'} | "
                     f"{run['steps']} | {run['perplexity']:.1f} | {run['seconds'] / 60:.1f} min | "
                     + (f"{run['steps_per_s']} ({run['gflop_per_s']:.0f})" if run.get("gflop_per_s") else "-")
                     + " |")
    lines.append("")
    for method, target in ROTATION_TARGETS.items():
        rotated = [x for x in runs.values() if x["method"] == method and x["objective"] != "none"]
        if rotated:
            best = min(rotated, key=lambda x: x["perplexity"])
            verdict = "met" if best["perplexity"] <= target else "missed"
            lines.append(f"- {method} + rotation, best {best['perplexity']:.1f} "
                         f"({best['objective']}, {best['steps']} steps): target <= {target:g} {verdict}.")
        by = {x["objective"]: x["perplexity"] for x in runs.values()
              if x["method"] == method and x["blocks"] == 1 and x["steps"] == 100}
        if "nm" in by and "entropy" in by:
            lines.append(f"- {method}, 100 steps, full R1: nm {by['nm']:.1f} vs entropy {by['entropy']:.1f}: "
                         f"the 2:4-aware objective is {'lower' if by['nm'] < by['entropy'] else 'NOT lower'}.")
    dec = r.get("decode", {})
    if "sparsegpt/none" in dec and "sparsegpt/nm/b1/100" in dec:
        a, b = dec["sparsegpt/none"], dec["sparsegpt/nm/b1/100"]
        lines.append(f"- CPU decode, batch 1, {a['new_tokens']} tokens, `{a['backend']}` backend: unrotated "
                     f"{a['tokens_per_s']:.1f} tok/s, rotated {b['tokens_per_s']:.1f} tok/s (the rotation costs "
                     f"{100 * (a['tokens_per_s'] / b['tokens_per_s'] - 1):+.1f}% time per token).")
    ref = r.get("paper_reference")
    if ref:
        lines.append(f"- Paper ({ref['model']}, seqlen {ref['seqlen']}, dense {ref['dense']}): 2:4 Wanda "
                     f"{ref['wanda']['none']} -> {ref['wanda']['entropy']}, SparseGPT {ref['sparsegpt']['none']} -> "
                     f"{ref['sparsegpt']['entropy']} with rotation.")
    return "\n".join(lines) + "\n"


def gemma3_bos() -> str:
    r = _load("gemma3_bos.json")
    if r is None:
        return "_not measured yet: run `python benchmarks/gemma3_bos.py`_\n"
    ppl, t = r["perplexity"], r["target"]
    return (f"Dense {r['model']} on the first {r['max_tokens']:,} tokens of {r['data']}, seqlen {r['seqlen']}; "
            f"{r['device']}, torch {r['torch']}, {r['date'][:10]}:\n\n"
            "| BOS | perplexity | tokens scored |\n|---|---|---|\n"
            + "".join(f"| {'per window' if k == 'window' else 'per document (reference protocol)'} | "
                      f"{v['ppl']:.2f} | {v['tokens']:,} |\n" for k, v in ppl.items())
            + f"\nTarget: BOS per window within {t['within']:.0%} of {t['ppl']}: "
              f"{'met' if t['met'] else 'missed'}.\n")


def serve() -> str:
    r = _load("serve_bench.json")
    if r is None:
        return "_not measured yet: run `python benchmarks/serve_bench.py`_\n"
    d, lt, st = r["decode_tokens_per_s"], r["load_test"], r["settings"]
    ok = lambda v, target: f"{v:.2f}x ({'meets' if v >= target else 'misses'} the {target}x target)"
    return "\n".join([
        f"{r['model']} ({r['dtype']}), greedy, {st['tokens']} tokens per sequence, median of {st['repeats']} runs; "
        f"{r['device']}, torch {r['torch']}, {r['date'][:10]}.", "",
        "| decode | tokens/s |", "|---|---|",
        f"| transformers `generate`, batch 1 | {d['hf_generate_b1']:.1f} |",
        f"| engine, batch 1 | {d['engine_b1']:.1f} |",
        f"| engine, batch 8 (aggregate) | {d['engine_b8']:.1f} |", "",
        f"Engine batch 1 vs `generate`: {ok(r['engine_b1_vs_hf'], 1.5)}; batch 8 vs batch 1: "
        f"{ok(r['engine_b8_vs_b1'], 4)}. Load test over HTTP: {lt['requests'] - lt['failed']}/{lt['requests']} "
        f"requests ok ({lt['failed']} failed) from {lt['clients']} concurrent clients, max_tokens {lt['max_tokens']}, "
        f"max batch {lt['max_batch']}: {lt['requests_per_s']:.1f} requests/s, latency p50 {lt['latency_p50_s']:.2f} s, "
        f"p90 {lt['latency_p90_s']:.2f} s, p99 {lt['latency_p99_s']:.2f} s.",
    ]) + "\n"


TABLES = {"prune_quality": prune_quality, "gemma3_bos": gemma3_bos, "serve": serve, "prune_speed": prune_speed,
          "decode": decode, "prefill": prefill, "kernel_resources": kernel_resources, "decode_issue": decode_issue,
          "rotation_quality": rotation_quality}


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
