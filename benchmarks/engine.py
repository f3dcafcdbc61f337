"""Generation engine vs transformers' ``generate``, dense vs 2:4: decode tokens/s at several batch sizes,
prefill tokens/s, time to first token and peak memory.

    python -m benchmarks.engine --threads 1                       # SmolLM2-135M on the CPU, ~5 minutes
    python -m benchmarks.engine --config llama3-8b --device cuda  # Llama-3-8B shapes, random fp16 weights

Decode tokens/s = batch * (N - 1) / (time for N tokens - time for 1 token): prefill and the first token
cancel. Runs are greedy with EOS ignored, so each makes exactly N tokens; each time is the median of
--repeats runs (CUDA events on a GPU). Time to first token = one request's prompt of --prompt-tokens
tokens with max_tokens 1; prefill tokens/s = --prefill-batch such prompts / their time. Peak memory: each
variant runs in a fresh process, which loads the model, compiles and decodes (its first decode call at batch 1,
then a call at the largest batch) and reads its peak before anything else it measures (``generate``, the eager
engine, the bandwidth buffer) allocates: the peak RSS (CPU; torch's peak allocation on CUDA) above the process's
baseline after imports (the model architecture's transformers code and torch's compiler included: code, the same
for any model size), against MEMORY_TARGET x the model's bytes + the engines' KV caches. The bound at batch 1 is
the machine's read bandwidth (a sum over 1 GiB) over the model's bytes, since each token reads every weight once.
The 2:4 variant is a checkpoint (--sparse, or every decoder linear sparsified by magnitude and saved first: speed
does not depend on which weights are kept), loaded as a user serving it would. A ``-max-autotune`` variant (CPU)
compiles with frozen weights, the dense ones prepacked for inductor's GEMM template
(``Engine(compile="max-autotune")``): the fastest dense decode inductor offers. Targets (issue 11): engine batch 1
>= 1.5x ``generate``; batch 8 aggregate >= 4x batch 1; on a GPU, 2:4 batch 1 >= 1.5x dense and peak memory below
dense; (issue 29) peak above the baseline <= MEMORY_TARGET x model bytes + KV cache. Writes
benchmarks/results/engine.json. ``dense-int8`` holds every linear, the embedding and the lm_head as int8 codes
(weight-only, ``nn.int8_dense.quantize_dense``); ``2:4-int8`` is a checkpoint (--sparse-int8, or magnitude 2:4 with
int8 values and an int8 head, saved first). Target (issue 32): 2:4-int8 batch 1 >= 3x dense and faster than
dense-int8. ``--head-to-head dense-int8 2:4-int8`` also times two variants' batch-1 decode in one process, their
runs alternating, for a ratio that a shared machine's slow spells (seconds at half speed) cannot skew the way they
can skew two separate processes; the table reports it beside the per-process numbers.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sparse_runtime.data.calibration import DEFAULT_EVAL
from sparse_runtime.format.quant import QuantScheme
from sparse_runtime.nn.int8_dense import quantize_dense
from sparse_runtime.models.sources import load_model
from sparse_runtime.nn.linear import SparseLinear
from sparse_runtime.models.checkpoint import save_pretrained
from sparse_runtime.nn.sparsify import sparsify
from sparse_runtime.ops.triton_launch import bucket_rows
from sparse_runtime.serving.engine import Engine, Request, SamplingParams

from .common import RESULTS, metadata, module_command, module_env, write_json

MEMORY_TARGET = 1.5  # issue 29: peak above the process's baseline <= this x the model's bytes, plus the KV cache

# What each variant runs, one row per variant: sparse = the 2:4 checkpoint (else the dense model); int8 = int8
# values and head (dense: quantize_dense; 2:4: the --sparse-int8 checkpoint); compile = its
# Engine(compile=...) mode (absent: --compile's).
VARIANTS = {
    "dense": {},
    "2:4": {"sparse": True},
    "dense-max-autotune": {"compile": "max-autotune"},
    "2:4-max-autotune": {"sparse": True, "compile": "max-autotune"},
    "dense-int8": {"int8": True},
    "2:4-int8": {"sparse": True, "int8": True},
}

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)


INT8 = {"quant": QuantScheme("int8"), "head": "int8"}  # the 2:4-int8 variant's sparsify options


class NullTokenizer:
    """What the engine needs from a tokenizer, for models with random weights (their tokens mean nothing)."""
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


def build(args, path=None):
    """(model, tokenizer, prompt ids) of the dense model, or of the checkpoint at ``path``."""
    if args.config == "llama3-8b":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B))
        model = model.to_empty(device=args.device).to(getattr(torch, args.dtype))
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        model.eval()
        g = torch.Generator().manual_seed(0)
        return model, NullTokenizer(), torch.randint(0, LLAMA3_8B["vocab_size"], (args.prompt_tokens,), generator=g).tolist()
    model, tok = load_model(path or args.model, device=args.device, dtype=getattr(torch, args.dtype))
    text = Path(args.prompt_file).read_text(encoding="utf-8")
    ids = tok(text[: 20 * args.prompt_tokens])["input_ids"][: args.prompt_tokens]
    return model, tok, ids


def checkpoint(args, variant: str) -> str | None:
    """The folder a sparse variant loads (None: the dense model, or --config's random weights)."""
    spec = VARIANTS[variant]
    return None if not spec.get("sparse") or args.config else args.sparse_int8 if spec.get("int8") else args.sparse


def load_variant(args, variant: str):
    """(model, tokenizer, prompt ids) as ``variant`` runs them."""
    spec, path = VARIANTS[variant], checkpoint(args, variant)
    sparse, int8 = spec.get("sparse", False), spec.get("int8", False)
    model, tok, ids = build(args, path)
    if sparse and not path:  # --config: random weights, no checkpoint
        sparsify(model, backend=args.backend, progress=False, **(INT8 if int8 else {}))
    if int8 and not sparse:
        quantize_dense(model)
    if sparse and args.backend != "auto":
        for m in model.modules():
            if isinstance(m, SparseLinear):
                m.set_backend(args.backend)
    return model, tok, ids


def head_to_head(args, variants: list[str], rounds: int) -> dict:
    """Batch-1 decode of ``variants`` in one process, each compiled engine's runs alternating with the others' (the
    order reversed every round): a slow spell of a shared machine then falls on all of them, where a variant alone in
    its process can catch one alone. Each round times --tokens and 1 token per variant: ms per token is their
    difference over --tokens - 1, as in :func:`measure`."""
    runs, n = {}, args.tokens
    for variant in variants:
        model, tok, ids = load_variant(args, variant)
        prompt = ids[: args.decode_prompt_tokens]
        engine = Engine(model, tok, max_batch=1, max_seq_len=len(prompt) + n + 1,
                        compile=VARIANTS[variant].get("compile", args.compile))
        runs[variant] = lambda tokens, engine=engine, prompt=prompt: engine.generate(
            [Request(list(prompt), SamplingParams(max_tokens=tokens, ignore_eos=True))])
    ms = {v: [] for v in variants}
    with torch.inference_mode():
        for run in runs.values():
            run(2), run(2)  # compile, warm up
        for r in range(rounds):
            for variant in variants if r % 2 == 0 else variants[::-1]:
                t0 = time.perf_counter()
                runs[variant](n)
                t1 = time.perf_counter()
                runs[variant](1)
                ms[variant].append(((t1 - t0) - (time.perf_counter() - t1)) / (n - 1) * 1e3)
    tok_s = {v: 1e3 / statistics.median(x) for v, x in ms.items()}
    return {"variants": variants, "rounds": rounds, "ms_per_token": ms, "tokens_per_s": tok_s,
            "ratio": tok_s[variants[1]] / tok_s[variants[0]]}


def timer(device: str):
    """Median seconds of ``fn()`` over ``repeats`` runs: CUDA events on a GPU, perf_counter on the CPU."""
    def median(fn, repeats: int) -> float:
        times = []
        for _ in range(repeats):
            if device.startswith("cuda"):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return median


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak(device: str) -> int:
    """Reset the peak-memory counter; return the memory in use now (the baseline the peak includes)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
    return _status_bytes("VmRSS")


def peak_bytes(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else _status_bytes("VmHWM")


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def import_library_code(args, path=None) -> int:
    """Import the code any model of this architecture runs before the baseline is read: transformers' modeling
    module of the model's architecture and torch's compiler. Code is the same for a model of any size, not the
    model's memory (on this machine it is ~150 MiB of RSS, a third of it shared libraries). Returns the RSS it
    added, recorded beside the peak."""
    before = _status_bytes("VmRSS")
    import torch._inductor.compile_fx  # noqa: F401  (what the first compiled call would import)
    from transformers import LlamaConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from sparse_runtime.models.loading import read_config
    from sparse_runtime.models.sources import resolve

    MODEL_FOR_CAUSAL_LM_MAPPING[LlamaConfig if args.config else type(read_config(resolve(path or args.model)))]
    return _status_bytes("VmRSS") - before


def memory_report(baseline: int, peak: int, model: int, kv_cache: int, library_code: int = 0) -> dict:
    """The variant's peak above its process's baseline against the budget of MEMORY_TARGET x model bytes + KV cache;
    ``library_code``: what importing the code (:func:`import_library_code`) added before the baseline."""
    above, budget = peak - baseline, int(MEMORY_TARGET * model) + kv_cache
    return {"baseline_bytes": baseline, "library_code_bytes": library_code, "peak_bytes": peak,
            "above_baseline_bytes": above, "kv_cache_bytes": kv_cache, "target_ratio": MEMORY_TARGET,
            "budget_bytes": budget, "met": above <= budget}


def read_bandwidth(device: str, median, repeats: int, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a sum over ``nbytes`` of float32, far beyond any cache: what streaming the weights can reach."""
    buf = torch.ones(nbytes // 4, device=device)
    buf.sum()
    return nbytes / median(buf.sum, repeats)


def warm_up(model, rows) -> None:
    """One eager call of every SparseLinear per M specialisation of each of ``rows``' buckets, before the engine
    captures its CUDA graphs (where compiling, autotuning, plan searches and dispatch measurements fail or are
    skipped): Triton compiles and autotunes, cuSPARSELt searches, the dispatcher measures."""
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    with torch.inference_mode():
        for m in sorted({r for n in rows for r in bucket_rows(n)}):
            for layer in layers:
                layer(torch.zeros(m, layer.in_features, dtype=layer.dtype,
                                  device=layer.weight_values.device))


def measure(model, tok, ids, args, median, dense: bool, compile=None, baseline: int = 0,
            library_code: int = 0) -> dict:
    """The variant's rates; its peak memory above ``baseline`` (:func:`reset_peak` before loading) is read first,
    after the compiled engine's first decode calls, before anything else here allocates."""
    n, rep = args.tokens, args.repeats
    compile = args.compile if compile is None else compile
    slots, ctx = max(args.batches + [args.prefill_batch]), len(ids) + n + 1
    engines = {}
    if args.device.startswith("cuda"):  # the decode graphs run max_batch rows: each batch's engine, or slots
        warm_up(model, {*args.batches, slots})

    def engine_for(batch):
        """One engine for every batch size, except under CUDA graphs, which always run max_batch rows."""
        key = batch if compile and args.device.startswith("cuda") else slots
        if key not in engines:
            engines[key] = Engine(model, tok, max_batch=key, max_seq_len=ctx, compile=compile)
        return engines[key]

    def engine_run(batch, tokens, prompt, engine=None):
        engine = engine or engine_for(batch)
        return lambda: engine.generate([Request(list(prompt), SamplingParams(max_tokens=tokens, ignore_eos=True))
                                        for _ in range(batch)])

    def rate(make, batch):
        make(batch, 2)()  # warm-up
        return batch * (n - 1) / (median(make(batch, n), rep) - median(make(batch, 1), rep))

    short = ids[: args.decode_prompt_tokens]
    x = torch.tensor([short], device=next(model.parameters()).device)
    hf = lambda batch, tokens: lambda: model.generate(x.expand(batch, -1), max_new_tokens=tokens,
                                                      min_new_tokens=tokens, do_sample=False)
    out = {"decode_tokens_per_s": {}, "model_bytes": model_bytes(model)}
    with torch.inference_mode():
        t0 = time.perf_counter()
        engine_run(1, 2, short)()
        out["first_decode_call_s"] = time.perf_counter() - t0  # includes compiling the decode step
        engine_run(max(args.batches), 2, short)()  # the largest batch's decode (and its compile, where it has one)
        out["memory"] = memory_report(baseline, peak_bytes(args.device), out["model_bytes"],
                                      sum(e.cache.nbytes for e in engines.values()), library_code)
        out["decode_tokens_per_s"]["hf_generate_b1"] = rate(hf, 1)
        if compile:  # the eager engine too, to show what compiling buys
            eager = Engine(model, tok, max_batch=1, max_seq_len=ctx)
            out["decode_tokens_per_s"]["engine_eager_b1"] = rate(lambda bb, t: engine_run(bb, t, short, eager), 1)
        for b in args.batches:
            out["decode_tokens_per_s"][f"engine_b{b}"] = rate(lambda bb, t: engine_run(bb, t, short), b)
            print(f"  engine batch {b}: {out['decode_tokens_per_s'][f'engine_b{b}']:.1f} tok/s", flush=True)
        engine_run(1, 1, ids)()
        out["ttft_s"] = median(engine_run(1, 1, ids), rep)
        out["prefill_tokens_per_s"] = args.prefill_batch * len(ids) / median(engine_run(args.prefill_batch, 1, ids), rep)
    d = out["decode_tokens_per_s"]
    out["engine_b1_vs_hf"] = d["engine_b1"] / d["hf_generate_b1"]
    out["backends"] = sorted({m.active_backend for m in model.modules() if isinstance(m, SparseLinear)})
    if dense or set(out["backends"]) <= {"cpu"}:  # batch-1 decode reads every weight once per token (a short
        # sequence's KV cache is negligible); the cpu kernels read what the layer holds, the compressed weight
        # (the decompressed backend reads a dense copy it does not count)
        out["read_bytes_per_s"] = read_bandwidth(args.device, median, rep)
        out["engine_b1_bytes_per_s"] = out["model_bytes"] * d["engine_b1"]
        out["b1_bound_tokens_per_s"] = out["read_bytes_per_s"] / out["model_bytes"]
    if "engine_b8" in d:
        out["engine_b8_vs_b1"] = d["engine_b8"] / d["engine_b1"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--config", choices=("llama3-8b",), help="build this shape with random weights instead of --model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 on the CPU")
    ap.add_argument("--backend", default="auto", help="SparseLinear backend of the 2:4 variant")
    ap.add_argument("--variants", nargs="+", default=["dense", "2:4"], choices=tuple(VARIANTS))
    ap.add_argument("--sparse", help="the 2:4 variant's checkpoint (default: --model sparsified by magnitude, saved "
                                     "to a temporary folder)")
    ap.add_argument("--sparse-int8", help="the 2:4-int8 variant's checkpoint (default: --model sparsified by "
                                          "magnitude, int8 values and head, saved to a temporary folder)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=17, help="tokens per sequence in the decode runs")
    ap.add_argument("--decode-prompt-tokens", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=256, help="prompt of the prefill / TTFT runs")
    ap.add_argument("--prefill-batch", type=int, default=8)
    ap.add_argument("--prompt-file", default=str(DEFAULT_EVAL), help="prompts are the start of this text")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="compile the engine's decode step (torch.compile; CUDA graphs on CUDA)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", default="", help="recorded beside the device, e.g. 'shared machine'")
    ap.add_argument("--out", default=str(RESULTS / "engine.json"))
    ap.add_argument("--head-to-head", nargs=2, metavar=("BASE", "VARIANT"), choices=tuple(VARIANTS),
                    help="also time these two variants' batch-1 decode in one process, alternating run by run "
                         "(a ratio a shared machine's slow spells cannot skew), --repeats x 4 rounds")
    ap.add_argument("--part", help=argparse.SUPPRESS)  # internal: run the one variant, write its result here
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    if 1 not in args.batches:
        ap.error("--batches must include 1 (the ratios are against batch 1)")
    torch.set_num_threads(args.threads)
    median = timer(args.device)
    report = {
        "model": args.config or args.model, "weights": "random (normal 0.02)" if args.config else "trained",
        "dtype": args.dtype, "backend": args.backend, **metadata(args.device, args.note),
        "settings": {k: getattr(args, k) for k in ("tokens", "decode_prompt_tokens", "prompt_tokens", "prefill_batch",
                                                   "batches", "repeats", "compile")},
        "variants": {},
    }
    if args.part:  # one variant in this fresh process, so its peak memory is its own
        (variant,) = args.variants
        library_code = import_library_code(args, checkpoint(args, variant))
        baseline = reset_peak(args.device)
        model, tok, ids = load_variant(args, variant)
        res = measure(model, tok, ids, args, median, dense=not VARIANTS[variant].get("sparse"),
                      compile=VARIANTS[variant].get("compile"), baseline=baseline, library_code=library_code)
        write_json(args.part, res)
        return 0
    argv = sys.argv[1:] if argv is None else list(argv)
    tmp = tempfile.TemporaryDirectory(prefix="engine-2of4-")
    wanted = args.variants + (args.head_to_head or [])
    if any(VARIANTS[v].get("sparse") and not VARIANTS[v].get("int8") for v in wanted) and not args.sparse \
            and not args.config:
        model, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
        sparsify(model, progress=False)
        save_pretrained(model, tmp.name, tokenizer=tok)
        del model
        argv += ["--sparse", tmp.name]
        args.sparse = tmp.name
    tmp_int8 = tempfile.TemporaryDirectory(prefix="engine-2of4-int8-")
    if "2:4-int8" in wanted and not args.sparse_int8 and not args.config:
        model, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
        sparsify(model, progress=False, **INT8)
        save_pretrained(model, tmp_int8.name, tokenizer=tok)
        del model
        argv += ["--sparse-int8", tmp_int8.name]
        args.sparse_int8 = tmp_int8.name
    for variant in args.variants:
        print(f"{variant}:", flush=True)
        with tempfile.NamedTemporaryFile(suffix=".json") as part:
            subprocess.run([*module_command(__spec__.name), *argv, "--variants", variant, "--part", part.name], check=True,
                           env=module_env())
            report["variants"][variant] = json.loads(Path(part.name).read_text())
        print(json.dumps(report["variants"][variant], indent=2), flush=True)
    v = report["variants"]
    if "dense" in v and "2:4" in v:
        report["sparse_b1_vs_dense"] = v["2:4"]["decode_tokens_per_s"]["engine_b1"] / v["dense"]["decode_tokens_per_s"]["engine_b1"]
        report["sparse_peak_vs_dense"] = (v["2:4"]["memory"]["above_baseline_bytes"]
                                          / v["dense"]["memory"]["above_baseline_bytes"])
    if "dense-max-autotune" in v and "2:4-max-autotune" in v:
        report["sparse_b1_vs_dense_max_autotune"] = (v["2:4-max-autotune"]["decode_tokens_per_s"]["engine_b1"]
                                                     / v["dense-max-autotune"]["decode_tokens_per_s"]["engine_b1"])
    for base in ("dense", "dense-int8"):
        if "2:4-int8" in v and base in v:
            report[f"sparse_int8_b1_vs_{base.replace('-', '_')}"] = (
                v["2:4-int8"]["decode_tokens_per_s"]["engine_b1"] / v[base]["decode_tokens_per_s"]["engine_b1"])
    if args.head_to_head:
        print(f"head to head: {' vs '.join(args.head_to_head)}", flush=True)
        report["head_to_head"] = head_to_head(args, list(args.head_to_head), 4 * args.repeats)
        print(json.dumps(report["head_to_head"]["tokens_per_s"]), flush=True)
    out = write_json(args.out, report)
    plot(report, out.with_suffix(".png"))
    return 0


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for variant, res in report["variants"].items():
        d = res["decode_tokens_per_s"]
        bs = sorted(int(k[len("engine_b"):]) for k in d if k.startswith("engine_b"))
        ax.plot(bs, [d[f"engine_b{b}"] for b in bs], marker="o", label=f"engine, {variant}")
        ax.scatter([1], [d["hf_generate_b1"]], marker="x", s=60, label=f"transformers generate, {variant}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (sequences decoded together)")
    ax.set_ylabel("decode tokens/s (aggregate)")
    ax.set_title(f"{report['model']} ({report['dtype']}), {report['device']}\ntorch {report['torch']}, "
                 f"{report['date'][:10]}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
