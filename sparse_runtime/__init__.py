"""sparse_runtime: run N:M-pruned (chiefly 2:4) language models faster on NVIDIA GPUs."""
from .models.checkpoint import save_pretrained
from .errors import BackendUnavailable, CheckpointError, MaskError, QuantError, ShapeError, SparseRuntimeError
from .format.codec import SparseWeight
from .format.quant import QuantScheme
from .nn.linear import SparseLinear
from .format.masks import nm_mask, unstructured_mask, validate_nm
from .models.sources import load_model, load_pretrained
from .nn.sparsify import SparsifyReport, sparsify

__version__ = "0.1.0"

from .models.hf_quantizer import register as _register_hf_quantizer  # noqa: E402

_register_hf_quantizer()  # AutoModelForCausalLM.from_pretrained(sparse checkpoint) builds SparseLinear layers

__all__ = [
    "SparseLinear", "SparseWeight", "sparsify", "SparsifyReport", "save_pretrained", "load_pretrained",
    "load_model", "nm_mask", "unstructured_mask", "validate_nm", "BackendUnavailable", "CheckpointError",
    "MaskError", "QuantError", "QuantScheme", "ShapeError", "SparseRuntimeError",
]
