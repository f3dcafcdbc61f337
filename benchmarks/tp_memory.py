"""Per-rank weight memory under tensor parallelism: W gloo processes on the CPU, each loading its shard.

    python -m benchmarks.tp_memory [--world 2] [--models stories260k smollm2-135m]

Each model is magnitude-pruned to 2:4 (every linear but lm_head) and saved as a checkpoint; one process loads
it whole, then ``torchrun --nproc_per_node W`` loads it sharded. Bytes are the tensors each process holds after
loading, before the first forward (on the CPU the ``decompressed`` backend adds a dense copy of each layer at its
first call). Writes benchmarks/results/tp_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .common import RESULTS, ROOT, metadata, module_env, write_json

STORIES = ROOT.parent / "shared" / "data" / "models" / "stories260K"


def held_bytes(model) -> dict:
    """``sparse``: SparseLinear values, metadata and biases; ``other``: every other tensor (replicated)."""
    from sparse_runtime.serving.tensor_parallel import sparse_bytes

    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}  # tied weights once
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    sparse = sparse_bytes(model)
    return {"sparse": sparse, "other": total - sparse}


def rank_main(ckpt: str, out: str) -> None:
    """One torchrun rank: load the shard, gather every rank's bytes on rank 0, which writes them."""
    import torch.distributed as dist

    from sparse_runtime.serving.tensor_parallel import load_tensor_parallel, start

    rank, device = start(int(os.environ["WORLD_SIZE"]), "cpu")
    model = load_tensor_parallel(ckpt, rank, dist.get_world_size(), device=device)
    held = [None] * dist.get_world_size()
    dist.all_gather_object(held, held_bytes(model))
    if rank == 0:
        write_json(out, held)


def checkpoint(name: str, out: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparse_runtime import save_pretrained, sparsify
    from sparse_runtime.models.sources import load_model

    if name == "stories260k":
        model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(STORIES)
    else:
        model, tok = load_model(name, dtype=torch.float32)
    sparsify(model)
    return save_pretrained(model, out / name, tokenizer=tok)


def measure(name: str, world: int, tmp: Path) -> dict:
    from sparse_runtime import load_pretrained

    ckpt = checkpoint(name, tmp)
    single = held_bytes(load_pretrained(ckpt))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp / f"{name}-ranks.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                    "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", __spec__.name, "--rank", str(ckpt), str(out)],
                   check=True, env=module_env(OMP_NUM_THREADS="1"))
    return {"single": single, "ranks": json.loads(out.read_text())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--models", nargs="+", default=["stories260k", "smollm2-135m"])
    p.add_argument("--rank", nargs=2, metavar=("CKPT", "OUT"), help=argparse.SUPPRESS)  # torchrun's workers
    args = p.parse_args(argv)
    if args.rank:
        rank_main(*args.rank)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        models = {name: measure(name, args.world, Path(tmp)) for name in args.models}
    result = {**metadata("cpu", "gloo", threads=1), "world": args.world,
              "dtype": "float32", "pattern": "2:4 magnitude, every linear but lm_head", "models": models}
    write_json(RESULTS / "tp_memory.json", result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
