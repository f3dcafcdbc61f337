"""Time and peak memory to prune a model layer by layer with each method.

CPU (default): SmolLM2-135M, modest calibration (stated in the JSON):
    python -m benchmarks.prune_speed --nsamples 16 --seqlen 512 --threads 1
GPU: a Llama-3-8B-shaped model with random bf16 weights (built on the meta device, materialised on the CPU,
pruned one decoder layer at a time on cuda; targets: Wanda < 5 min, SparseGPT < 15 min, peak < 8 GB):
    python -m benchmarks.prune_speed --llama3-8b-shape --nsamples 128 --seqlen 2048
Writes benchmarks/results/prune_speed[_llama3_8b].json.
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import psutil
import torch

from sparse_runtime.data.calibration import DEFAULT_CALIB, calibration_windows
from sparse_runtime.prune import prune

from .common import RESULTS, metadata, write_json

# Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json)
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.start = self.proc.memory_info().rss

        def sample():
            while not self.stop.wait(0.02):
                self.peak = max(self.peak, self.proc.memory_info().rss)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def llama3_8b_shaped(layers: int | None, dtype=torch.bfloat16):
    """The Llama-3-8B architecture with random weights: built on meta, then filled on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": layers or LLAMA3_8B["num_hidden_layers"]})
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        model.model.rotary_emb.__init__(config)  # inv_freq is a buffer: recompute it after to_empty
    return model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--llama3-8b-shape", action="store_true", help="random-weight Llama-3-8B-shaped model")
    p.add_argument("--layers", type=int, default=None, help="with --llama3-8b-shape: build only this many layers")
    p.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    p.add_argument("--pattern", default="2:4")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--offload", action="store_true", help="keep calibration activations on the CPU")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the dev box is shared)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.llama3_8b_shape:
        t0 = time.perf_counter()
        model = llama3_8b_shaped(args.layers)
        build_s = time.perf_counter() - t0
        name = f"llama3-8b-shape (random bf16, {model.config.num_hidden_layers} layers)"
        calib = torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen),
                              generator=torch.Generator().manual_seed(0))
        original = None  # 16 GB: rebuild instead of keeping a copy
    else:
        from sparse_runtime.models.sources import load_model

        model, tok = load_model(args.model)
        build_s, name = None, args.model
        calib = calibration_windows(tok, DEFAULT_CALIB, args.nsamples, args.seqlen, seed=0,
                                    max_seqlen=model.config.max_position_embeddings)
        original = {k: v.clone() for k, v in model.state_dict().items()}
    cuda = args.device.startswith("cuda")
    report = {
        "model": name, **metadata(args.device, note="" if cuda else "shared machine"), "pattern": args.pattern, "nsamples": calib.shape[0], "seqlen": calib.shape[1],
        "offload": args.offload, "model_build_seconds": build_s, "runs": {},
        "targets": {"wanda_seconds": 300, "sparsegpt_seconds": 900, "peak_device_bytes": 8e9} if cuda else None,
    }
    out = Path(args.out or RESULTS / ("prune_speed_llama3_8b.json" if args.llama3_8b_shape else "prune_speed.json"))
    res = None
    for i, method in enumerate(args.methods):
        if i and original is not None:
            model.load_state_dict(original)
        elif i:
            del model, res  # 16 GB of weights and 7 GB of masks: free before rebuilding
            model = llama3_8b_shaped(args.layers)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            res = prune(model, method, args.pattern, calib=calib, device=args.device, offload=args.offload)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        report["runs"][method] = {
            "seconds": round(seconds, 2), "seconds_per_layer": round(seconds / model.config.num_hidden_layers, 3),
            "peak_device_bytes": res.peak_device_bytes,
            "peak_rss_bytes": mem.peak, "rss_increase_bytes": mem.peak - mem.start,
        }
        full = LLAMA3_8B["num_hidden_layers"]
        if args.llama3_8b_shape and model.config.num_hidden_layers < full:
            # Layers cost the same (same shapes), so the full model's time scales with the layer count.
            report["runs"][method][f"seconds_{full}_layers_scaled"] = round(seconds / model.config.num_hidden_layers * full, 1)
        print(method, json.dumps(report["runs"][method]), flush=True)
        write_json(out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
