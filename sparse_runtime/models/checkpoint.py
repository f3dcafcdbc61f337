"""This project's sparse checkpoints: ``save_pretrained`` writes them, :class:`SparseCheckpoint` is the adapter
that loads them (through ``loading``'s shared steps; ``sparse_runtime.load_pretrained`` resolves to it).

A checkpoint is a folder holding
  * ``config.json`` (+ ``generation_config.json``): the transformers config, marked (``hf_config``) so that plain
    transformers refuses it or, with ``trust_remote_code=True``, loads it through sparse_runtime;
  * tokenizer files;
  * ``model.safetensors``: canonical compressed tensors (``*.weight_values``,
    ``*.weight_meta``, and ``*.weight_scales`` for quantized values) for sparse
    layers, plain tensors for everything else;
  * ``sparse_config.json``: the format version and, per sparse layer, its
    pattern, shape, dtype, sparsity, bias, rotation and (if quantized) ``quant``
    (``{"scheme", "group_size"}``), which loading checks the tensors against; and under ``dense_quantized``,
    per module held as dense int8 codes (``nn.int8_dense``: the embedding and lm_head with ``head="int8"``),
    its kind, shape, bias, dtype, ``quant`` and, for a head that reads its embedding's codes, ``tied_to``.
Saving writes a temporary sibling folder and swaps it into place (``saving``), so an
interrupted save never leaves a half-written checkpoint, or none, where a good one was.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import CheckpointError
from ..format.codec import FLOAT_DTYPES, dtype_name
from ..format.quant import QuantScheme
from ..nn.int8_dense import INT8_MODULES, SCHEME as INT8, Int8Embedding, Int8Linear
from ..nn.linear import SparseLinear
from . import hf_config
from .architecture import UnsupportedModel, find_decoder_layers
from .loading import Source, SparseLayer, read_config
from .residual_rotation import boundaries
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
        "dtype": dtype_name(layer.dtype),
        "nnz": layer.sparse_weight.nnz,
        "sparsity": round(layer.sparsity, 6),
        "rotation": None if layer.rotation is None else list(layer.rotation.shape),
        **({} if layer.quant is None else {"quant": layer.quant.to_dict()}),
    }


def _int8_entry(module, names: dict[int, str]) -> dict:
    common = {"dtype": dtype_name(module.weight_scales.dtype if isinstance(module, Int8Embedding) else
                                  module.scales.dtype), "quant": INT8.to_dict()}
    if isinstance(module, Int8Embedding):
        return {"kind": "embedding", "num_embeddings": module.num_embeddings, "embedding_dim": module.embedding_dim,
                "padding_idx": module.padding_idx, **common}
    if module.tied is not None and id(module.tied) not in names:
        raise ValueError("save_pretrained: an Int8Linear reads an embedding that is not a module of the model")
    return {"kind": "linear", "in_features": module.in_features, "out_features": module.out_features,
            "bias": module.bias is not None, "tied_to": None if module.tied is None else names[id(module.tied)],
            **common}


def save_pretrained(model: nn.Module, out_dir, tokenizer=None, extra_config: dict | None = None) -> Path:
    """Write ``model`` (with its SparseLinear layers compressed) to ``out_dir`` atomically."""
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError("save_pretrained needs a transformers model (with a .config)")
    layers = {n: _layer_entry(m) for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    int8 = {n: m for n, m in model.named_modules() if isinstance(m, INT8_MODULES)}
    names = {id(m): n for n, m in int8.items()}
    dups = tied_duplicates(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if k not in dups}
    for k, v in tensors.items():
        if v.dtype in FLOAT_DTYPES and not torch.isfinite(v).all():  # codes: checked by the codec
            raise ValueError(f"save_pretrained: tensor {k} has NaN/Inf values")
    sparse_config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "layers": layers,
        "tied": sorted(dups),
        **({"dense_quantized": {n: _int8_entry(m, names) for n, m in int8.items()}} if int8 else {}),
        **_residual_rotations(model),
        **(extra_config or {}),
    }
    if tokenizer is None:
        tokenizer = tokenizer_from_source(config)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", FORMAT_NAME: str(FORMAT_VERSION)})
        config.save_pretrained(tmp)
        hf_config.mark(tmp, {"quant_method": FORMAT_NAME, "format_version": FORMAT_VERSION})
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


class SparseCheckpoint(Source):
    """The adapter of this project's checkpoints: ``sparse_config.json`` names the sparse layers, their tensors are
    stored in the canonical compressed format under the skeleton's own keys. Tensor parallelism passes the parts
    it has already read (its rank's config, layer entries and slices)."""

    def __init__(self, path, sparse_config: dict | None = None, config=None, files=None):
        self.path = Path(path)
        self.where = self.path / SPARSE_CONFIG
        self.sparse_config = sparse_config if sparse_config is not None else read_sparse_config(self.path)
        self.files = self.tensors = files if files is not None else TensorFiles(self.path)
        self.config = config if config is not None else read_config(self.path)
        self.tie = bool(self.sparse_config.get("tied"))
        self.residual_rotation = self.sparse_config.get("residual_rotation")

    @classmethod
    def claims(cls, path: Path) -> bool:
        return (path / SPARSE_CONFIG).exists()

    def sparse_layers(self, modules) -> dict[str, SparseLayer]:
        return {name: _layer(self.where, name, entry) for name, entry in self.sparse_config["layers"].items()}

    def int8_modules(self) -> dict[str, nn.Module]:
        entries = self.sparse_config.get("dense_quantized", {})
        if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
            raise CheckpointError(f"{self.where}: dense_quantized must map module names to entries")
        built = {}
        # embeddings first: a tied head reads one
        for name, entry in sorted(entries.items(), key=lambda item: item[1].get("kind") != "embedding"):
            built[name] = _int8_module(self.where, name, entry, built)
        return built


def _check_entry(where: Path, name: str, entry: dict, need: tuple[str, ...]) -> torch.dtype:
    """The entry's dtype, after checking it has the keys ``need`` and names a supported dtype."""
    missing = [k for k in need if k not in entry]
    if missing:
        raise CheckpointError(f"{where}: layer {name} lacks {missing}")
    if entry["dtype"] not in {str(d).removeprefix("torch.") for d in FLOAT_DTYPES}:
        raise CheckpointError(f"{name}: unsupported dtype {entry['dtype']!r}")
    return getattr(torch, entry["dtype"])


def _layer(where: Path, name: str, entry: dict) -> SparseLayer:
    dtype = _check_entry(where, name, entry, ("pattern", "in_features", "out_features", "bias", "dtype", "nnz"))
    rotation = tuple(entry["rotation"]) if entry.get("rotation") else None
    return SparseLayer(entry["pattern"], entry["in_features"], entry["out_features"], bool(entry["bias"]),
                       dtype, entry["nnz"], rotation, _quant(where, name, entry))


_INT8_KEYS = {"embedding": ("num_embeddings", "embedding_dim", "dtype", "quant"),
              "linear": ("in_features", "out_features", "bias", "dtype", "quant")}


def _int8_module(where: Path, name: str, entry: dict, built: dict[str, nn.Module]) -> nn.Module:
    """The meta-device module a ``dense_quantized`` entry describes (``built``: the entries built before it)."""
    kind = entry.get("kind")
    if kind not in _INT8_KEYS:
        raise CheckpointError(f"{where}: {name} has kind {kind!r}; expected one of {', '.join(_INT8_KEYS)}")
    dtype = _check_entry(where, name, entry, _INT8_KEYS[kind])
    if _quant(where, name, entry) != INT8:
        raise CheckpointError(f"{where}: {name} has quant {entry['quant']!r}; dense modules take int8, one scale "
                              f"per row")
    tied = entry.get("tied_to")
    if kind == "linear" and tied is not None and not isinstance(built.get(tied), Int8Embedding):
        raise CheckpointError(f"{where}: {name} is tied to {tied!r}, which is no int8 embedding of this checkpoint")
    try:
        if kind == "embedding":
            return Int8Embedding(entry["num_embeddings"], entry["embedding_dim"], entry.get("padding_idx"),
                                 device="meta", dtype=dtype)
        return Int8Linear(entry["in_features"], entry["out_features"], bool(entry["bias"]), device="meta",
                          dtype=dtype, tied=built.get(tied))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{name}: {e}") from None


def _quant(where: Path, name: str, entry: dict) -> QuantScheme | None:
    quant = entry.get("quant")
    if quant is None:
        return None
    try:
        if not isinstance(quant, dict) or set(quant) != {"scheme", "group_size"}:
            raise ValueError(f"expected {{\"scheme\": ..., \"group_size\": ...}}, got {quant!r}")
        return QuantScheme(quant["scheme"], quant["group_size"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: layer {name} has a bad quant entry ({e})") from None
