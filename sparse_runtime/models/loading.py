"""Loading is one pipeline: resolve the source (``sources``) -> read its headers -> build the skeleton -> place
its tensors. This module is the part every stored format shares, written once.

A format is a :class:`Source`, an adapter that has opened one folder. It supplies the transformers ``config``,
its tensors in the skeleton's terms (``tensors``: state-dict key -> header and reader), the linears that are sparse
(:meth:`Source.sparse_layers`), whether the model's shared weights are tied, and its residual rotations.
:func:`build` then makes the model: the skeleton on the meta device, SparseLinear layers swapped in on meta,
residual rotations installed, every header checked against the skeleton before the first byte of data is read,
each tensor checked finite and placed at its final device and dtype (no dense copy, one read per tensor), shared
weights tied, every sparse weight validated, and each layer's backend chosen.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig

from ..errors import CheckpointError, SparseRuntimeError
from ..format.codec import FLOAT_DTYPES
from ..format.quant import QuantScheme
from ..nn.int8_dense import INT8_MODULES
from ..nn.linear import SparseLinear
from .architecture import find_decoder_layers
from .residual_rotation import install_boundaries
from .skeleton import (build_skeleton, check_finite, check_tensor, refuse_placeholders, replace_placeholder,
                       shared_keys)


@dataclass(frozen=True)
class SparseLayer:
    """What a source says one sparse linear is; the skeleton gets a SparseLinear of exactly this."""
    pattern: str
    in_features: int
    out_features: int
    bias: bool
    dtype: torch.dtype
    nnz: int
    rotation: tuple[int, ...] | None = None
    quant: QuantScheme | None = None  # the values' quantization


class Source:
    """One model on disk, opened by its format's adapter.

    Attributes each adapter sets: ``path`` (the folder), ``where`` (the file that describes its layers, named in
    errors), ``config`` (the transformers config the skeleton is built from), ``files`` (the stored tensors as
    they are on disk; their floating dtype is the skeleton's) and ``tensors`` (the same, keyed and shaped as the
    skeleton's state dict)."""

    tie = True  # tie the weights the config ties; a source that records its ties says whether there were any
    residual_rotation: dict | None = None  # {layer index: rotation shape}

    @classmethod
    def claims(cls, path: Path) -> bool:
        """Whether the folder ``path`` is in this adapter's format."""
        raise NotImplementedError

    def sparse_layers(self, modules: dict[str, nn.Module]) -> dict[str, SparseLayer]:
        """The linears of the skeleton (``modules``: its named modules) that are stored sparse."""
        return {}

    def int8_modules(self) -> dict[str, nn.Module]:
        """Module name -> the meta-device int8 module (``nn.int8_dense``) that replaces the skeleton's."""
        return {}

    def backend(self, name: str, backend: str) -> str:
        """The backend layer ``name`` runs on when ``backend`` was asked for."""
        return backend

    def load(self, device="cpu", dtype: torch.dtype | None = None, backend: str = "auto") -> nn.Module:
        return build(self, device, dtype, backend)


def build(source: Source, device="cpu", dtype: torch.dtype | None = None, backend: str = "auto") -> nn.Module:
    """The model of ``source``, every tensor placed at ``device`` (floating ones in ``dtype``, default: as stored)."""
    load_dtype = skeleton_dtype(source.files)
    model = build_skeleton(source.config, load_dtype)

    modules = dict(model.named_modules())
    layers = source.sparse_layers(modules)
    for name, spec in layers.items():
        _check_layer(source.where, name, spec, modules.get(name))
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, _meta_layer(name, spec))
    int8 = source.int8_modules()
    for name, mod in int8.items():
        _check_int8(source.where, name, mod, modules.get(name))
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, mod)
    _install_residual_rotations(model, source, load_dtype)
    if source.tie:  # on the skeleton too, so that the tied keys are known before any tensor is read
        model.tie_weights()

    tensors = source.tensors
    expected = model.state_dict()
    tied = shared_keys(model)
    missing = [k for k in expected if k not in tensors and k not in tied]
    unexpected = [k for k in tensors.keys() if k not in expected]
    if missing:
        raise CheckpointError(f"{source.path}: tensors missing from the checkpoint: {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}")
    if unexpected:
        raise CheckpointError(f"{tensors.where(unexpected[0])}: unexpected, the model has no such tensor"
                              f"{f' ({len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}")
    sparse = {f"{n}.{p}" for n in layers for p in ("weight_values", "weight_meta", "weight_scales")}
    sparse |= {f"{n}.{p}" for n in int8 for p in ("weight_codes", "weight_scales")}
    for k in tensors.keys():  # every header against the model before the first byte of data is read
        check_tensor(tensors.where(k), tensors.shape(k), tensors.dtype(k), expected[k], exact=k in sparse)
    del expected
    for k in tensors.keys():
        replace_placeholder(model, k, check_finite(tensors.where(k), tensors.read(k)), device, dtype)
    if source.tie:
        model.tie_weights()
    refuse_placeholders(model, source.path)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)  # the buffers

    for name, mod in model.named_modules():
        if isinstance(mod, SparseLinear):
            try:
                mod.sparse_weight.validate(name)
            except SparseRuntimeError as e:
                raise CheckpointError(f"{source.path}: {e}") from None
            mod.set_backend(source.backend(name, backend))
        elif isinstance(mod, INT8_MODULES):
            try:
                mod.validate(name)
            except SparseRuntimeError as e:
                raise CheckpointError(f"{source.path}: {e}") from None
    return model.eval()


def skeleton_dtype(files) -> torch.dtype:
    """The dtype a folder's model is built in: its floating tensors' (not fp8 codes), float32 when they differ."""
    stored = {files.dtype(k) for k in files.keys() if files.dtype(k) in FLOAT_DTYPES}
    return stored.pop() if len(stored) == 1 else torch.float32


def _check_layer(where: Path, name: str, spec: SparseLayer, module) -> None:
    if module is None:
        raise CheckpointError(f"{where}: layer {name} is not a module of the model its config builds")
    if not isinstance(module, nn.Linear):
        raise CheckpointError(f"{where}: layer {name} is a {type(module).__name__} in the model, not nn.Linear")
    if (module.out_features, module.in_features) != (spec.out_features, spec.in_features):
        raise CheckpointError(
            f"{name}: checkpoint says {spec.out_features}x{spec.in_features}, but the config builds "
            f"{module.out_features}x{module.in_features}")
    if (module.bias is not None) != spec.bias:
        raise CheckpointError(f"{name}: checkpoint bias={spec.bias} disagrees with the config's layer")


def _check_int8(where: Path, name: str, new: nn.Module, module) -> None:
    if module is None:
        raise CheckpointError(f"{where}: {name} is not a module of the model its config builds")
    if not isinstance(module, new.DENSE):
        raise CheckpointError(f"{where}: {name} is a {type(module).__name__} in the model, not "
                              f"{new.DENSE.__name__}")
    if tuple(module.weight.shape) != new.shape:
        raise CheckpointError(f"{name}: checkpoint says {new.shape[0]}x{new.shape[1]}, but the config builds "
                              f"{module.weight.shape[0]}x{module.weight.shape[1]}")
    if isinstance(module, nn.Linear) and (module.bias is not None) != (new.bias is not None):
        raise CheckpointError(f"{name}: checkpoint bias={new.bias is not None} disagrees with the config's layer")


def _meta_layer(name: str, spec: SparseLayer) -> SparseLinear:
    try:
        layer = SparseLinear(spec.in_features, spec.out_features, bias=spec.bias, pattern=spec.pattern,
                             nnz=spec.nnz, backend="reference", device="meta", dtype=spec.dtype, quant=spec.quant)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{name}: {e}") from None
    if spec.rotation:
        layer.rotation = torch.empty(spec.rotation, dtype=spec.dtype, device="meta")
    return layer


def _install_residual_rotations(model: nn.Module, source: Source, dtype: torch.dtype) -> None:
    shapes = source.residual_rotation
    if not shapes:
        return
    try:
        layers, _ = find_decoder_layers(model)
        install_boundaries(layers, {int(i): [int(n) for n in s] for i, s in shapes.items()}, dtype)
    except (ValueError, TypeError, SparseRuntimeError) as e:
        raise CheckpointError(f"{source.where}: bad residual_rotation entry ({e})") from None


def read_config(path: Path):
    """The transformers config of a model folder, or a :class:`CheckpointError` saying why not."""
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read config.json ({e})") from None
