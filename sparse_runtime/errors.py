"""Exception types. Each names what was wrong and where, so users can fix their input."""


class SparseRuntimeError(Exception):
    """Base class of every error raised on purpose by sparse_runtime."""


class MaskError(SparseRuntimeError, ValueError):
    """A mask does not follow the sparsity pattern it claims."""


class ShapeError(SparseRuntimeError, ValueError):
    """A tensor has a shape the operation cannot take."""


class CheckpointError(SparseRuntimeError, ValueError):
    """A checkpoint is missing files or tensors, or they disagree with its config."""


class BackendUnavailable(SparseRuntimeError, RuntimeError):
    """A requested backend cannot run here (no GPU, no library, unsupported layer)."""


class QuantError(SparseRuntimeError, ValueError):
    """Quantized values are invalid (codes outside their scheme, scales not finite and positive) or a scheme
    cannot apply to the weight."""
