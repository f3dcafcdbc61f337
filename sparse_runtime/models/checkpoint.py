"""Sparse checkpoints: ``save_pretrained`` / ``load_pretrained``.

A checkpoint is a folder holding
  * ``config.json`` (+ ``generation_config.json``): the transformers config;
  * tokenizer files;
  * ``model.safetensors``: canonical compressed tensors (``*.weight_values``,
    ``*.weight_meta``) for sparse layers, plain tensors for everything else;
  * ``sparse_config.json``: the format version and, per sparse layer, its
    pattern, shape, dtype, sparsity, bias and rotation, which loading checks
    the tensors against.
Saving writes a temporary sibling folder and renames it into place, so an
interrupted save never leaves a half-written checkpoint where a good one was.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig
from torch import nn

from ..errors import CheckpointError, SparseRuntimeError
from ..format.codec import FLOAT_DTYPES
from ..nn.linear import SparseLinear
from .architecture import UnsupportedModel, find_decoder_layers
from .residual_rotation import boundaries, install_boundaries
from .skeleton import build_skeleton, check_finite, check_tensor, finish, place
from .compressed_tensors import load_compressed_tensors, quantization_config
from .saving import tied_duplicates, tokenizer_from_source, write_atomic_dir
from .tensor_files import WEIGHTS, TensorFiles

FORMAT_NAME = "sparse_runtime"
FORMAT_VERSION = 1
SPARSE_CONFIG = "sparse_config.json"


def _layer_entry(layer: SparseLinear) -> dict:
    return {
        "pattern": layer.pattern,
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bias": layer.bias is not None,
        "dtype": str(layer.weight_values.dtype).removeprefix("torch."),
        "nnz": layer.weight_values.numel(),
        "sparsity": round(layer.sparsity, 6),
        "rotation": None if layer.rotation is None else list(layer.rotation.shape),
    }


def save_pretrained(model: nn.Module, out_dir, tokenizer=None, extra_config: dict | None = None) -> Path:
    """Write ``model`` (with its SparseLinear layers compressed) to ``out_dir`` atomically."""
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError("save_pretrained needs a transformers model (with a .config)")
    layers = {n: _layer_entry(m) for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    dups = tied_duplicates(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if k not in dups}
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"save_pretrained: tensor {k} has NaN/Inf values")
    sparse_config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "layers": layers,
        "tied": sorted(dups),
        **_residual_rotations(model),
        **(extra_config or {}),
    }
    if tokenizer is None:
        tokenizer = tokenizer_from_source(config)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", FORMAT_NAME: str(FORMAT_VERSION)})
        config.save_pretrained(tmp)
        _mark_quantization_config(tmp / "config.json")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            with contextlib.suppress(Exception):  # some configs fail their own validation on save
                gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / SPARSE_CONFIG).write_text(json.dumps(sparse_config, indent=2))

    write_atomic_dir(Path(out_dir), write)
    return Path(out_dir)


def _residual_rotations(model) -> dict:
    """``{"residual_rotation": {layer index: shape}}`` for a rotated model's boundary rotations, else ``{}``."""

    try:
        layers, _ = find_decoder_layers(model)
    except UnsupportedModel:
        return {}
    shapes = boundaries(layers)
    return {"residual_rotation": {str(i): s for i, s in shapes.items()}} if shapes else {}


def _install_residual_rotations(model, sc: dict, path: Path, dtype) -> None:
    shapes = sc.get("residual_rotation")
    if not shapes:
        return

    try:
        layers, _ = find_decoder_layers(model)
        install_boundaries(layers, {int(i): [int(n) for n in s] for i, s in shapes.items()}, dtype)
    except (ValueError, TypeError, SparseRuntimeError) as e:
        raise CheckpointError(f"{path / SPARSE_CONFIG}: bad residual_rotation entry ({e})") from None


def _mark_quantization_config(config_file: Path) -> None:
    """Name this format in config.json so that plain transformers ``from_pretrained`` routes the folder to
    sparse_runtime's quantizer (registered on ``import sparse_runtime``) instead of loading random linears."""
    data = json.loads(config_file.read_text())
    data["quantization_config"] = {"quant_method": FORMAT_NAME, "format_version": FORMAT_VERSION}
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_sparse_config(path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder")
    f = path / SPARSE_CONFIG
    if not f.exists():
        raise CheckpointError(f"{path}: no {SPARSE_CONFIG}; not a sparse_runtime checkpoint")
    try:
        sc = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from None
    if sc.get("format") != FORMAT_NAME or not isinstance(sc.get("layers"), dict):
        raise CheckpointError(f"{f}: not a {FORMAT_NAME} sparse config")
    version = sc.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise CheckpointError(f"{f}: format version {version} is newer than this sparse_runtime "
                              f"reads ({FORMAT_VERSION}); upgrade sparse_runtime")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise CheckpointError(f"{f}: unknown format version {version!r} (this sparse_runtime reads {FORMAT_VERSION})")
    return sc


def _check_layer(name: str, entry: dict, module) -> None:
    need = ("pattern", "in_features", "out_features", "bias", "dtype", "nnz")
    missing = [k for k in need if k not in entry]
    if missing:
        raise CheckpointError(f"{SPARSE_CONFIG}: layer {name} lacks {missing}")
    if module is None:
        raise CheckpointError(f"{SPARSE_CONFIG}: layer {name} is not a module of the model its config builds")
    if not isinstance(module, nn.Linear):
        raise CheckpointError(f"{SPARSE_CONFIG}: layer {name} is a {type(module).__name__} in the model, not nn.Linear")
    if (module.out_features, module.in_features) != (entry["out_features"], entry["in_features"]):
        raise CheckpointError(
            f"{name}: checkpoint says {entry['out_features']}x{entry['in_features']}, but the config builds "
            f"{module.out_features}x{module.in_features}")
    if (module.bias is not None) != bool(entry["bias"]):
        raise CheckpointError(f"{name}: checkpoint bias={entry['bias']} disagrees with the config's layer")


def _compressed_tensors_folder(path: Path) -> bool:
    return quantization_config(path) is not None


def load_pretrained(path, device="cpu", dtype: torch.dtype | None = None, backend: str = "auto"):
    """Rebuild the transformers model saved by :func:`save_pretrained`, with SparseLinear layers."""
    path = Path(path)
    if not (path / SPARSE_CONFIG).exists() and _compressed_tensors_folder(path):
        return load_compressed_tensors(path, device=device, dtype=dtype, backend=backend)
    sc, config, files = read_checkpoint(path)
    return assemble(path, sc, config, files, device, dtype, backend)


def read_checkpoint(path: Path):
    """``(sparse_config, transformers config, tensor files)`` of a checkpoint folder, each checked."""
    sc = read_sparse_config(path)
    files = TensorFiles(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read config.json ({e})") from None
    return sc, config, files


def assemble(path: Path, sc: dict, config, files, device="cpu", dtype=None, backend="auto"):
    """The model ``config`` builds, with the layers ``sc`` names made SparseLinear and the tensors of ``files``
    (a :class:`~.tensor_files.TensorFiles`, or tensor parallelism's one-rank shard) read into their places
    after every header is checked against the model."""
    stored = {files.dtype(k) for k in files.keys() if files.dtype(k).is_floating_point}
    load_dtype = stored.pop() if len(stored) == 1 else torch.float32
    model = build_skeleton(config, load_dtype)

    modules = dict(model.named_modules())
    for name, entry in sc["layers"].items():
        _check_layer(name, entry, modules.get(name))
        if entry["dtype"] not in {str(d).removeprefix("torch.") for d in FLOAT_DTYPES}:
            raise CheckpointError(f"{name}: unsupported dtype {entry['dtype']!r}")
        try:
            layer = SparseLinear(entry["in_features"], entry["out_features"], bias=entry["bias"],
                                 pattern=entry["pattern"], nnz=entry["nnz"], backend="reference",
                                 device="meta", dtype=getattr(torch, entry["dtype"]))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{name}: {e}") from None
        if entry.get("rotation"):
            layer.rotation = torch.empty(entry["rotation"], dtype=layer.weight_values.dtype, device="meta")
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, layer)

    _install_residual_rotations(model, sc, path, load_dtype)
    expected = model.state_dict()
    tied = set(sc.get("tied", []))
    missing = [k for k in expected if k not in files and k not in tied]
    unexpected = [k for k in files.keys() if k not in expected]
    if missing:
        raise CheckpointError(f"{path}: tensors missing from the checkpoint: {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}")
    if unexpected:
        raise CheckpointError(f"{files.where(unexpected[0])}: unexpected, the model has no such tensor"
                              f"{f' ({len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}")
    sparse = {f"{n}.{p}" for n in sc["layers"] for p in ("weight_values", "weight_meta")}
    for k in files.keys():  # every header against the model before the first byte of data is read
        check_tensor(files.where(k), files.shape(k), files.dtype(k), expected[k], exact=k in sparse)
    del expected
    for k in files.keys():
        place(model, k, check_finite(files.where(k), files.read(k)), device, dtype)
    finish(model, path, device, dtype, tie=bool(tied))

    for name, mod in model.named_modules():
        if isinstance(mod, SparseLinear):
            try:
                mod.sparse_weight.validate(name)
            except SparseRuntimeError as e:
                raise CheckpointError(f"{path}: {e}") from None
    for mod in model.modules():
        if isinstance(mod, SparseLinear):
            mod.set_backend(backend)
    return model.eval()
