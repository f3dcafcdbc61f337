"""compressed-tensors ``sparse-24-bitmask`` checkpoints: load them as SparseLinear models, and write them.

On disk, per sparse linear ``P`` (the format compressed-tensors 0.14 and earlier write):
  * ``P.compressed`` ``[N, K/2]`` in the weight's dtype: the kept entries, row-major;
  * ``P.bitmask`` uint8 ``[N, ceil(K/8)]``: numpy ``packbits(mask, axis=-1, bitorder="little")``, i.e. column
    ``k`` is bit ``k % 8`` of byte ``k // 8`` (the same bitmap as this project's unstructured meta);
  * ``P.shape`` int64 ``[2, 1]``: the dense shape;
and ``config.json`` carries ``quantization_config = {"quant_method": "compressed-tensors",
"sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4", ...}}``.
Every other tensor is stored as is, in one ``model.safetensors`` or in shards listed by an index.
Quantized variants (FP8 values, ``marlin-24``, any ``config_groups``) are refused by name.
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig
from torch import nn

from ..errors import CheckpointError, SparseRuntimeError
from ..format.codec import FLOAT_DTYPES, SparseWeight, kept_indices, pack_bits, pack_meta_24, unpack_bits
from ..nn.linear import SparseLinear
from .residual_rotation import BUFFER as RESIDUAL_ROTATION
from .skeleton import build_skeleton, check_finite, check_tensor, finish, place
from .saving import tied_duplicates, tokenizer_from_source, write_atomic_dir
from .tensor_files import WEIGHTS, TensorFiles

QUANT_METHOD = "compressed-tensors"
SPARSE24 = "sparse-24-bitmask"
MARLIN24 = "marlin-24"
PARAMS = ("compressed", "bitmask", "shape")
# The compressed-tensors release whose decompressor the export is tested against.
CT_VERSION = "0.14.0.1"


def quantization_config(path) -> dict | None:
    """The ``quantization_config`` of a folder's ``config.json`` when it is a compressed-tensors one."""
    f = Path(path) / "config.json"
    if not f.is_file():
        return None
    try:
        qc = json.loads(f.read_text()).get("quantization_config")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from None
    return qc if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD else None


def is_sparse24(qc: dict | None) -> bool:
    """Whether a compressed-tensors config describes a 2:4 checkpoint (this module's, or a variant it refuses)."""
    if not qc:
        return False
    formats = {(qc.get("sparsity_config") or {}).get("format"), qc.get("format")}
    formats |= {g.get("format") for g in (qc.get("config_groups") or {}).values() if isinstance(g, dict)}
    return bool(formats & {SPARSE24, MARLIN24})


def check_supported(qc: dict, where) -> None:
    """Refuse, by name, every compressed-tensors variant other than unquantized sparse-24-bitmask."""
    groups = qc.get("config_groups") or {}
    quant_formats = sorted(({qc.get("format")} | {g.get("format") for g in groups.values() if isinstance(g, dict)})
                           - {None, "dense"})
    if quant_formats or groups:
        name = ", ".join(quant_formats) or "quantized (config_groups)"
        raise CheckpointError(f"{where}: compressed-tensors format {name} is not supported: sparse_runtime loads "
                              f"unquantized {SPARSE24} checkpoints only")
    sc = qc.get("sparsity_config") or {}
    if sc.get("format") != SPARSE24:
        raise CheckpointError(f"{where}: compressed-tensors sparsity format {sc.get('format')!r} is not supported: "
                              f"sparse_runtime loads {SPARSE24} only")
    if sc.get("sparsity_structure", "2:4") != "2:4":
        raise CheckpointError(f"{where}: sparsity_structure {sc['sparsity_structure']!r} is not supported with "
                              f"{SPARSE24} (2:4 only)")


def _sparse_weight(files: TensorFiles, name: str, shape, compressed: torch.Tensor,
                   bitmask: torch.Tensor) -> SparseWeight:
    """One layer's compressed-tensors triple -> the canonical format (2:4 when every group keeps 2, else
    unstructured over the same bitmap)."""
    if compressed.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{files.where(name + '.compressed')}: {str(compressed.dtype).removeprefix('torch.')} "
                              f"values (quantized {SPARSE24}) are not supported; fp16, bf16, fp32 and fp64 are")
    rows, k = shape
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, (k + 7) // 8):
        raise CheckpointError(f"{files.where(name + '.bitmask')}: {bitmask.dtype} {tuple(bitmask.shape)}, expected "
                              f"uint8 {(rows, (k + 7) // 8)} for shape {[rows, k]}")
    mask = unpack_bits(bitmask, k)
    if int(mask.sum()) != compressed.numel():
        raise CheckpointError(f"{files.where(name + '.bitmask')}: keeps {int(mask.sum())} entries but "
                              f"{name}.compressed holds {compressed.numel()}")
    if k % 4 == 0 and (mask.view(rows, -1, 4).sum(-1) == 2).all():
        meta = pack_meta_24(kept_indices(mask, 2, 4))
        return SparseWeight("2:4", (rows, k), compressed.reshape(rows, k // 2), meta)
    return SparseWeight("unstructured", (rows, k), compressed.reshape(-1), pack_bits(mask))


def load_compressed_tensors(path, device="cpu", dtype: torch.dtype | None = None, backend: str = "auto"):
    """Build the model of a compressed-tensors ``sparse-24-bitmask`` folder with SparseLinear layers."""
    path = Path(path)
    qc = quantization_config(path)
    if qc is None:
        raise CheckpointError(f"{path}: config.json has no compressed-tensors quantization_config")
    check_supported(qc, path)
    files = TensorFiles(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read config.json ({e})") from None
    del config.quantization_config  # the loaded model is a sparse_runtime model, not a compressed-tensors one

    stored = {files.dtype(k) for k in files.keys() if files.dtype(k).is_floating_point}
    model = build_skeleton(config, stored.pop() if len(stored) == 1 else torch.float32)
    modules = dict(model.named_modules())
    rest = set(files.keys())
    prefixes = sorted({k.rsplit(".", 1)[0] for k in rest if k.rsplit(".", 1)[-1] in PARAMS})
    not_24 = []
    for name in prefixes:
        absent = [p for p in PARAMS if f"{name}.{p}" not in rest]
        if absent:
            raise CheckpointError(f"{path}: {name} lacks {', '.join(f'{name}.{p}' for p in absent)}")
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{path}: {name} holds {SPARSE24} tensors but is not an nn.Linear of the model")
        parts = {p: files.read(f"{name}.{p}") for p in PARAMS}
        rest -= {f"{name}.{p}" for p in PARAMS}
        shape = tuple(parts["shape"].flatten().tolist())
        if shape != (linear.out_features, linear.in_features):
            raise CheckpointError(f"{files.where(name + '.shape')}: says {list(shape)}, the config builds "
                                  f"{[linear.out_features, linear.in_features]}")
        sw = _sparse_weight(files, name, shape, parts["compressed"], parts["bitmask"])
        try:
            sw.validate(name)
        except SparseRuntimeError as e:
            raise CheckpointError(f"{files.files[name + '.compressed'].path}: {e}") from None
        if sw.pattern != "2:4":
            not_24.append(name)
        layer = SparseLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                             pattern=sw.pattern, nnz=sw.values.numel(), backend="reference", device="meta",
                             dtype=sw.values.dtype)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, layer)
        place(model, f"{name}.weight_values", sw.values, device, dtype)
        place(model, f"{name}.weight_meta", sw.meta, device, dtype)
        del parts, sw

    _load_rest(model, sorted(rest), files, path, device, dtype)
    if not_24:
        warnings.warn(f"{path}: {len(not_24)} layer(s) whose bitmask is not 2:4 load as unstructured on the "
                      f"reference backend: {', '.join(not_24)}", stacklevel=2)
    for name, mod in model.named_modules():
        if isinstance(mod, SparseLinear):
            mod.set_backend("reference" if name in not_24 else backend)
    return model.eval()


def _load_rest(model: nn.Module, keys: list[str], files: TensorFiles, path: Path, device, dtype) -> None:
    """Place the plain tensors strictly: nothing extra, and every model tensor present or tied to one that is."""
    expected = model.state_dict()
    unexpected = [k for k in keys if k not in expected]
    if unexpected:
        raise CheckpointError(f"{files.where(unexpected[0])}: unexpected, the model has no such tensor"
                              f"{f' ({len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}")
    for k in keys:
        check_tensor(files.where(k), files.shape(k), files.dtype(k), expected[k], exact=False)
    del expected
    for k in keys:
        place(model, k, check_finite(files.where(k), files.read(k)), device, dtype)
    finish(model, path, device, dtype)


def export_compressed_tensors(model: nn.Module, out_dir, tokenizer=None) -> Path:
    """Write ``model`` as a compressed-tensors ``sparse-24-bitmask`` folder, atomically.

    Every SparseLinear must be 2:4 without a rotation (the format has neither other patterns nor rotations);
    every other tensor, ``nn.Linear`` layers included, is written dense."""
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError("export_compressed_tensors needs a transformers model (with a .config)")
    dups = tied_duplicates(model)
    tensors, sparse, sparsities = {}, [], []
    state = model.state_dict()
    carried = [k for k in state if k.endswith("." + RESIDUAL_ROTATION)]
    if carried:  # plain transformers (and compressed-tensors) have no place for a boundary rotation
        raise CheckpointError(f"{carried[0].rsplit('.', 1)[0]}: carries a residual rotation, which {SPARSE24} "
                              "cannot express; keep rotated models in sparse_runtime's own checkpoint format")
    for name, mod in model.named_modules():
        if not isinstance(mod, SparseLinear):
            continue
        if mod.pattern != "2:4":
            raise CheckpointError(f"{name}: pattern {mod.pattern}; {SPARSE24} holds 2:4 layers only")
        if mod.rotation is not None:
            raise CheckpointError(f"{name}: has a rotation, which {SPARSE24} cannot express")
        sw = mod.sparse_weight
        tensors[f"{name}.compressed"] = sw.values.detach().cpu().contiguous()
        tensors[f"{name}.bitmask"] = pack_bits(sw.mask()).cpu()
        tensors[f"{name}.shape"] = torch.tensor(list(sw.shape), dtype=torch.int64).reshape(-1, 1)
        sparse.append(name)
        sparsities.append((mod.sparsity, mod.in_features * mod.out_features))
    skip = {f"{n}.{p}" for n in sparse for p in ("weight_values", "weight_meta", "rotation")} | dups
    tensors.update({k: v.detach().cpu().contiguous() for k, v in state.items() if k not in skip})
    if not sparse:
        raise CheckpointError("export_compressed_tensors: the model has no SparseLinear layers")
    dense_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    total = sum(p.numel() for p in model.parameters()) + sum(n for _, n in sparsities)
    config = copy.deepcopy(config)
    config.quantization_config = {
        "quant_method": QUANT_METHOD,
        "version": CT_VERSION,
        "sparsity_config": {
            "format": SPARSE24,
            "sparsity_structure": "2:4",
            "targets": sparse,
            "ignore": dense_linears,
            "global_sparsity": round(sum(s * n for s, n in sparsities) / total, 6),
        },
    }
    if tokenizer is None:
        tokenizer = tokenizer_from_source(model.config)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    write_atomic_dir(Path(out_dir), write)
    return Path(out_dir)
