"""Plain ``transformers.AutoModelForCausalLM.from_pretrained`` on sparse checkpoints.

transformers picks a quantizer from ``config.json``'s ``quantization_config.quant_method``. This module
(registered on ``import sparse_runtime``) adds one for this project's checkpoints (``quant_method:
"sparse_runtime"``, written by :func:`sparse_runtime.save_pretrained`) and takes over ``"compressed-tensors"``
configs whose format is ``sparse-24-bitmask`` or ``marlin-24`` (compressed-tensors 0.15+ no longer decompresses
those, and without it transformers fills the linears with random weights). Every other compressed-tensors config goes to
transformers' own integration unchanged.

The quantizer lets transformers build the model and load what it recognises, then rebuilds the checkpoint
with this project's validating loader and moves its modules and tensors into transformers' model, so the
result equals :func:`sparse_runtime.load_pretrained` and nothing is left randomly initialised.
"""
from __future__ import annotations

import re
from pathlib import Path

from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import compressed_tensors as ct
from ..errors import CheckpointError
from ..nn.int8_dense import INT8_MODULES
from ..nn.linear import SparseLinear
from . import hf_config
from .checkpoint import SPARSE_CONFIG, read_sparse_config
from .sources import load_pretrained
from .residual_rotation import boundaries, install_boundaries
from .architecture import UnsupportedModel, find_decoder_layers
from .tensor_files import TensorFile

METHOD = "sparse_runtime"


class SparseRuntimeQuantConfig(QuantizationConfigMixin):
    """The ``quantization_config`` dict of a sparse checkpoint, kept as written."""

    def __init__(self, quant_method: str = METHOD, **kwargs):
        self.quant_method = quant_method
        self._raw = {"quant_method": quant_method, **kwargs}

    def to_dict(self) -> dict:
        return dict(self._raw)

    def to_diff_dict(self) -> dict:
        return self.to_dict()


_SPARSE_SUFFIXES = (".weight_values", ".compressed", ".weight_packed", ".weight_codes")


def _keys(file) -> list[str]:
    return TensorFile(file).keys()


class SparseRuntimeHfQuantizer(HfQuantizer):
    requires_calibration = False

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        files = checkpoint_files or []
        self._folder = Path(files[0]).parent if files else None
        # The sparse tensors are loaded after transformers is done; keep its load report to what it owns.
        sparse = [k.rsplit(".", 1)[0] for f in files for k in _keys(f) if k.endswith(_SPARSE_SUFFIXES)]
        sparse += _tied_int8_heads(self._folder)
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | {
            r"\.(compressed|bitmask|shape|weight_scale|weight_packed|meta|scale_packed|weight_values|weight_meta|"
            r"weight_scales|weight_codes|rotation)$"}
        model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | {
            re.escape(p) + r"\.weight$" for p in sparse}

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self._folder is None or not (self._folder / "config.json").is_file():
            raise CheckpointError("this sparse checkpoint is not a local folder transformers can hand over; "
                                  "load it with sparse_runtime.load_pretrained(path)")
        param = next(model.parameters())
        src = load_pretrained(self._folder, device=param.device, dtype=param.dtype)
        modules = dict(model.named_modules())
        for name, mod in src.named_modules():
            if isinstance(mod, (SparseLinear, *INT8_MODULES)):
                parent, _, child = name.rpartition(".")
                setattr(modules[parent] if parent else model, child, mod)
        _copy_residual_rotations(src, model)
        model.load_state_dict(src.state_dict(), strict=True)
        return model

    @property
    def is_trainable(self) -> bool:
        return False

    def is_serializable(self) -> bool:
        # transformers' save_pretrained would write the SparseLinear buffers without sparse_config.json.
        return False


def _tied_int8_heads(folder) -> list[str]:
    """The int8 heads that read their embedding's codes: they store no tensor of their own."""
    if folder is None or not (folder / SPARSE_CONFIG).is_file():
        return []
    entries = read_sparse_config(folder).get("dense_quantized", {})
    return [n for n, e in entries.items() if isinstance(e, dict) and e.get("tied_to")]


def _copy_residual_rotations(src, model) -> None:
    """A rotated checkpoint's boundary rotations (buffers + their pre-hooks) on the model transformers built."""
    try:
        shapes = boundaries(find_decoder_layers(src)[0])
    except UnsupportedModel:
        return
    if shapes:
        install_boundaries(find_decoder_layers(model)[0], shapes)


def _dispatch_config(original):
    class CompressedTensorsDispatchConfig:
        """compressed-tensors configs: sparse-24-bitmask ones to sparse_runtime, the rest to transformers."""

        @classmethod
        def from_dict(cls, config_dict, *args, **kwargs):
            if ct.is_sparse24(config_dict):
                return SparseRuntimeQuantConfig(**config_dict)
            return original.from_dict(config_dict, *args, **kwargs)

    return CompressedTensorsDispatchConfig


def _dispatch_quantizer(original):
    class CompressedTensorsDispatchQuantizer:
        def __new__(cls, quantization_config, **kwargs):
            if isinstance(quantization_config, SparseRuntimeQuantConfig):
                return SparseRuntimeHfQuantizer(quantization_config, **kwargs)
            return original(quantization_config, **kwargs)

    return CompressedTensorsDispatchQuantizer


def register() -> None:
    """Idempotent: add the ``sparse_runtime`` method and route sparse compressed-tensors configs here; let
    ``AutoConfig`` read the marked config of a sparse checkpoint (``hf_config``)."""
    hf_config.register()
    if METHOD in AUTO_QUANTIZER_MAPPING:
        return
    AUTO_QUANTIZATION_CONFIG_MAPPING[METHOD] = SparseRuntimeQuantConfig
    AUTO_QUANTIZER_MAPPING[METHOD] = SparseRuntimeHfQuantizer
    if ct.QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        AUTO_QUANTIZATION_CONFIG_MAPPING[ct.QUANT_METHOD] = _dispatch_config(
            AUTO_QUANTIZATION_CONFIG_MAPPING[ct.QUANT_METHOD])
        AUTO_QUANTIZER_MAPPING[ct.QUANT_METHOD] = _dispatch_quantizer(AUTO_QUANTIZER_MAPPING[ct.QUANT_METHOD])
