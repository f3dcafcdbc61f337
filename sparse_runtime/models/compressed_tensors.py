"""compressed-tensors 2:4 checkpoints: the adapter that loads them as SparseLinear models (through ``loading``'s
shared steps), and their writer. The quantization configs are :mod:`.compressed_tensors_quant`'s, the marlin-24
tensor layout :mod:`.marlin24`'s.

On disk, per sparse linear ``P`` (the formats compressed-tensors 0.14 and earlier write):

``sparse-24-bitmask``
  * ``P.compressed`` ``[N, K/2]`` in the weight's dtype: the kept entries, row-major;
  * ``P.bitmask`` uint8 ``[N, ceil(K/8)]``: numpy ``packbits(mask, axis=-1, bitorder="little")``, i.e. column
    ``k`` is bit ``k % 8`` of byte ``k // 8`` (the same bitmap as this project's unstructured meta);
  * ``P.shape`` int64 ``[2, 1]``: the dense shape;
  * quantized (a ``float-quantized`` or ``naive-quantized`` config group): ``P.compressed`` holds float8_e4m3fn codes and
    ``P.weight_scale`` ``[N, 1]`` (``[1]`` for a per-tensor scale) their scales, ``W = code * scale``.
``marlin-24`` (a ``marlin-24`` config group, int4 or int8 codes): ``P.weight_packed``, ``P.meta`` and
  ``P.scale_packed``, laid out as :mod:`.marlin24` says.

``config.json`` carries ``quantization_config = {"quant_method": "compressed-tensors", "sparsity_config":
{"format": "sparse-24-bitmask", "sparsity_structure": "2:4", ...}, "config_groups": {...}, ...}``. Every other
tensor is stored as is, in one ``model.safetensors`` or in shards listed by an index.
"""
from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import CheckpointError
from ..format import quant as q
from ..format.codec import FLOAT_DTYPES, kept_indices, pack_bits, pack_meta_24, unpack_bits, unpack_meta_24
from ..nn.linear import SparseLinear
from . import compressed_tensors_quant as ctq
from . import marlin24
from .loading import Source, SparseLayer, read_config, skeleton_dtype
from .residual_rotation import BUFFER as RESIDUAL_ROTATION
from .saving import tied_duplicates, tokenizer_from_source, write_atomic_dir
from .tensor_files import WEIGHTS, TensorFiles

QUANT_METHOD = "compressed-tensors"
SPARSE24 = "sparse-24-bitmask"
MARLIN24 = ctq.MARLIN24
PARAMS = ("compressed", "bitmask", "shape")
MARLIN_PARAMS = ("weight_packed", "meta", "scale_packed")
SCALE = "weight_scale"  # a float-quantized layer's scales
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


def check_supported(qc: dict, where) -> list[ctq.Group]:
    """The config's quantization groups, after refusing by name every variant this module does not load: a
    sparsity format other than ``sparse-24-bitmask`` (none at all only for a checkpoint that is all marlin-24),
    a structure other than 2:4, and the quantization :mod:`.compressed_tensors_quant` refuses."""
    groups = ctq.parse_groups(qc, where)
    sc = qc.get("sparsity_config") or {}
    fmt = sc.get("format")
    if fmt in (None, "dense") and groups and all(g.format == MARLIN24 for g in groups):
        return groups
    if fmt != SPARSE24:
        raise CheckpointError(f"{where}: compressed-tensors sparsity format {fmt!r} is not supported: "
                              f"sparse_runtime loads {SPARSE24} (and {MARLIN24})")
    if sc.get("sparsity_structure", "2:4") != "2:4":
        raise CheckpointError(f"{where}: sparsity_structure {sc['sparsity_structure']!r} is not supported with "
                              f"{SPARSE24} (2:4 only)")
    return groups


def _pattern_and_meta(files: TensorFiles, name: str, shape, bitmask: torch.Tensor) -> tuple[str, torch.Tensor]:
    """One layer's bitmask -> the canonical format's pattern and metadata (2:4 when every group keeps 2, else
    unstructured over the same bitmap), after checking it against the header of its kept values."""
    values = name + ".compressed"
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


@dataclass(frozen=True)
class _Derived:
    """A skeleton tensor made from a stored one: its header, and how to make it."""
    source: str  # the stored tensor, named in errors
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


class CompressedTensorsFolder(Source):
    """The adapter of compressed-tensors 2:4 folders: each sparse linear's stored tensors become the canonical
    ``weight_values``, ``weight_meta`` (and ``weight_scales``) of a SparseLinear. The metadata is made while the
    layers are read; the values and scales once, when placed."""

    def __init__(self, path):
        self.path = Path(path)
        self.where = self.path / "config.json"
        qc = quantization_config(self.path)
        if qc is None:
            raise CheckpointError(f"{self.path}: config.json has no compressed-tensors quantization_config")
        self.groups = check_supported(qc, self.path)
        self.ignore = qc.get("ignore") or ()
        self.files = TensorFiles(self.path)
        self.model_dtype = skeleton_dtype(self.files)  # quantized layers compute in it: the scales are converted
        self.config = read_config(self.path)
        del self.config.quantization_config  # the loaded model is a sparse_runtime model, not a compressed-tensors one
        self.derived: dict[str, _Derived] = {}  # skeleton key -> how it is made
        self.consumed: set[str] = set()  # stored keys that only feed derived ones
        self.not_24: list[str] = []
        self.tensors = _CanonicalView(self)

    @classmethod
    def claims(cls, path: Path) -> bool:
        return quantization_config(path) is not None

    def sparse_layers(self, modules) -> dict[str, SparseLayer]:
        keys = set(self.files.keys())
        specs = {}
        for params, read in ((PARAMS, self._bitmask_layer), (MARLIN_PARAMS, self._marlin_layer)):
            for name in sorted({k.rsplit(".", 1)[0] for k in keys if k.rsplit(".", 1)[-1] in params}):
                absent = [p for p in params if f"{name}.{p}" not in keys]
                if absent:
                    raise CheckpointError(f"{self.path}: {name} lacks {', '.join(f'{name}.{p}' for p in absent)}")
                if name in specs:
                    raise CheckpointError(f"{self.path}: {name} holds both {SPARSE24} and {MARLIN24} tensors")
                linear = modules.get(name)
                if not isinstance(linear, nn.Linear):
                    raise CheckpointError(f"{self.path}: {name} holds compressed-tensors 2:4 tensors but is not an "
                                          "nn.Linear of the model")
                group = ctq.group_of(self.groups, self.ignore, name, linear, self.where)
                specs[name] = read(name, linear, group, keys)
                self.consumed |= {f"{name}.{p}" for p in params}
        stray = sorted(k for k in keys - self.consumed if k.endswith("." + SCALE))
        if stray:
            raise CheckpointError(f"{self.files.where(stray[0])}: a quantized layer without 2:4 tensors; dense "
                                  "quantized layers are not supported")
        if self.not_24:
            warnings.warn(f"{self.path}: {len(self.not_24)} layer(s) whose bitmask is not 2:4 load as unstructured "
                          f"on the reference backend: {', '.join(self.not_24)}", stacklevel=2)
        return specs

    def backend(self, name: str, backend: str) -> str:
        return "reference" if name in self.not_24 else backend

    def _derive(self, name: str, param: str, source: str, shape, dtype, make) -> None:
        self.derived[f"{name}.{param}"] = _Derived(source, tuple(shape), dtype, make)

    def _bitmask_layer(self, name: str, linear: nn.Linear, group: ctq.Group | None, keys) -> SparseLayer:
        files, values = self.files, f"{name}.compressed"
        shape = tuple(files.read(f"{name}.shape").flatten().tolist())
        if shape != (linear.out_features, linear.in_features):
            raise CheckpointError(f"{files.where(name + '.shape')}: says {list(shape)}, the config builds "
                                  f"{[linear.out_features, linear.in_features]}")
        scales = f"{name}.{SCALE}"
        if group is not None and group.format not in ctq.BITMASK_FORMATS:
            raise CheckpointError(f"{files.where(values)}: config group {group.name!r} stores {name} as "
                                  f"{group.format}, but the folder holds {SPARSE24} tensors")
        if group is None and scales in keys:
            raise CheckpointError(f"{files.where(scales)}: no config group quantizes {name}")
        if group is not None and scales not in keys:
            raise CheckpointError(f"{self.path}: config group {group.name!r} quantizes {name}, but {scales} is "
                                  "missing")
        dtype = files.dtype(values)
        if group is None and dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{files.where(values)}: {str(dtype).removeprefix('torch.')} values without "
                                  f"{scales} are not supported; {SPARSE24} holds fp16, bf16, fp32 or fp64 values, "
                                  "or codes with the scales of a config group")
        if group is not None and dtype != group.quant.code_dtype:
            raise CheckpointError(f"{files.where(values)}: {str(dtype).removeprefix('torch.')} values, expected "
                                  f"{str(group.quant.code_dtype).removeprefix('torch.')} codes for config group "
                                  f"{group.name!r}")
        pattern, meta = _pattern_and_meta(files, name, shape, files.read(f"{name}.bitmask"))
        rows, k = shape
        self._derive(name, "weight_meta", f"{name}.bitmask", meta.shape, torch.uint8, lambda: meta)
        kept = (rows, k // 2) if pattern == "2:4" else (math.prod(files.shape(values)),)
        self._derive(name, "weight_values", values, kept, files.dtype(values),
                     lambda: files.read(values).reshape(kept))
        if pattern != "2:4":
            if group is not None:
                raise CheckpointError(f"{files.where(name + '.bitmask')}: not 2:4; quantized values need a 2:4 mask")
            self.not_24.append(name)
        quant = None
        if group is not None:
            quant, dtype = group.quant, self.model_dtype
            if files.shape(scales) not in ((rows, 1), (1, 1), (1,), ()) or files.dtype(scales) not in FLOAT_DTYPES:
                raise CheckpointError(f"{files.where(scales)}: {files.dtype(scales)} {list(files.shape(scales))}, "
                                      f"expected floating [{rows}, 1] (or [1] for a per-tensor scale)")
            self._derive(name, "weight_scales", scales, (rows, 1), dtype,
                         lambda: files.read(scales).to(dtype).reshape(-1, 1).expand(rows, 1).contiguous())
            self.consumed.add(scales)
        return SparseLayer(pattern, k, rows, linear.bias is not None, dtype, math.prod(files.shape(values)),
                           quant=quant)

    def _marlin_layer(self, name: str, linear: nn.Linear, group: ctq.Group | None, keys) -> SparseLayer:
        files, rows, k = self.files, linear.out_features, linear.in_features
        if group is None or group.format != MARLIN24:
            raise CheckpointError(f"{files.where(name + '.weight_packed')}: no {MARLIN24} config group quantizes "
                                  f"{name}")
        quant = group.quant
        why = marlin24.unsupported_shape(rows, k, quant.group_size)
        if why:
            raise CheckpointError(f"{name}: {why}")
        bits = 4 if quant.name == "int4" else 8
        for param, (shape, dtype) in marlin24.stored_shapes(rows, k, bits, quant.groups(k)).items():
            key = f"{name}.{param}"
            if (tuple(files.shape(key)), files.dtype(key)) != (shape, dtype):
                raise CheckpointError(f"{files.where(key)}: {str(files.dtype(key)).removeprefix('torch.')} "
                                      f"{list(files.shape(key))}, expected {str(dtype).removeprefix('torch.')} "
                                      f"{list(shape)} for {bits}-bit {[rows, k]}")
        indices = marlin24.unpack_indices(files.read(f"{name}.meta"), (rows, k))
        bad = (indices[..., 0] >= indices[..., 1]).nonzero()
        if len(bad):
            r, g = bad[0].tolist()
            raise CheckpointError(f"{files.where(name + '.meta')}: row {r}, group {g} has indices "
                                  f"{indices[r, g].tolist()}; 2:4 metadata names two columns in order")
        meta = pack_meta_24(indices)
        self._derive(name, "weight_meta", f"{name}.meta", meta.shape, torch.uint8, lambda: meta)
        packed, scales = f"{name}.weight_packed", f"{name}.scale_packed"
        self._derive(name, "weight_values", packed, (rows, quant.stored_columns(k // 2)), quant.code_dtype,
                     lambda: q.store_codes(marlin24.unpack_codes(files.read(packed), (rows, k), bits), quant))
        self._derive(name, "weight_scales", scales, (rows, quant.groups(k)), self.model_dtype,
                     lambda: marlin24.unpack_scales(files.read(scales), (rows, k), quant.group_size).to(self.model_dtype))
        return SparseLayer("2:4", k, rows, linear.bias is not None, self.model_dtype, rows * k // 2, quant=quant)


class _CanonicalView:
    """A compressed-tensors folder's tensors under the skeleton's keys: a sparse layer's canonical tensors made
    from its stored ones, every other tensor as stored."""

    def __init__(self, folder: CompressedTensorsFolder):
        self.derived, self.consumed, self.files = folder.derived, folder.consumed, folder.files

    def keys(self) -> list[str]:
        return [k for k in self.files.keys() if k not in self.consumed] + list(self.derived)

    def __contains__(self, key: str) -> bool:
        return key in self.derived or (key in self.files and key not in self.consumed)

    def where(self, key: str) -> str:
        d = self.derived.get(key)
        return self.files.where(key if d is None else d.source)

    def shape(self, key: str) -> tuple[int, ...]:
        d = self.derived.get(key)
        return self.files.shape(key) if d is None else d.shape

    def dtype(self, key: str) -> torch.dtype:
        d = self.derived.get(key)
        return self.files.dtype(key) if d is None else d.dtype

    def read(self, key: str) -> torch.Tensor:
        d = self.derived.get(key)
        return self.files.read(key) if d is None else d.make()


def load_compressed_tensors(path, device="cpu", dtype: torch.dtype | None = None, backend: str = "auto"):
    """Build the model of a compressed-tensors 2:4 folder with SparseLinear layers."""
    return CompressedTensorsFolder(path).load(device, dtype, backend)


def _marlin_tensors(name: str, mod: SparseLinear, rounded: list[str]) -> dict[str, torch.Tensor]:
    """A quantized int layer's marlin-24 tensors (``rounded`` collects layers whose scales fp16 rounds)."""
    quant, sw = mod.quant, mod.sparse_weight
    why = marlin24.unsupported_shape(mod.out_features, mod.in_features, quant.group_size)
    if why:
        raise CheckpointError(f"{name}: {why}")
    scales = sw.scales.detach().cpu()
    half = scales.to(torch.float16)
    if not (torch.isfinite(half).all() and (half > 0).all()):
        raise CheckpointError(f"{name}: scales outside float16's range; {MARLIN24} stores float16 scales")
    if not torch.equal(half.to(scales.dtype), scales):
        rounded.append(name)
    codes = q.stored_codes(sw.values.detach().cpu(), quant)
    packed = marlin24.pack(codes, unpack_meta_24(sw.meta.cpu(), mod.in_features), half,
                           4 if quant.name == "int4" else 8, quant.group_size)
    return {f"{name}.{p}": t for p, t in packed.items()}


def export_compressed_tensors(model: nn.Module, out_dir, tokenizer=None) -> Path:
    """Write ``model`` as a compressed-tensors 2:4 folder, atomically.

    Every SparseLinear must be 2:4 without a rotation (the format has neither other patterns nor rotations).
    Full-precision and fp8 layers are written as ``sparse-24-bitmask`` (fp8 with a ``float-quantized`` group),
    int4 and int8 layers as ``marlin-24`` (groups of 128 or one scale per row, ``N % 64 == 0``, ``K % 32 == 0``;
    its scales are float16, a warning names the layers whose scales that rounds). Every other tensor,
    ``nn.Linear`` layers included, is written dense."""
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError("export_compressed_tensors needs a transformers model (with a .config)")
    dups = tied_duplicates(model)
    tensors, bitmask, quantized, sparsities, rounded = {}, [], {}, [], []
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
        fmt = None if mod.quant is None else ctq.export_format(mod.quant)
        if mod.quant is not None and fmt is None:
            raise CheckpointError(f"{name}: {mod.quant.name} values with group_size={mod.quant.group_size} have no "
                                  f"compressed-tensors format: {MARLIN24} takes int4/int8 in groups of "
                                  f"{marlin24.GROUP_SIZE} or per row, {ctq.FLOAT_QUANTIZED} fp8 per row")
        sw = mod.sparse_weight
        if fmt == MARLIN24:
            tensors.update(_marlin_tensors(name, mod, rounded))
        else:
            tensors[f"{name}.compressed"] = sw.values.detach().cpu().contiguous()
            tensors[f"{name}.bitmask"] = pack_bits(sw.mask()).cpu()
            tensors[f"{name}.shape"] = torch.tensor(list(sw.shape), dtype=torch.int64).reshape(-1, 1)
            bitmask.append(name)
        if fmt is not None:
            if fmt == ctq.FLOAT_QUANTIZED:
                tensors[f"{name}.{SCALE}"] = sw.scales.detach().cpu().contiguous()
            quantized[name] = mod.quant
        sparsities.append((mod.sparsity, mod.in_features * mod.out_features))
    if not sparsities:
        raise CheckpointError("export_compressed_tensors: the model has no SparseLinear layers")
    if rounded:
        warnings.warn(f"{MARLIN24} stores float16 scales: rounding the scales of {', '.join(rounded)}", stacklevel=2)
    sparse = bitmask + list(quantized)
    skip = {f"{n}.{p}" for n in sparse for p in ("weight_values", "weight_meta", "weight_scales", "rotation")} | dups
    tensors.update({k: v.detach().cpu().contiguous() for k, v in state.items() if k not in skip})
    dense_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    total = sum(p.numel() for p in model.parameters()) + sum(n for _, n in sparsities)
    config = copy.deepcopy(config)
    qc = {"quant_method": QUANT_METHOD, "version": CT_VERSION}
    if bitmask:
        qc["sparsity_config"] = {
            "format": SPARSE24,
            "sparsity_structure": "2:4",
            "targets": bitmask,
            "ignore": dense_linears,
            "global_sparsity": round(sum(s * n for s, n in sparsities) / total, 6),
        }
    if quantized:
        qc.update(ctq.config_groups(quantized))
    config.quantization_config = qc
    if tokenizer is None:
        tokenizer = tokenizer_from_source(model.config)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    write_atomic_dir(Path(out_dir), write)
    return Path(out_dir)
