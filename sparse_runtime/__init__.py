"""sparse_runtime: run N:M-pruned (chiefly 2:4) language models faster on NVIDIA GPUs."""
from .errors import BackendUnavailable, CheckpointError, MaskError, ShapeError, SparseRuntimeError
from .format import SparseWeight
from .linear import SparseLinear
from .masks import nm_mask, unstructured_mask, validate_nm

__version__ = "0.1.0"


def __getattr__(name):
    # Heavy imports (transformers, safetensors) only when these are used.
    if name in ("sparsify", "SparsifyReport"):
        from . import sparsify as mod
    elif name in ("save_pretrained", "load_pretrained"):
        from . import checkpoint as mod
    elif name == "load_model":
        from . import models as mod
    else:
        raise AttributeError(f"module 'sparse_runtime' has no attribute {name!r}")
    return getattr(mod, name)


__all__ = [
    "SparseLinear", "SparseWeight", "sparsify", "SparsifyReport", "save_pretrained", "load_pretrained",
    "load_model", "nm_mask", "unstructured_mask", "validate_nm", "BackendUnavailable", "CheckpointError",
    "MaskError", "ShapeError", "SparseRuntimeError",
]
