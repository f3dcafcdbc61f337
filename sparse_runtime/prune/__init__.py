"""Pruning front-end: magnitude, Wanda and SparseGPT for 2:4, N:M and unstructured sparsity.

Every method has one signature, ``method(model, calib, *, pattern, sparsity, **options) -> PruneResult``:
it zeroes pruned weights in place (SparseGPT also updates the kept ones) and returns the keep
masks, ready for :func:`sparse_runtime.sparsify`. The calibrated methods run on the one
family-agnostic driver in :mod:`.layerwise`."""
from __future__ import annotations

from .calibration import DEFAULT_CALIB, DEFAULT_EVAL, CalibrationError, calibration_windows
from .layerwise import PruneResult, UnsupportedModel, find_decoder_layers, prune_layerwise
from .magnitude import magnitude, magnitude_mask
from .sparsegpt import Hessian, sparsegpt, sparsegpt_prune
from .wanda import InputNorms, wanda, wanda_mask

METHODS = {"magnitude": magnitude, "wanda": wanda, "sparsegpt": sparsegpt}
NEEDS_CALIBRATION = {"wanda", "sparsegpt"}


def prune(model, method: str = "sparsegpt", pattern: str = "2:4", sparsity: float = 0.5, calib=None,
          **options) -> PruneResult:
    """Prune ``model`` in place with ``method`` (a name in :data:`METHODS`).

    ``calib`` is a ``[N, L]`` tensor of token ids (see :func:`calibration_windows`);
    options go to the method (targets, ignore, device, true_sequential, offload,
    record_errors, progress; blocksize, damp for SparseGPT; per for magnitude)."""
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose from {', '.join(METHODS)}")
    if method in NEEDS_CALIBRATION and calib is None:
        raise ValueError(f"{method} needs calibration token ids (calib=[N, L] tensor)")
    return METHODS[method](model, calib, pattern=pattern, sparsity=sparsity, **options)


__all__ = [
    "DEFAULT_CALIB",
    "DEFAULT_EVAL",
    "METHODS",
    "CalibrationError",
    "Hessian",
    "InputNorms",
    "PruneResult",
    "UnsupportedModel",
    "calibration_windows",
    "find_decoder_layers",
    "magnitude",
    "magnitude_mask",
    "prune",
    "prune_layerwise",
    "sparsegpt",
    "sparsegpt_prune",
    "wanda",
    "wanda_mask",
]
