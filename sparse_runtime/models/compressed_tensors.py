"""compressed-tensors ``sparse-24-bitmask`` checkpoints: the adapter that loads them as SparseLinear models
(through ``loading``'s shared steps), and their writer.

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
import math
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import CheckpointError
from ..format.codec import FLOAT_DTYPES, kept_indices, pack_bits, pack_meta_24, unpack_bits
from ..nn.linear import SparseLinear
from .loading import Source, SparseLayer, read_config
from .residual_rotation import BUFFER as RESIDUAL_ROTATION
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


def _pattern_and_meta(files: TensorFiles, name: str, shape, bitmask: torch.Tensor) -> tuple[str, torch.Tensor]:
    """One layer's bitmask -> the canonical format's pattern and metadata (2:4 when every group keeps 2, else
    unstructured over the same bitmap), after checking it against the header of its kept values."""
    values = name + ".compressed"
    if files.dtype(values) not in FLOAT_DTYPES:
        raise CheckpointError(f"{files.where(values)}: {str(files.dtype(values)).removeprefix('torch.')} "
                              f"values (quantized {SPARSE24}) are not supported; fp16, bf16, fp32 and fp64 are")
    rows, k = shape
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, (k + 7) // 8):
        raise CheckpointError(f"{files.where(name + '.bitmask')}: {bitmask.dtype} {tuple(bitmask.shape)}, expected "
                              f"uint8 {(rows, (k + 7) // 8)} for shape {[rows, k]}")
    mask = unpack_bits(bitmask, k)
    nnz = math.prod(files.shape(values))
    if int(mask.sum()) != nnz:
        raise CheckpointError(f"{files.where(name + '.bitmask')}: keeps {int(mask.sum())} entries but "
                              f"{values} holds {nnz}")
    if k % 4 == 0 and (mask.view(rows, -1, 4).sum(-1) == 2).all():
        return "2:4", pack_meta_24(kept_indices(mask, 2, 4))
    return "unstructured", pack_bits(mask)


class CompressedTensorsFolder(Source):
    """The adapter of compressed-tensors ``sparse-24-bitmask`` folders: each sparse linear's ``compressed``,
    ``bitmask`` and ``shape`` become the canonical ``weight_values`` and ``weight_meta`` of a SparseLinear (the
    metadata is made from the bitmask while the layers are read; the values are read once, when placed)."""

    def __init__(self, path):
        self.path = Path(path)
        self.where = self.path / "config.json"
        qc = quantization_config(self.path)
        if qc is None:
            raise CheckpointError(f"{self.path}: config.json has no compressed-tensors quantization_config")
        check_supported(qc, self.path)
        self.files = TensorFiles(self.path)
        self.config = read_config(self.path)
        del self.config.quantization_config  # the loaded model is a sparse_runtime model, not a compressed-tensors one
        self.layers: dict[str, tuple[tuple[int, int], torch.Tensor]] = {}  # name -> (dense shape, metadata)
        self.not_24: list[str] = []
        self.tensors = _CanonicalView(self)

    @classmethod
    def claims(cls, path: Path) -> bool:
        return quantization_config(path) is not None

    def sparse_layers(self, modules) -> dict[str, SparseLayer]:
        files, specs = self.files, {}
        keys = set(files.keys())
        for name in sorted({k.rsplit(".", 1)[0] for k in keys if k.rsplit(".", 1)[-1] in PARAMS}):
            absent = [p for p in PARAMS if f"{name}.{p}" not in keys]
            if absent:
                raise CheckpointError(f"{self.path}: {name} lacks {', '.join(f'{name}.{p}' for p in absent)}")
            linear = modules.get(name)
            if not isinstance(linear, nn.Linear):
                raise CheckpointError(f"{self.path}: {name} holds {SPARSE24} tensors but is not an nn.Linear of "
                                      "the model")
            shape = tuple(files.read(f"{name}.shape").flatten().tolist())
            if shape != (linear.out_features, linear.in_features):
                raise CheckpointError(f"{files.where(name + '.shape')}: says {list(shape)}, the config builds "
                                      f"{[linear.out_features, linear.in_features]}")
            pattern, meta = _pattern_and_meta(files, name, shape, files.read(f"{name}.bitmask"))
            self.layers[name] = shape, meta
            if pattern != "2:4":
                self.not_24.append(name)
            specs[name] = SparseLayer(pattern, shape[1], shape[0], linear.bias is not None,
                                      files.dtype(f"{name}.compressed"), math.prod(files.shape(f"{name}.compressed")))
        if self.not_24:
            warnings.warn(f"{self.path}: {len(self.not_24)} layer(s) whose bitmask is not 2:4 load as unstructured "
                          f"on the reference backend: {', '.join(self.not_24)}", stacklevel=2)
        return specs

    def backend(self, name: str, backend: str) -> str:
        return "reference" if name in self.not_24 else backend


class _CanonicalView:
    """A compressed-tensors folder's tensors under the skeleton's keys: ``P.weight_values`` is ``P.compressed``
    in the canonical shape, ``P.weight_meta`` the metadata made from ``P.bitmask``, every other tensor as stored."""

    def __init__(self, folder: CompressedTensorsFolder):
        self.folder, self.files = folder, folder.files

    def _source(self, key: str) -> tuple[str | None, str]:
        """(sparse layer or None, the stored tensor the key comes from)."""
        name, _, param = key.rpartition(".")
        if name in self.folder.layers and param in ("weight_values", "weight_meta"):
            return name, f"{name}.compressed" if param == "weight_values" else f"{name}.bitmask"
        return None, key

    def keys(self) -> list[str]:
        sparse = {f"{n}.{p}" for n in self.folder.layers for p in PARAMS}
        return ([k for k in self.files.keys() if k not in sparse]
                + [f"{n}.{p}" for n in self.folder.layers for p in ("weight_values", "weight_meta")])

    def __contains__(self, key: str) -> bool:
        name, stored = self._source(key)
        return name is not None or stored in self.files

    def where(self, key: str) -> str:
        return self.files.where(self._source(key)[1])

    def shape(self, key: str) -> tuple[int, ...]:
        name, stored = self._source(key)
        if name is None:
            return self.files.shape(stored)
        (rows, k), meta = self.folder.layers[name]
        if stored.endswith(".bitmask"):
            return tuple(meta.shape)
        return (rows, k // 2) if name not in self.folder.not_24 else (math.prod(self.files.shape(stored)),)

    def dtype(self, key: str) -> torch.dtype:
        name, stored = self._source(key)
        return torch.uint8 if name is not None and stored.endswith(".bitmask") else self.files.dtype(stored)

    def read(self, key: str) -> torch.Tensor:
        name, stored = self._source(key)
        if name is None:
            return self.files.read(stored)
        if stored.endswith(".bitmask"):
            return self.folder.layers[name][1]
        return self.files.read(stored).reshape(self.shape(key))


def load_compressed_tensors(path, device="cpu", dtype: torch.dtype | None = None, backend: str = "auto"):
    """Build the model of a compressed-tensors ``sparse-24-bitmask`` folder with SparseLinear layers."""
    return CompressedTensorsFolder(path).load(device, dtype, backend)


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
        if mod.quant is not None:
            raise CheckpointError(f"{name}: has {mod.quant.name} values; {SPARSE24} holds full-precision values only")
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
