"""Peak memory of loading a model: dense, and its 2:4 checkpoint on each CPU backend, then one forward.

    python benchmarks/memory.py [--model smollm2-135m] [--tokens 32] [--out benchmarks/results/memory.json]

Every load runs in a fresh subprocess. The child imports torch, transformers and sparse_runtime, reads its
resident set (the interpreter's baseline), resets the kernel's high-water mark (``/proc/self/clear_refs``),
loads, reads the peak (``VmHWM``), runs one forward over ``--tokens`` tokens and reads the peak again. The
baseline includes the model's transformers code (its config read and its class imported), not its tensors.
transformers' own dense load maps the safetensors file and reads the weights only as the first forward
touches them, so its load peak is small and the after-forward peak is where it pays; both are recorded. The
``dense, weights read`` row is the same load followed by the check ``load_pretrained`` makes of every tensor it
reads (no NaN/Inf): a load that has read its weights, as the 2:4 loads have, and the dense peak the target
compares against. On a GPU (``--device cuda``) it also records ``torch.cuda.max_memory_allocated``. The 2:4 checkpoint is the model
magnitude-pruned by ``sparsify`` and written by ``save_pretrained`` into a temporary folder first.

Target (issue 14): the 2:4 load on ``reference`` peaks at most 1.2x the checkpoint's tensor bytes above the
baseline, and below the dense load's peak. ``triton`` is left out on the CPU: under the interpreter one
forward of a 135M model takes many minutes, and it loads exactly as ``reference`` does.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.2


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(args) -> dict:
    """One measurement, in this (fresh) process; prints a JSON object."""
    import torch

    import sparse_runtime as sr

    from transformers import AutoConfig, AutoModelForCausalLM

    from sparse_runtime.models.skeleton import model_class
    from sparse_runtime.models.sources import resolve

    torch.set_num_threads(args.threads)
    dense = args.load in ("dense", "dense-read")
    folder = resolve(args.model) if dense else Path(args.load)
    model_class(AutoConfig.from_pretrained(folder))  # the model's code imported: part of the baseline, not the load
    baseline = _status_kib("VmRSS") << 10
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    cuda = args.device == "cuda"
    if dense:  # what load_model does for a dense folder, without the tokenizer
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model.to(args.device)
        if args.load == "dense-read":
            from sparse_runtime.models.skeleton import check_finite

            for name, t in model.state_dict().items():
                check_finite(name, t)
    else:
        model = sr.load_pretrained(args.load, device=args.device, backend=args.backend)
    load_peak = _status_kib("VmHWM") << 10
    cuda_load = torch.cuda.max_memory_allocated() if cuda else None
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids.to(args.device)).logits.sum().item()
    return {"baseline_bytes": baseline, "load_peak_bytes": load_peak - baseline,
            "forward_peak_bytes": (_status_kib("VmHWM") << 10) - baseline,
            "cuda_load_peak_bytes": cuda_load,
            "cuda_forward_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "backends": sorted({m.active_backend for m in model.modules() if isinstance(m, sr.SparseLinear)})}


def tensor_bytes(folder: Path) -> int:
    from sparse_runtime.models.tensor_files import TensorFiles

    files = TensorFiles(folder)
    return sum(torch_numel(files.shape(k)) * files.dtype(k).itemsize for k in files.keys())


def torch_numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _run_child(args, load: str, backend: str = "auto") -> dict:
    cmd = [sys.executable, __file__, "--child", "--load", load, "--backend", backend, "--model", args.model,
           "--tokens", str(args.tokens), "--threads", str(args.threads), "--device", args.device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def _write_checkpoint(model_name: str, out: Path) -> None:
    """The model's 2:4 (magnitude) checkpoint, written in a subprocess so the parent stays small."""
    code = ("import sys, sparse_runtime as sr; m, t = sr.load_model(sys.argv[1]); sr.sparsify(m, pattern='2:4'); "
            "sr.save_pretrained(m, sys.argv[2], tokenizer=t)")
    subprocess.run([sys.executable, "-c", code, model_name, str(out)], check=True, cwd=ROOT)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=32, help="tokens in the one forward (default 32)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backends", nargs="+", default=["reference", "decompressed"])
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="where to keep the 2:4 checkpoint between runs (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "memory.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--load", default="dense", help=argparse.SUPPRESS)
    p.add_argument("--backend", default="auto", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    import torch

    from sparse_runtime.models.sources import resolve

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or Path(tmp) / "ckpt-2of4"
        if not (ckpt / "sparse_config.json").is_file():
            _write_checkpoint(args.model, ckpt)
        dense_dir = resolve(args.model)
        dense_bytes = tensor_bytes(dense_dir)
        rows = {name: {**_run_child(args, load), "tensor_bytes": dense_bytes}
                for name, load in (("dense", "dense"), ("dense, weights read", "dense-read"))}
        sparse_bytes = tensor_bytes(ckpt)
        for backend in args.backends:
            rows[f"2:4 {backend}"] = {**_run_child(args, str(ckpt), backend), "tensor_bytes": sparse_bytes}
    ref = rows.get("2:4 reference")
    dense, lazy = rows["dense, weights read"], rows["dense"]
    target = None if ref is None else {
        "ratio": ref["load_peak_bytes"] / sparse_bytes, "max_ratio": TARGET_RATIO,
        "below_dense": ref["load_peak_bytes"] < dense["load_peak_bytes"],
        # transformers maps the dense file and reads weights as the forward first touches them
        "below_lazy_dense": ref["load_peak_bytes"] < lazy["load_peak_bytes"],
        "below_dense_after_forward": ref["forward_peak_bytes"] < lazy["forward_peak_bytes"],
        "met": ref["load_peak_bytes"] <= TARGET_RATIO * sparse_bytes
               and ref["load_peak_bytes"] < dense["load_peak_bytes"]}
    result = {
        "model": args.model, "device": args.device if args.device != "cpu" else f"cpu ({platform.machine()})",
        "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"tokens": args.tokens, "threads": args.threads, "checkpoint": "magnitude 2:4 (sparsify)",
                     "measure": "VmHWM - VmRSS after imports and the model's code, fresh process per row"},
        "rows": rows, "target": target,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
