"""Tensor parallelism over ``torch.distributed``: each rank holds its shard of every decoder linear.

Megatron-style, with plain collectives and no change to the transformers modules:
  * column-parallel ``q/k/v_proj`` and ``gate/up_proj`` keep a block of output rows (row slices of a 2:4
    layer's values and metadata);
  * row-parallel ``o_proj`` and ``down_proj`` keep the matching block of input columns, so they read the
    column-parallel outputs as they are, and one all-reduce sums their partial outputs;
  * everything else (embeddings, norms, lm_head) is replicated, so every rank ends with the same logits.
Attention is split by whole KV groups (a KV head and the query heads that read it). Each rank builds the model
from a config with its local head and intermediate counts: transformers' attention infers its heads from
q_proj's output size and the engine sizes its KV cache from the config, so both fit the shard as they are.
A 2:4 layer's input columns are cut at multiples of 8, so no 2:4 group or metadata byte is split (only the
last shard may be ragged, as the format allows). Each rank reads only its slices from the checkpoint.
"""
from __future__ import annotations

import atexit
import copy
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from ..models.architecture import WRITERS
from ..models.checkpoint import SPARSE_CONFIG, SparseCheckpoint
from ..errors import SparseRuntimeError
from ..nn.linear import SparseLinear
from ..models.tensor_files import TensorDict

ROW = tuple(p.rpartition(".")[2] for p in WRITERS)  # row-parallel (they write the residual stream); readers: column


class TensorParallelError(SparseRuntimeError, ValueError):
    """A model, checkpoint or launch that tensor parallelism cannot take."""


def _balanced(n: int, world: int, what: str) -> list[tuple[int, int]]:
    """``n`` items in ``world`` contiguous blocks, the first ``n % world`` one larger."""
    if n < world:
        raise TensorParallelError(f"cannot split {what} over {world} ranks: each rank needs at least one")
    bounds = [r * (n // world) + min(r, n % world) for r in range(world + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def shard_plan(config, world: int) -> list[dict[str, tuple[int, int]]]:
    """Per rank: the output rows each column-parallel linear keeps, and the input columns each row-parallel
    one keeps, as ``{"q_proj": (start, stop), ...}``."""
    if world < 1:
        raise TensorParallelError(f"the tensor-parallel size must be >= 1, got {world}")
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd, rep, inter = _head_dim(config), heads // kv, config.intermediate_size
    groups = _balanced(kv, world, f"num_key_value_heads={kv} (attention is split by whole KV groups)")
    # intermediate columns in blocks of 8 (the last one may hold 4), so 2:4 metadata bytes stay whole
    blocks = _balanced(-(-inter // 8), world, f"intermediate_size={inter} in blocks of 8 columns")
    plans = []
    for (g0, g1), (b0, b1) in zip(groups, blocks):
        q, kvr, mlp = (g0 * rep * hd, g1 * rep * hd), (g0 * hd, g1 * hd), (8 * b0, min(8 * b1, inter))
        plans.append({"q_proj": q, "k_proj": kvr, "v_proj": kvr, "o_proj": q,
                      "gate_proj": mlp, "up_proj": mlp, "down_proj": mlp})
    return plans


def local_config(config, plan: dict[str, tuple[int, int]]):
    """``config`` with one rank's head and intermediate counts, so the model it builds has the shard's shapes."""
    local = copy.deepcopy(config)
    kv0, kv1 = plan["k_proj"]
    q0, q1 = plan["q_proj"]
    hd = _head_dim(config)
    local.head_dim = hd
    local.num_attention_heads, local.num_key_value_heads = (q1 - q0) // hd, (kv1 - kv0) // hd
    local.intermediate_size = plan["down_proj"][1] - plan["down_proj"][0]
    return local


def _local_entry(name: str, entry: dict, span: tuple[int, int]) -> dict:
    if entry.get("pattern") != "2:4":
        raise TensorParallelError(f"{name}: tensor parallelism shards 2:4 layers only, this one is "
                                  f"{entry.get('pattern')!r}")
    if entry.get("rotation"):
        raise TensorParallelError(f"{name}: layers with an input rotation cannot be sharded")
    if entry.get("quant"):
        raise TensorParallelError(f"{name}: layers with quantized values ({entry['quant'].get('scheme')}) "
                                  "cannot be sharded yet")
    size = span[1] - span[0]
    dim = "in_features" if name.rpartition(".")[2] in ROW else "out_features"
    local = {**entry, dim: size}
    return {**local, "nnz": local["out_features"] * local["in_features"] // 2}


def _read_shard(f, key: str, span, row: bool, in_features: int) -> torch.Tensor:
    """Rows ``span`` (column-parallel) or input columns ``span`` (row-parallel) of one linear's tensor."""
    tensor = key.rpartition(".")[2]
    if span is None or (row and tensor == "bias"):  # a row-parallel bias is added once, after the sum
        return f.get_tensor(key)
    a, b = span
    part = f.get_slice(key)
    if not row:
        return part[a:b]
    if tensor == "weight":
        return part[:, a:b]
    for col in (a, b):
        if col % 8 and col != in_features:
            raise TensorParallelError(f"{key}: a shard boundary at input column {col} is not a multiple of 8, "
                                      f"so it would split a 2:4 metadata byte; use another number of ranks")
    if tensor == "weight_values":
        return part[:, a // 2:b // 2]
    return part[:, a // 8:-(-b // 8)]  # weight_meta


def load_tensor_parallel(path, rank: int, world: int, device="cpu", dtype: torch.dtype | None = None,
                         backend: str = "auto"):
    """Rank ``rank``'s shard of the sparse checkpoint ``path``, reading only that shard's slices; its row-parallel
    layers all-reduce over the default process group."""
    path = Path(path)
    if not (path / SPARSE_CONFIG).exists():
        raise TensorParallelError(f"{path}: tensor parallelism loads sparse_runtime checkpoints (written by "
                                  "sparse-runtime prune or save_pretrained); this folder has no sparse_config.json")
    ckpt = SparseCheckpoint(path)
    sc, config, files = ckpt.sparse_config, ckpt.config, ckpt.files
    in_features = {n: e["in_features"] for n, e in sc["layers"].items()}
    keys = files.keys()
    modules = {k.rpartition(".")[0] for k in keys}
    if not any(m.endswith(".q_proj") for m in modules):
        raise TensorParallelError(f"{path}: tensor parallelism takes Llama-style decoders (self_attn.q/k/v/o_proj,"
                                  f" mlp.gate/up/down_proj); {type(config).__name__} has no q_proj")
    plan = shard_plan(config, world)[rank]
    spans = {m: plan.get(m.rpartition(".")[2]) for m in modules}
    layers = {n: _local_entry(n, e, spans[n]) if spans.get(n) else e for n, e in sc["layers"].items()}
    tensors = {}
    for file in {files.files[k].path for k in keys}:  # safetensors' slices read only this rank's bytes
        with safe_open(str(file), framework="pt") as f:
            for k in (k for k in keys if files.files[k].path == file):
                m = k.rpartition(".")[0]
                tensors[k] = _read_shard(f, k, spans[m], m.rpartition(".")[2] in ROW, in_features.get(m, 0))
    shard = TensorDict(tensors, {k: files.where(k) for k in keys})
    rank_ckpt = SparseCheckpoint(path, {**sc, "layers": layers}, local_config(config, plan), shard)
    model = rank_ckpt.load(device, dtype, backend)
    for name, mod in list(model.named_modules()):
        if name.rpartition(".")[2] in ROW and isinstance(mod, (nn.Linear, SparseLinear)):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, RowParallel(mod))
    return model


class RowParallel(nn.Module):
    """A linear holding a block of the full layer's input columns: the ranks' partial outputs are summed with
    one all-reduce, then the bias is added once."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear, self.bias = linear, linear.bias
        linear.bias = None
        if isinstance(linear, SparseLinear):
            linear.set_backend(linear.backend)  # its prepared state may have fused the bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        dist.all_reduce(y)
        return y if self.bias is None else y + self.bias


def start(world: int, device: str | None = None, timeout=None) -> tuple[int, torch.device]:
    """Join the process group ``torchrun`` describes (NCCL on CUDA, else gloo): ``(rank, this rank's device)``.
    ``timeout`` (a ``timedelta``) bounds each collective's wait; a server's followers wait for requests."""
    if world < 1:
        raise TensorParallelError(f"--tp must be >= 1, got {world}")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != world:
        raise TensorParallelError(f"--tp {world} needs {world} processes: launch with torchrun --nproc_per_node "
                                  f"{world} (this one has WORLD_SIZE={launched})")
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", **({"timeout": timeout} if timeout else {}))
        atexit.register(dist.destroy_process_group)
    return rank, dev


def shared_seed(seed: int | None) -> int:
    """One sampling seed for all ranks (rank 0's), so sampled tokens agree everywhere."""
    box = [seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()))]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sparse_bytes(model: nn.Module) -> int:
    """Bytes of this rank's sparse weights (values, metadata, biases)."""
    return sum(m.nbytes() for m in model.modules() if isinstance(m, SparseLinear))


# ---- serving: rank 0 runs the engine, the other ranks replay its model calls -----------------------------
# Every decoder forward all-reduces, so each rank must run the same forwards on the same inputs and keep the
# same KV cache. Rank 0 broadcasts each cache placement and forward before running it; sampling and text stay
# on rank 0 (the replicated lm_head runs everywhere at decode: it is part of the engine's decode step).
_RELAYED = ("prefill_at", "decode_at", "move")


def _cpu(args):
    return tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)


def _on(args, device):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def lead(engine) -> None:
    """Make rank 0's ``engine`` broadcast each of its model calls to the following ranks."""
    def relay(op, fn):
        def call(*args):
            dist.broadcast_object_list([(op, _cpu(args))], src=0)
            return fn(*args)
        return call

    for op in _RELAYED:
        setattr(engine.cache, op, relay(op, getattr(engine.cache, op)))
    engine._forward_eager = relay("forward", engine._forward_eager)
    engine._decode_logits = relay("decode", engine._decode_logits)


def follow(engine) -> None:
    """Replay rank 0's model calls on this rank's shard until rank 0 says stop (:func:`stop_followers`)."""
    ops = {op: getattr(engine.cache, op) for op in _RELAYED}
    ops.update(forward=engine._forward_eager, decode=engine._decode_logits)
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        op, args = box[0]
        if op == "stop":
            return
        with torch.inference_mode():
            ops[op](*_on(args, engine.device))


def stop_followers() -> None:
    dist.broadcast_object_list([("stop", ())], src=0)
