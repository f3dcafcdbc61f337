"""Render the result tables of the README and the docs pages from the JSON files under benchmarks/results/.

    python -m benchmarks.tables          # rewrite the marked blocks of README.md and docs/*.md in place
    python -m benchmarks.tables --check  # exit 1, naming the pages, if any block differs from its JSON
    python -m benchmarks.tables --print  # print every table

No page holds a number typed by hand: each table sits between ``<!-- table:NAME -->`` and ``<!-- /table -->``
(every table on exactly one page), and tests/test_readme_tables.py fails when a page differs from what this
renders.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import re
import sys

from .common import RESULTS, ROOT, SINK, date_span, quant_parts
from .cpu_kernels import DENSE_INT8, SPARSE_INT8, fastest

BLOCK = re.compile(r"(<!-- table:(\w+) -->\n)(.*?)(<!-- /table -->)", re.S)
DECODE_BOUND = 16 / 9  # 2:4 fp16 moves 9/16 of the dense weight bytes: the decode speedup bytes allow


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def pages() -> list:
    """The pages whose table blocks this renders: the README and every docs page."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def measured_by(script: str):
    """A table rendered from ``results/<script>.json``; until that file exists, a line naming the script to run."""
    def wrap(render):
        @functools.wraps(render)
        def table() -> str:
            r = _load(f"{script}.json")
            return f"_not measured yet: run `python -m benchmarks.{script}`_\n" if r is None else render(r)
        return table
    return wrap


@measured_by("prune_quality")
def prune_quality(r: dict) -> str:
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
    repro = [(k, v, ppl[k]) for k, v in r.get("reference_code", {}).items() if k in ppl]
    if repro and cal.get("sampling") == "reference" and cal["seed"] == 0:
        lines += ["", "The reference Wanda/SparseGPT code on this protocol (as quoted in issue 15): "
                  + "; ".join(f"{k.replace('/', ' ')} {v} (here {mine:.2f}, {100 * (mine - v) / v:+.2f}%)"
                              for k, v, mine in repro) + "."]
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
    """The newest ``prefix*.json`` result by the date it records (file names say nothing reliable about it)."""
    runs = [_load(f.name) for f in RESULTS.glob(f"{prefix}*.json")]
    dated = [r for r in runs if isinstance(r, dict) and r.get("date")]
    return max(dated, key=lambda r: datetime.datetime.fromisoformat(r["date"].replace("Z", "+00:00")).timestamp(),
               default=None)


def gpu_pending(what: str) -> str:
    return (f"_No GPU measurement committed yet for {what}: no GPU machine has been lent to a session since this "
            "code was written. `benchmarks/gpu_check.sh` runs it (see docs/gpu_check.md)._\n")


def decode() -> str:
    r = _latest("kernels-")
    if r is None:
        return gpu_pending("the decode kernels (`python -m benchmarks.kernels`)")
    rows = [row for row in r["rows"] if row["dtype"] == "fp16"]
    shapes = list(dict.fromkeys((row["N"], row["K"]) for row in rows))
    bandwidth = r["copy_bandwidth_GBps"] * 1e9
    lines = [f"fp16, speedup over dense cuBLAS (median of CUDA-event timings) and, for `triton`, its time beside the "
             f"floor its bytes set (weight values and metadata, x, y at the measured copy bandwidth, "
             f"{r['copy_bandwidth_GBps']:.0f} GB/s); {r['device']}, torch {r['torch']}, "
             f"triton {r['triton']}, {r['date'][:10]}. Bound at decode: {DECODE_BOUND:.2f}x.", "",
             "| M | " + " | ".join(f"{n}x{k}" for n, k in shapes) + " |", "|---" * (len(shapes) + 1) + "|"]
    for m in sorted({row["M"] for row in rows}):
        cells = []
        for n, k in shapes:
            at = {row["provider"]: row for row in rows if (row["N"], row["K"], row["M"]) == (n, k, m)}
            t, d = at.get("triton"), at.get("dispatch")
            cell = (f"{t['speedup_vs_dense']:.2f}x ({t['ms'] * 1e3:.1f} us, floor {t['bytes'] / bandwidth * 1e6:.1f} us)"
                    if t else "-")
            cells.append(cell + (f", auto {d['speedup_vs_dense']:.2f}x" if d else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def prefill() -> str:
    r = _latest("prefill-")
    if r is None:
        return gpu_pending("prefill (`python -m benchmarks.prefill`)")
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
        return "_not generated: run `python -m benchmarks.kernel_report`_\n"
    current = r.get("kernel")
    lines = [f"Compiled ahead of time (no GPU), {r['dtype']}, triton {r['triton']}, {r['date'][:10]}; "
             f"{r['specialisation']}.", "",
             "Shared memory against the arch's per-block limit; 'pruned': the launch's estimate "
             "(`ops.triton_plan.smem_estimate`) exceeds it, so the autotuner never tries it."
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
        return "_not generated: run `python -m benchmarks.kernel_report --only decode`_\n"
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
        # values + int32 meta words (rows from before the report stored it; quantized rows store theirs)
        nbytes = x.get("weight_bytes_per_iteration", bn * bk // 2 * {"fp32": 4}.get(r["dtype"], 2) + bn * (bk // 32) * 4)
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


@measured_by("rotation_quality")
def rotation_quality(r: dict) -> str:
    cal, ev, runs = r["calibration"], r["eval"], r["runs"]
    lines = [f"WikiText-2 raw test perplexity of {r['model']} at {r['pattern']}: seqlen {ev['seqlen']}, "
             f"{ev['tokens']:,} tokens ({ev['windows']}, BOS: {ev.get('bos', 'none')}); calibration {cal['nsamples']} "
             f"x {cal['seqlen']} tokens of {cal['file']} (seed {cal['seed']}, {cal.get('sampling', 'concat')} "
             f"sampling); {r['device']}, torch {r['torch']}, {date_span(r)} (rows name their CPU where recorded). "
             f"Dense: **{r['perplexity']['dense']:.2f}**.", "",
             "| method | rotation | R1 blocks | steps / layer | perplexity | rotate + prune | rotation steps/s "
             "(GFLOP/s) |", "|---|---|---|---|---|---|---|"]
    own = lambda x: x.get("importance", x["method"]) == x["method"]  # rotated on the pruning method's own scores
    scores_of = lambda x: ("" if own(x) else f" on {x['importance']} scores") + (
        f", LS refit {x['refit']}" if x.get("refit") else "")  # the kept weights re-solved on the mask
    threads = lambda x: x.get("threads", 1)  # runs recorded before the field: the report's one thread
    fp32 = lambda x: ", fp32 products" if x.get("rotation_dtype") == "float32" else ""  # before the field: bf16
    cpu = lambda x: f", {x['cpu']}" if x.get("cpu") else ""
    wall = lambda x: f"{x['seconds'] / 60:.1f} min ({threads(x)} thread{'s' * (threads(x) > 1)}{fp32(x)}{cpu(x)})"
    for run in sorted(runs.values(), key=lambda x: (x["method"] != "wanda", x["objective"] != "none", x["objective"],
                                                    not own(x), x["blocks"],
                                                    x["steps"], x.get("refit", 0), threads(x))):
        rot = run["objective"] != "none"
        lines.append(f"| {run['method']} | {run['objective'] if rot else '-'}{scores_of(run)} | "
                     f"{run['blocks'] if rot else '-'} | {run['steps']} | {run['perplexity']:.1f} | {wall(run)} | "
                     + (f"{run['steps_per_s']} ({run['gflop_per_s']:.0f})" if run.get("gflop_per_s") else "-")
                     + " |")
    lines.append("")
    for method, target in ROTATION_TARGETS.items():
        rotated = [x for x in runs.values() if x["method"] == method and x["objective"] != "none"]
        if rotated:
            best = min(rotated, key=lambda x: x["perplexity"])
            config = lambda x: (x["objective"], x.get("importance", method), x["blocks"], x["steps"], x.get("refit", 0))
            samples = [x for x in rotated if config(x) == config(best)]  # the same run on other thread counts
            met = sum(x["perplexity"] <= target for x in samples)
            verdict = "met" if met == len(samples) else f"met by {met} of {len(samples)} samples" if met else "missed"
            each = "; ".join(f"{x['perplexity']:.2f} on {threads(x)} thread{'s' * (threads(x) > 1)}{fp32(x)}"
                             for x in samples)
            lines.append(f"- {method} + rotation, best {best['perplexity']:.2f} "
                         f"({best['objective']}{scores_of(best)}, {best['steps']} steps"
                         + (f"; samples: {each}" if len(samples) > 1 else "") + f"): target <= {target:g} {verdict}.")
        by = {}  # per objective, its best 100-step full-R1 run on the method's own scores
        for x in runs.values():
            if x["method"] == method and x["blocks"] == 1 and x["steps"] == 100 and own(x) and not x.get("refit"):
                by[x["objective"]] = min(by.get(x["objective"], x["perplexity"]), x["perplexity"])
        if "nm" in by and "entropy" in by:
            lines.append(f"- {method}, 100 steps, full R1: nm {by['nm']:.1f} vs entropy {by['entropy']:.1f}: "
                         f"the 2:4-aware objective is {'lower' if by['nm'] < by['entropy'] else 'NOT lower'}.")
    timed = [x for x in runs.values() if x["method"] == "sparsegpt" and x["objective"] != "none" and x["steps"] >= 100]
    # per machine: the time depends on whether the CPU multiplies bf16 natively (runs before the field: not recorded)
    fastest = {}
    for x in timed:
        group = (x["blocks"], x.get("cpu", ""))
        if group not in fastest or x["seconds"] < fastest[group]["seconds"]:
            fastest[group] = x
    for (blocks, machine), fast in sorted(fastest.items(), key=lambda g: g[0]):
        lines.append(f"- Whole rotate-and-prune run, SparseGPT, {fast['steps']} steps per layer, R1 "
                     f"{'full' if blocks == 1 else f'{blocks} blocks'} ({fast['objective']}{scores_of(fast)}): "
                     f"{wall(fast)}{'' if machine else ', CPU model not recorded'}, target "
                     f"< 15 min {'met' if fast['seconds'] < 900 else 'missed'}.")
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


@measured_by("gemma3_bos")
def gemma3_bos(r: dict) -> str:
    ppl, t = r["perplexity"], r["target"]
    return (f"Dense {r['model']} on the first {r['max_tokens']:,} tokens of {r['data']}, seqlen {r['seqlen']}; "
            f"{r['device']}, torch {r['torch']}, {r['date'][:10]}:\n\n"
            "| BOS | perplexity | tokens scored |\n|---|---|---|\n"
            + "".join(f"| {'per window' if k == 'window' else 'per document (reference protocol)'} | "
                      f"{v['ppl']:.2f} | {v['tokens']:,} |\n" for k, v in ppl.items())
            + f"\nTarget: BOS per window within {t['within']:.0%} of {t['ppl']}: "
              f"{'met' if t['met'] else 'missed'}.\n")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


@measured_by("engine")
def engine(r: dict) -> str:
    st, vs = r["settings"], r["variants"]
    ok = lambda v, target: f"{v:.2f}x ({'meets' if v >= target else 'misses'} the {target}x target)"
    batches = st["batches"]
    eager = lambda v: f"{v['decode_tokens_per_s']['engine_eager_b1']:.1f} | " if st.get("compile") else ""
    # each variant's own peak above its process's baseline (load, compile, decode, read before anything else allocates)
    peak = lambda v: v["memory"]["above_baseline_bytes"]
    rows = [f"| {name} | {v['decode_tokens_per_s']['hf_generate_b1']:.1f} | {eager(v)}"
            + " | ".join(f"{v['decode_tokens_per_s'][f'engine_b{b}']:.1f}" for b in batches)
            + f" | {v['prefill_tokens_per_s']:.0f} | {v['ttft_s'] * 1000:.0f} | {_gib(peak(v))} |"
            for name, v in vs.items()]
    lines = [f"{r['model']} ({r['dtype']}, {r['weights']} weights), greedy, {st['tokens']} tokens per sequence after a "
             f"{st['decode_prompt_tokens']}-token prompt, median of {st['repeats']} runs; engine decode step "
             f"{'compiled (torch.compile)' if st.get('compile') else 'eager'}; prefill and time to first "
             f"token on {st['prompt_tokens']}-token prompts (prefill at batch {st['prefill_batch']}); 2:4 = every "
             f"decoder linear magnitude-pruned, backend `{r['backend']}`; {r['device']}, torch {r['torch']}, "
             f"{r['date'][:10]}.", "",
             "| model | `generate` b1 tok/s | " + ("eager engine b1 tok/s | " if st.get("compile") else "")
             + " | ".join(f"engine b{b} tok/s" for b in batches) + " | prefill tok/s | TTFT ms | peak above baseline |",
             "|---|" + "---|" * (len(batches) + 4 + bool(st.get("compile"))), *rows, ""]
    for name, v in vs.items():
        text = f"{name}: engine batch 1 vs `generate` {ok(v['engine_b1_vs_hf'], 1.5)}"
        if "read_bytes_per_s" in v:
            gb = lambda b: f"{b / 1e9:.1f} GB/s"
            hf = v["model_bytes"] * v["decode_tokens_per_s"]["hf_generate_b1"]
            text += (f"; it streams the weights at {gb(v['engine_b1_bytes_per_s'])} (`generate`: {gb(hf)}), "
                     f"{v['engine_b1_bytes_per_s'] / v['read_bytes_per_s']:.0%} of the machine's read bandwidth "
                     f"({gb(v['read_bytes_per_s'])}: at most {v['b1_bound_tokens_per_s']:.1f} tok/s at batch 1)")
        if "engine_b8_vs_b1" in v:
            text += f"; batch 8 vs batch 1 {ok(v['engine_b8_vs_b1'], 4)}"
        m = v["memory"]
        code = f" (read after importing the code, {_gib(m['library_code_bytes'])})" if "library_code_bytes" in m else ""
        text += (f"; loading, compiling and decoding it peaks {_gib(m['above_baseline_bytes'])} above its "
                 f"process's baseline{code}, {m['above_baseline_bytes'] / v['model_bytes']:.1f}x the model's "
                 f"{_gib(v['model_bytes'])} (target <= {m['target_ratio']}x it + the KV cache's "
                 f"{_gib(m['kv_cache_bytes'])} = {_gib(m['budget_bytes'])}: {'met' if m['met'] else 'missed'})")
        if "first_decode_call_s" in v:
            text += f"; first decode call (compiling) {v['first_decode_call_s']:.0f} s"
        lines.append(text + ".")
    if "sparse_b1_vs_dense" in r:
        lines.append(f"2:4 vs dense: batch-1 decode {r['sparse_b1_vs_dense']:.2f}x, peak memory "
                     f"above the baseline {r['sparse_peak_vs_dense']:.2f}x of dense.")
    if "sparse_b1_vs_dense_max_autotune" in r:
        lines.append(f"2:4 vs dense, both max-autotune: batch-1 decode {r['sparse_b1_vs_dense_max_autotune']:.2f}x.")
    h2h = r.get("head_to_head")
    if h2h:
        base, other = h2h["variants"]
        tps = h2h["tokens_per_s"]
        lines.append(f"Head to head in one process, runs alternating ({h2h['rounds']} rounds, median): {other} "
                     f"{tps[other]:.1f} tok/s vs {base} {tps[base]:.1f} at batch 1, {h2h['ratio']:.2f}x.")
    if "sparse_int8_b1_vs_dense" in r:  # issue 32's targets
        head_to_head = h2h_int8(r)  # the ratio slow spells cannot skew, where it was measured
        vs_int8 = r.get("sparse_int8_b1_vs_dense_int8") if head_to_head is None else head_to_head
        lines.append(f"2:4 + int8 (int8 head) vs dense: batch-1 decode {r['sparse_int8_b1_vs_dense']:.2f}x (target 3x: "
                     f"{'met' if r['sparse_int8_b1_vs_dense'] >= 3 else 'missed'})"
                     + ("" if vs_int8 is None else f"; vs dense int8: {vs_int8:.2f}x"
                                                   + ("" if head_to_head is None else " head to head")
                                                   + f" (target: faster: {'met' if vs_int8 > 1 else 'missed'})")
                     + ".")
    return "\n".join(lines) + "\n"


@measured_by("serve_load")
def serve_load(r: dict) -> str:
    lo, ov = r["load"], r["overload"]
    ms = lambda d: " / ".join(f"{d[q] * 1000:.0f}" for q in ("p50", "p90", "p99"))
    return "\n".join([
        f"{r['model']} behind `sparse-runtime serve` (max batch {r['max_batch']}); {r['device']}, {r['date'][:10]}.", "",
        "| run | requests | ok | failed | requests/s | tokens/s | latency p50 / p90 / p99 ms | TTFT p50 / p90 / p99 ms |",
        "|---|---|---|---|---|---|---|---|",
        f"| load: {lo['clients']} clients, {lo['max_tokens']} tokens each | {lo['requests']} | "
        f"{lo['requests'] - lo['failed']} | {lo['failed']} | {lo['requests_per_s']:.2f} | "
        f"{lo['generated_tokens_per_s']:.1f} | {ms(lo['latency_s'])} | {ms(lo['ttft_s'])} |", "",
        f"Overload (max batch {ov['max_batch']}, max queue {ov['max_queue']}, filled with {ov['admitted']} requests, "
        f"then {ov['extra_requests']} more at once): {ov['rejected_503']} answered 503 "
        f"({ov['rejected_with_retry_after']} with Retry-After, {ov['other']} other answers), slowest rejection "
        f"{ov['rejection_latency_max_s'] * 1000:.0f} ms ({'meets' if ov['rejection_latency_max_s'] <= 0.1 else 'misses'} "
        f"the 100 ms target); {ov['admitted_ok']}/{ov['admitted']} admitted requests completed.",
    ]) + "\n"


ALLOCATION_ORDER = ("uniform", "owl", "alphapruning", "atp")


@measured_by("allocation_quality")
def allocation_quality(r: dict) -> str:
    cal, ev, val = r["calibration"], r["eval"], r["validation"]
    label = f" **{r['label']}**:" if r.get("label") else ""
    lines = [f"{label} WikiText-2 raw test perplexity of {r['model']} ({r['blocks']} blocks), unstructured: seqlen "
             f"{ev['seqlen']}, {ev.get('tokens', 0):,} tokens (BOS: {ev.get('bos', 'none')}); calibration "
             f"{cal['nsamples']} x {cal['seqlen']} tokens of {cal['file']} ({cal['sampling']} sampling, seed "
             f"{cal['seed']}); ATP's beta chosen on {val['windows']} x {val['seqlen']} held-out {val['file']} tokens "
             f"({val['documents']}); {r['device']}, torch {r['torch']}, {r['date'][:10]}. Dense: **{r['dense']:.2f}**.",
             "", "| method | sparsity | " + " | ".join(ALLOCATION_ORDER) + " | ATP beta (trials, search time) |",
             "|---|---|" + "---|" * (len(ALLOCATION_ORDER) + 1)]
    cells = sorted({tuple(k.split("/")[:2]) for k in r["rows"]}, key=lambda c: (c[0] != "wanda", c[0], float(c[1])))
    for method, sparsity in cells:
        row = {a: r["rows"].get(f"{method}/{sparsity}/{a}") for a in ALLOCATION_ORDER}
        atp = row["atp"]
        search = (f"{atp['beta']:.3f} ({atp['trials']}, {atp['search_seconds'] / 60:.1f} min)" if atp else "-")
        lines.append(f"| {method} | {float(sparsity):.0%} | "
                     + " | ".join(f"{v['ppl']:.1f}" if v else "-" for v in row.values()) + f" | {search} |")
    lines.append("")
    for method, sparsity in cells:
        row = {a: r["rows"].get(f"{method}/{sparsity}/{a}") for a in ALLOCATION_ORDER}
        if method == "wanda" and sparsity == "0.7" and row["atp"] and row["uniform"]:
            cut = 1 - row["atp"]["ppl"] / row["uniform"]["ppl"]
            owl = row["owl"]
            order = ("-" if owl is None else "met" if row["atp"]["ppl"] <= owl["ppl"] < row["uniform"]["ppl"]
                     else "missed")
            lines.append(f"- Wanda 70%: ATP {cut:.0%} below uniform (target >= 30%: "
                         f"{'met' if cut >= 0.3 else 'missed'}); ATP <= OWL < uniform: "
                         f"{order if owl else 'OWL not run'}; beta search {row['atp']['search_seconds'] / 60:.1f} min "
                         f"(target < 15 min on the 2-core CPU: {'met' if row['atp']['search_seconds'] < 900 else 'missed'}).")
    plans = r.get("plans", {})
    if plans:
        lines += ["", "| plan (2:4 Wanda per linear, rest dense) | 2:4 share of weights | predicted speedup | perplexity |",
                  "|---|---|---|---|"]
        for key, v in sorted(plans.items(), key=lambda kv: (kv[0] == "all", kv[0])):
            lines.append(f"| {key} | {v['fraction_24']:.1%} | {v['predicted_speedup']:.3f}x | {v['ppl']:.1f} |")
        lines.append("")
        for fraction in sorted({k.split("/")[0] for k in plans if "/" in k}):
            ours = plans.get(f"{fraction}/error_depth")
            rivals = {k: v for k, v in plans.items() if k.startswith(fraction + "/") and k != f"{fraction}/error_depth"}
            if ours and rivals:
                lower = all(ours["ppl"] < v["ppl"] for v in rivals.values())
                faster = {k.split("/", 1)[1]: v["predicted_speedup"] - ours["predicted_speedup"]
                          for k, v in rivals.items() if v["predicted_speedup"] > ours["predicted_speedup"] + 0.005}
                if not lower:
                    verdict = "does NOT beat every naive plan"
                elif faster:
                    verdict = ("has a lower perplexity than every naive plan, but not at equal predicted speedup: "
                               + ", ".join(f"{k} runs at +{d:.3f}x" for k, d in faster.items()))
                else:
                    gap = ours["predicted_speedup"] - min(v["predicted_speedup"] for v in rivals.values())
                    verdict = ("beats every naive plan at equal predicted speedup (each filled up to the plan's, "
                               f"short of it by at most {gap:.3f}x: less than one more linear)")
                lines.append(f"- {float(fraction):.0%} of weights 2:4: the plan ({ours['ppl']:.1f}) {verdict} "
                             f"(best naive {min(v['ppl'] for v in rivals.values()):.1f}).")
    return "\n".join(lines) + "\n"


@measured_by("tp_memory")
def tp_memory(r: dict) -> str:
    w = r["world"]
    lines = [f"Tensors each process holds after loading a checkpoint ({r['pattern']}; {r['dtype']}), one process "
             f"against {w} ranks; {r['device']}, torch {r['torch']}, {r['date'][:10]}:", "",
             "| model | sparse weights, 1 process | per rank | rank / whole | replicated rest, per rank |",
             "|---|---|---|---|---|"]
    mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
    for name, m in r["models"].items():
        whole = m["single"]["sparse"]
        ranks = [x["sparse"] for x in m["ranks"]]
        lines.append(f"| {name} | {mib(whole)} | {' / '.join(mib(b) for b in ranks)} | "
                     f"{' / '.join(f'{b / whole:.3f}' for b in ranks)} | {mib(m['ranks'][0]['other'])} |")
    return "\n".join(lines) + "\n"


@measured_by("memory")
def memory(r: dict) -> str:
    mb = lambda b: f"{b / 2**20:.0f}"
    lines = [f"{r['model']}, peak resident memory above the interpreter's baseline (torch, transformers, "
             f"sparse_runtime and the model's transformers code imported), each row a fresh process; one forward "
             f"over {r['settings']['tokens']} tokens, {r['settings']['threads']} thread(s); {r['device']}, "
             f"torch {r['torch']}, {r['date'][:10]}.", "",
             "| load | checkpoint tensors (MiB) | load peak (MiB) | after one forward (MiB) | peak / tensors |",
             "|---|---|---|---|---|"]
    for name, row in r["rows"].items():
        lines.append(f"| {name} | {mb(row['tensor_bytes'])} | {mb(row['load_peak_bytes'])} | "
                     f"{mb(row['forward_peak_bytes'])} | {row['load_peak_bytes'] / row['tensor_bytes']:.2f} |")
    t = r["target"]
    yes = lambda v: "yes" if v else "no"
    if t:
        lines += ["", f"Target: the 2:4 `reference` load at most {t['max_ratio']}x its tensor bytes "
                      f"({t['ratio']:.2f}x) and below the dense load that has read its weights "
                      f"({yes(t['below_dense'])}; after one forward: {yes(t['below_dense_after_forward'])}; "
                      f"below transformers' mapped dense load, which has read no weight yet: "
                      f"{yes(t['below_lazy_dense'])}): "
                      f"{'met' if t['met'] else 'missed'}."]
    return "\n".join(lines) + "\n"


@measured_by("host_overhead")
def host_overhead(r: dict) -> str:
    st = r["settings"]
    lines = [f"One eager `SparseLinear` call on the `{st['backend']}` backend, {st['n']}x{st['k']} {st['dtype']}, "
             f"{st['stubbed']} stubbed: median of {st['repeats']} batches of {st['calls']} "
             f"calls, process CPU time; {r['device']}, Python {r['python']}, torch {r['torch']}, {r['date'][:10]}.",
             "", "| M | SparseLinear call (us) | backend's share (us) | wall (us) |", "|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['m']} | {row['sparse_linear_us']:.2f} | {row['backend_forward_us']:.2f} | "
                     f"{row['wall_sparse_linear_us']:.2f} |")
    worst = max(row["sparse_linear_us"] for row in r["rows"])
    lines += ["", f"Target <= {r['target_us']} us per call: {'met' if worst <= r['target_us'] else 'missed'} "
                  f"(worst {worst:.2f} us)."]
    return "\n".join(lines) + "\n"


def mmasp_issue() -> str:
    r = _load("kernel_report.json")
    rows = (r or {}).get("mmasp") or []
    if not rows:
        return "_not generated: run `python -m benchmarks.kernel_report --mmasp`_\n"
    current = r.get("mmasp_kernel")
    devices = list(dict.fromkeys(d for x in rows for d in x.get("needed_issue_per_clock_per_sm", {})))
    lines = [f"The CUDA kernel `csrc/mmasp.cu` (nvcc, kernel {current}, compiled {rows[0]['compiled'][:10]}), "
             f"the same measure as above: instructions in the steady-state loop of one warp per weight byte that "
             f"warp streams (each warp owns its 16 rows), and the rate needed for {r['bandwidth_share']:.0%} of "
             f"the bandwidth; target <= {ISSUE_TARGET:g}."
             + (" (*): compiled from another version of the source." if any(x.get("kernel") != current for x in rows)
                else ""), "",
             "| arch | instantiation | registers | static shared | spilled | loop instructions | weight bytes / iteration | "
             "warp instr. / byte | " + " | ".join(f"needed on {d}" for d in devices) + " | biggest families |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(devices) + "---|"]
    for x in rows:
        loop = x.get("main_loop") or {"instructions": "-", "ops": {}}
        need = x.get("needed_issue_per_clock_per_sm", {})
        cells = [(f"{need[d]:.2f}" + ("" if need[d] <= ISSUE_TARGET else " (missed)")) if d in need else "-"
                 for d in devices]
        spill = x.get("local", 0) + sum(v for k, v in x["ops"].items() if k.startswith(("LDL", "STL")))
        top = ", ".join(f"{k} {v}" for k, v in list(loop["ops"].items())[:4])
        stale = " (*)" if x.get("kernel") != current else ""
        lines.append(f"| sm_{x['arch']} | {x['config']}{stale} | {x.get('reg')} | {x.get('shared', 0)} B + x slice | "
                     f"{'yes' if spill else 'no'} | {loop['instructions']} | {x.get('weight_bytes_per_iteration', '-'):,} | "
                     f"{x.get('warp_instructions_per_weight_byte', 0):.4f} | " + " | ".join(cells) + f" | {top} |")
    lines.append("")
    for d in devices:
        worst = max((x for x in rows if d in x.get("needed_issue_per_clock_per_sm", {})),
                    key=lambda x: x["needed_issue_per_clock_per_sm"][d])
        w = worst["needed_issue_per_clock_per_sm"][d]
        lines.append(f"- {d}: every instantiation needs at most {w:.2f} per clock ({worst['config']}), target <= "
                     f"{ISSUE_TARGET:g} {'met' if w <= ISSUE_TARGET else 'missed'}.")
    return "\n".join(lines) + "\n"


ROTATIONS = {"nm": "2:4-aware rotation", "entropy": "entropy rotation"}


def cpu_kernels() -> str:
    """Per linear on the CPU: the 2:4 kernel against the best dense path, with the bytes it read per second."""
    r = _load("cpu_kernels_fp32.json")
    if r is None:
        return "_not measured yet: run `python -m benchmarks.cpu_kernels`_\n"
    cells = {(x["shape"], x["m"], x["provider"]): x for x in r["rows"]}
    lines = [f"{r['dtype']}, per layer, median of >= 5 passes over a stack of distinct layers >= 4x the "
             f"{r['llc_bytes'] >> 20} MiB last-level cache; bandwidth: the faster of torch's sum and the kernels' own "
             f"read over {r['probe_bytes'] >> 20} MiB, read between each row's own timed passes (the VM's bandwidth "
             f"moves within a run; {r['read_bandwidth_gbps']:.1f} GB/s at its start); best dense = the faster of "
             f"`F.linear` (MKL/oneDNN) and the inductor-compiled frozen linear where timed; byte bound at decode "
             f"32/17 = 1.88x; {r['device']}, kernel ISA {r['best_isa']}, torch {r['torch']}, {r['date'][:10]} "
             f"(`python -m benchmarks.cpu_kernels`).", "",
             "| N x K | M | dense `F.linear` us | compiled us | 2:4 us | 2:4 GB/s (of the bandwidth then) | "
             "2:4 vs best dense |", "|---|---|---|---|---|---|---|"]
    for (shape, m, provider), x in cells.items():
        if provider != "cpu24":
            continue
        compiled = cells.get((shape, m, "compiled"))
        compiled = "-" if compiled is None else f"{compiled['us']:.1f}"
        lines.append(f"| {shape} | {m} | {cells[shape, m, 'dense']['us']:.1f} | {compiled} | {x['us']:.1f} | "
                     f"{x['gbps']:.1f} ({x['bandwidth_fraction']:.0%} of {x['read_bandwidth_gbps']:.1f}) | "
                     f"**{x['speedup_vs_best_dense']:.2f}x** |")
    llama = {"4096x4096", "1024x4096", "14336x4096", "4096x14336"}
    at = lambda m: [x for x in r["rows"] if x["provider"] == "cpu24" and x["m"] == m and x["shape"] in llama]  # noqa
    lines.append("")
    for m, target, what in ((1, 1.7, "1.7x"), (8, 1.3, "1.3x"), (512, 1.0, "no slower than dense")):
        rows = at(m)
        if rows:
            lo, hi = min(x["speedup_vs_best_dense"] for x in rows), max(x["speedup_vs_best_dense"] for x in rows)
            met = sum(x["speedup_vs_best_dense"] >= target for x in rows)
            extra = ""
            if m == 1:
                frac = min(x["bandwidth_fraction"] for x in rows)
                extra = f"; lowest share of the read bandwidth {frac:.0%} (target 80%: {'met' if frac >= 0.8 else 'missed'})"
            lines.append(f"- Llama-3-8B shapes at M = {m}: {lo:.2f}x to {hi:.2f}x the best dense path, target {what}: "
                         f"met by {met} of {len(rows)}{extra}.")
    quant = [(shape, m) for (shape, m, provider) in cells if provider == "cpu24-int8"]
    if quant:
        us = lambda shape, m, p: cells[shape, m, p]["us"] if (shape, m, p) in cells else None  # noqa: E731
        opt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        best = lambda shape, m, ps: fastest({p: us(shape, m, p) for p in ps if (shape, m, p) in cells}, ps)  # noqa
        lines += ["", "Quantized values (`--quant`), decode sizes: the 2:4 kernel on int8 codes (per-row scales) and int4 "
                  "codes (grouped scales), against dense fp32 (the best dense path) and the faster of two dense int8 "
                  "paths: torch's weight-only int8 kernel (`torch._weight_int8pack_mm`; with fp32 activations, as here, "
                  "it is far slower than its bf16 path) and the engine's compiled one (`int8_matmul` under "
                  "`torch.compile`). At the `--compiled` M the 2:4 int8 layers also run compiled (the cpu24 op inside "
                  "one graph, as in the engine), so that neither side pays Python per layer; the ratios take each "
                  "side's faster path.", "",
                  "| N x K | M | best dense fp32 us | dense int8 us | compiled int8 us | 2:4 fp32 us | 2:4 int8 us | "
                  "compiled 2:4 int8 us | 2:4 int4 us | 2:4 int8 vs dense fp32 | 2:4 int8 vs best dense int8 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for shape, m in quant:
            x8 = cells[shape, m, "cpu24-int8"]
            fp32, s8 = x8["us"] * x8["speedup_vs_best_dense"], best(shape, m, SPARSE_INT8)
            lines.append(f"| {shape} | {m} | {fp32:.1f} | {us(shape, m, 'dense-int8'):.1f} | "
                         f"{opt(us(shape, m, 'compiled-int8'))} | {us(shape, m, 'cpu24'):.1f} | {x8['us']:.1f} | "
                         f"{opt(us(shape, m, 'compiled-cpu24-int8'))} | {opt(us(shape, m, 'cpu24-int4'))} | "
                         f"{fp32 / s8:.2f}x | {best(shape, m, DENSE_INT8) / s8:.2f}x |")
        rows = [shape for shape in llama if (shape, 1, "cpu24-int8") in cells]
        if rows:
            fp32 = [cells[sh, 1, "cpu24-int8"]["us"] * cells[sh, 1, "cpu24-int8"]["speedup_vs_best_dense"]
                    / best(sh, 1, SPARSE_INT8) for sh in rows]
            int8 = [best(sh, 1, DENSE_INT8) / best(sh, 1, SPARSE_INT8) for sh in rows]
            compiled = all((sh, 1, "compiled-int8") in cells for sh in rows)
            lines += ["", f"- Llama-3-8B shapes at M = 1, 2:4 + int8: {min(fp32):.2f}x to {max(fp32):.2f}x dense fp32 "
                      f"(target 4x: met by {sum(v >= 4 for v in fp32)} of {len(rows)}), {min(int8):.2f}x to "
                      f"{max(int8):.2f}x the best dense int8 "
                      f"({'compiled and torch kernel' if compiled else 'torch kernel only: compiled not run'}; "
                      f"target 1.4x: met by {sum(v >= 1.4 for v in int8)} of {len(rows)})."]
    return "\n".join(lines) + "\n"


def _bold_if(value: float, win: bool) -> str:
    return f"**{value:.1f}**" if win else f"{value:.1f}"


def headline() -> str:
    """Quality, speed and memory of the 2:4 model, each against its dense original and its bound."""
    rot, e, mem = (_load(f"{n}.json") for n in ("rotation_quality", "engine", "memory"))
    if None in (rot, e, mem):
        return "_not measured yet: run the rotation quality, engine and memory benchmarks (docs/results.md)_\n"
    best = min((x for x in rot["runs"].values() if x["objective"] != "none"), key=lambda x: x["perplexity"])
    plain = [x["perplexity"] for x in rot["runs"].values()
             if x["method"] == best["method"] and x["objective"] == "none" and not x.get("refit")]
    refit = f" + LS refit {best['refit']}" if best.get("refit") else ""
    target = ROTATION_TARGETS.get(best["method"])
    dense_ppl, threads = rot["perplexity"]["dense"], best.get("threads", 1)
    where = f"cpu ({best['cpu']}, {threads} thread{'s' * (threads > 1)})" if best.get("cpu") else rot["device"]
    dense, sparse = e["variants"]["dense"], e["variants"]["2:4"]
    q8s, q8d = e["variants"].get("2:4-int8"), e["variants"].get("dense-int8")
    b1 = lambda v: v["decode_tokens_per_s"]["engine_b1"]  # noqa: E731
    eager = lambda v: v["decode_tokens_per_s"].get("engine_eager_b1", float("nan"))  # noqa: E731
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    read, ref = mem["rows"]["dense, weights read"], mem["rows"]["2:4 reference"]
    return "\n".join([
        "| | dense | 2:4 | bound | measured on |", "|---|---|---|---|---|",
        f"| quality: WikiText-2 perplexity of {rot['model']} (lower is better) | {dense_ppl:.2f} | "
        f"**{best['perplexity']:.2f}** ({best['method']}, {ROTATIONS[best['objective']]}{refit}"
        + (f"; {min(plain):.1f} without rotation" if plain else "") + f") | the dense model's {dense_ppl:.2f}"
        + (f"; target <= {target:g}: {'met' if best['perplexity'] <= target else 'missed'}" if target else "")
        + f" | {where}, {date_span(rot)} |",
        f"| speed: decode tokens/s of {e['model']} ({e['dtype']}), engine at batch 1 | {b1(dense):.1f} | "
        + (f"{_bold_if(b1(sparse), b1(sparse) > b1(dense))} ({b1(sparse) / b1(dense):.2f}x, on the `cpu` kernels; eager engine "
           f"{eager(sparse):.1f} vs {eager(dense):.1f}, {eager(sparse) / eager(dense):.2f}x) | "
           f"{dense['b1_bound_tokens_per_s']:.1f} / {sparse['b1_bound_tokens_per_s']:.1f} tok/s (the CPU's read "
           f"bandwidth over the dense / 2:4 model's bytes; embeddings and lm_head stay dense)"
           if sparse.get("backends") == ["cpu"] else
           f"{b1(sparse):.1f} ({b1(sparse) / b1(dense):.2f}x: the CPU runs 2:4 on dense weights, so this is "
           f"noise, not sparsity) | {dense['b1_bound_tokens_per_s']:.1f} tok/s (the CPU's read bandwidth over the "
           f"dense bytes)")
        + f"; on a GPU {DECODE_BOUND:.2f}x dense, not yet measured | {e['device']}, {e['date'][:10]} |",
        *([f"| speed, quantized: decode tokens/s at batch 1, int8 weights and head | {b1(q8d):.1f} (dense int8) | "
           f"**{b1(q8s):.1f}** (2:4 + int8: {b1(q8s) / b1(dense):.2f}x dense {e['dtype']}, {b1(q8s) / b1(q8d):.2f}x dense "
           f"int8{'' if h2h_int8(e) is None else f'; {h2h_int8(e):.2f}x head to head in one process'}) | {q8s['b1_bound_tokens_per_s']:.1f} tok/s (the CPU's read bandwidth over its bytes) | "
           f"{e['device']}, {e['date'][:10]} |"] if q8s and q8d else []),
        f"| memory: peak resident memory loading {mem['model']} | {mib(read['load_peak_bytes'])} (weights read) | "
        f"{mib(ref['load_peak_bytes'])} (`reference` backend) | {mib(ref['tensor_bytes'])}: the 2:4 checkpoint's "
        f"tensors (target <= {mem['target']['max_ratio']}x them: {'met' if mem['target']['met'] else 'missed'}) | "
        f"{mem['device']}, {mem['date'][:10]} |",
    ]) + "\n"


def h2h_int8(e: dict) -> float | None:
    """The engine report's head-to-head 2:4-int8 / dense-int8 ratio (one process, runs alternating), if measured."""
    h2h = e.get("head_to_head")
    return h2h["ratio"] if h2h and h2h["variants"] == ["dense-int8", "2:4-int8"] else None


@measured_by("recovery")
def recovery(r: dict) -> str:
    cal, ev, tr = r["calibration"], r["eval"], r["training"]
    dense = r["perplexity"]["dense"]
    lines = [f"Recovery of {r['model']} at 2:4, masks frozen: WikiText-2 raw test perplexity (seqlen {ev['seqlen']}, "
             f"{ev['tokens']:,} tokens) and TinyStories before and after, each row one run; training windows from "
             f"{tr['file']} ({tr['documents']}), each row's batch of windows per step, AdamW at the row's peak "
             f"lr with warm-up and cosine decay; starting points calibrated on {cal['nsamples']} x "
             f"{cal['seqlen']} tokens (seed {cal['seed']}); {r['device']}, torch {r['torch']}, {date_span(r)}. "
             f"Dense: **{dense['wikitext2']:.2f}** (TinyStories {dense['tinystories']:.2f}).", "",
             "| row | loss | lr | windows per step | tokens | training time | tokens/s | WikiText-2 before -> after "
             "| TinyStories before -> after | target |", "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for key, row in r["rows"].items():
        t = r["targets"][row["start"]]
        summed = " (summed over layers)" if row["loss"] == "block" else ""
        gradual = row.get("schedule")
        loss = f"{row['loss']}, gradual ({gradual['steps']} prunes)" if gradual else row["loss"]
        loss += " (+ embeddings)" if row.get("embeddings") else ""
        loss += ", no checkpointing" if row.get("checkpointing") is False else ""
        loss += f", best evaluation kept ({row['kept']['tokens']:,} tokens)" if row.get("kept") else ""
        before = row["before"] or {"wikitext2": dense["wikitext2"], "tinystories": dense["tinystories"]}
        lines.append(f"| {key} | {loss} | {row['lr']:g} | {row['batch']} x {row['seqlen']} | "
                     f"{row['tokens']:,}{summed} | {row['seconds'] / 60:.1f} min | "
                     f"{row['tokens_per_s']:,} | {'dense ' if gradual else ''}{before['wikitext2']:.2f} -> "
                     f"**{row['after']['wikitext2']:.2f}** | {before['tinystories']:.2f} -> "
                     f"{row['after']['tinystories']:.2f} | {_recovery_target(t, row)} |")
        if gradual and "oneshot_kd" in row:
            one = row["oneshot_kd"]
            notes.append(f"{key} against one-shot {row['start']} + KD at equal tokens ({row['tokens']:,}): WikiText-2 "
                         f"{row['after']['wikitext2']:.2f} vs {one['after']['wikitext2']:.2f}, TinyStories "
                         f"{row['after']['tinystories']:.2f} vs {one['after']['tinystories']:.2f}, in "
                         f"{row['seconds'] / 60:.1f} vs {one['seconds'] / 60:.1f} min (pruning time included).")
    lines += ["", "The curve of each run (its own evaluations, with the training time at each point): "
              "`benchmarks/results/recovery.png`. A gradual row starts dense and prunes as it trains (its time "
              "includes the prunes)."] + ([""] + notes if notes else [])
    return "\n".join(lines) + "\n"


def _recovery_target(t: dict, row: dict) -> str:
    verdict = {True: "met", False: "missed", None: "no reference row yet"}[row["target_met"]]
    if "of" not in t:
        return f"<= {t['ppl']:g} within {t['seconds'] / 60:g} min: {verdict}"
    ref = row.get("reference")
    against = f"{ref['row']} ({ref['wikitext2']:.2f})" if ref else f"{t['of']} at equal settings"
    return f"within {t['within']:.0%} of {against}: {verdict}"


QUANT_TARGETS = {"int8": 0.01, "int4": 0.10}  # issue 32: 2:4 + scheme within this of 2:4 fp32 (same rotation)


@measured_by("sink_weight")
def sink_weight(r: dict) -> str:
    cal, ev, ppl = r["calibration"], r["eval"], r["perplexity"]
    what = {"rtn": "round to nearest", "gptq": "GPTQ, every token alike",
            "gptq-sink": f"GPTQ, first token x {r['sink_weight']} in k/v", "gptq-sink-all":
            f"GPTQ, first token x {r['sink_weight']} in every linear"}
    lines = [f"WikiText-2 raw test perplexity of {r['model']} (seqlen {ev['seqlen']}, {ev['tokens']:,} tokens) with the "
             f"named linears int4 (groups of {r['group_size']}, absmax scales), each solved on the dense model's "
             f"inputs, the rest dense; calibration {cal['nsamples']} x {cal['seqlen']} tokens (seed {cal['seed']}); "
             f"{r['device']}, torch {r['torch']}, {r['date'][:10]}. Dense: **{ppl['dense']:.2f}**.", "",
             "| linears | quantizer | perplexity | vs dense |", "|---|---|---|---|"]
    for spec, v in ppl.items():
        if spec != "dense":
            quantizer, kind = spec.split(":")
            lines.append(f"| {kind} | {what[quantizer]} | {v:.2f} | {v / ppl['dense'] - 1:+.1%} |")
    return "\n".join(lines) + "\n"


@measured_by("quant_quality")
def quant_quality(r: dict) -> str:
    cal, ev, runs = r["calibration"], r["eval"], r["runs"]
    lines = [f"WikiText-2 raw test perplexity of {r['model']} (seqlen {ev['seqlen']}, {ev['tokens']:,} tokens), "
             f"calibration {cal['nsamples']} x {cal['seqlen']} tokens (seed {cal['seed']}); int4 groups of "
             f"{r['group_size']} input columns; 2:4 rows SparseGPT with LS refit {r['refit']} (quantized in its sweep; "
             f"`-after`: the full-precision prune, then GPTQ on its fixed masks), dense rows GPTQ; absmax scales "
             f"(`-search`: each group's clipped scale of least rounding error); `-sink`: the first token of each "
             f"calibration window weighs the window's length in the key and value projections' Hessians; "
             f"{r['device']}, torch {r['torch']}, {date_span(r)}.", "",
             "| run | method | perplexity | vs 2:4 fp32 (same rotation, sink) | time | target |", "|---|---|---|---|---|---|"]
    for spec, x in runs.items():
        scheme, after, search, sink = quant_parts(x["quant"])
        base = runs.get(f"2:4/fp32{SINK if sink else ''}/{x['rotation']}")
        rel = x["perplexity"] / base["perplexity"] - 1 if base and x["prune"] == "2:4" else None
        limit = QUANT_TARGETS.get(scheme) if rel is not None else None
        target = f"within {limit:.0%}: {'met' if rel <= limit else 'missed'}" if limit is not None else ""
        method = f"{x['method']}, then gptq" if after else x["method"] or "-"
        method += (", searched scales" if search else "") + (", sink-weighted" if sink else "")
        lines.append(f"| {spec} | {method} | {x['perplexity']:.2f} | "
                     f"{'' if rel is None or scheme == 'fp32' else f'{rel:+.1%}'} | "
                     f"{x['seconds'] / 60:.1f} min ({x['threads']} threads, {x['cpu']}) | {target} |")
    return "\n".join(lines) + "\n"


TABLES = {"headline": headline, "cpu_kernels": cpu_kernels, "tp_memory": tp_memory, "prune_quality": prune_quality, "memory": memory, "gemma3_bos": gemma3_bos,
          "engine": engine, "serve_load": serve_load, "prune_speed": prune_speed,
          "decode": decode, "prefill": prefill, "kernel_resources": kernel_resources, "decode_issue": decode_issue,
          "mmasp_issue": mmasp_issue, "host_overhead": host_overhead,
          "rotation_quality": rotation_quality, "allocation_quality": allocation_quality, "recovery": recovery,
          "quant_quality": quant_quality, "sink_weight": sink_weight}


def render(text: str) -> str:
    def sub(m):
        if m.group(2) not in TABLES:
            raise SystemExit(f"a page names an unknown table {m.group(2)!r}")
        return m.group(1) + TABLES[m.group(2)]() + m.group(4)
    return BLOCK.sub(sub, text)


def stale() -> list:
    """The pages whose table blocks differ from what the results render."""
    return [page for page in pages() if render(page.read_text()) != page.read_text()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = p.add_mutually_exclusive_group()
    what.add_argument("--check", action="store_true", help="only say which pages are stale (exit 1 if any)")
    what.add_argument("--print", action="store_true", help="print every table instead")
    args = p.parse_args(argv)
    if args.print:
        for name, fn in TABLES.items():
            print(f"## {name}\n{fn()}")
        return 0
    if args.check:
        for page in stale():
            print(f"stale: {os.path.relpath(page, ROOT)}")
        return 1 if stale() else 0
    for page in stale():
        page.write_text(render(page.read_text()))
        print(f"updated {os.path.relpath(page, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
