"""Pruning front-end: magnitude, Wanda and SparseGPT for 2:4, N:M and unstructured sparsity.

Every method has one signature, ``method(model, calib, *, pattern, sparsity, **options) -> PruneResult``:
it zeroes pruned weights in place (SparseGPT also updates the kept ones) and returns the keep
masks, ready for :func:`sparse_runtime.nn.sparsify`. The calibrated methods run on the one
family-agnostic driver in :mod:`.layerwise`."""
from __future__ import annotations

from ..data.calibration import DEFAULT_CALIB, DEFAULT_EVAL, CalibrationError, calibration_windows
from ..models.architecture import UnsupportedModel, find_decoder_layers
from .layerwise import PruneResult, prune_layerwise
from .magnitude import magnitude, magnitude_mask
from .rotate import OBJECTIVES as ROTATE_OBJECTIVES
from .rotate import RotateOptions
from .sparsegpt import sparsegpt, sparsegpt_prune
from .statistics import Hessian, InputNorms
from .wanda import wanda, wanda_mask

METHODS = {"magnitude": magnitude, "wanda": wanda, "sparsegpt": sparsegpt}
NEEDS_CALIBRATION = {"wanda", "sparsegpt"}


def prune(model, method: str = "sparsegpt", pattern: str = "2:4", sparsity: float = 0.5, calib=None,
          rotate: str | RotateOptions | None = None, rotate_steps: int = 100, rotate_blocks: int = 1,
          rotate_importance: str | None = None, **options) -> PruneResult:
    """Prune ``model`` in place with ``method`` (a name in :data:`METHODS`).

    ``calib`` is a ``[N, L]`` tensor of token ids (see :func:`calibration_windows`);
    options go to the method (targets, ignore, device, true_sequential, offload,
    record_errors, progress; blocksize, damp, refit for SparseGPT; per for magnitude).
    ``rotate`` ("entropy", "nm" or a :class:`RotateOptions`) learns DenoiseRotator rotations per decoder
    layer before pruning it (``rotate_steps`` Adam steps, ``rotate_blocks`` diagonal blocks of R1, scored
    by ``rotate_importance``'s scores, by default the method's own); the rotated layers are then pruned
    true-sequentially unless ``true_sequential=False`` is given."""
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose from {', '.join(METHODS)}")
    if method in NEEDS_CALIBRATION and calib is None:
        raise ValueError(f"{method} needs calibration token ids (calib=[N, L] tensor)")
    if isinstance(rotate, str) and rotate != "none":
        rotate = RotateOptions(rotate, rotate_steps, rotate_blocks, damp=options.get("damp", 0.01),
                               importance=rotate_importance)
    elif rotate == "none":
        rotate = None
    if rotate is not None:
        if method not in NEEDS_CALIBRATION and rotate.importance in NEEDS_CALIBRATION:  # before any layer changes
            raise ValueError(f"rotate importance {rotate.importance!r} needs calibration statistics, which "
                             f"{method} pruning does not collect")
        options["rotate"] = rotate
        if method in NEEDS_CALIBRATION:
            options.setdefault("true_sequential", True)
    return METHODS[method](model, calib, pattern=pattern, sparsity=sparsity, **options)


__all__ = [
    "DEFAULT_CALIB",
    "DEFAULT_EVAL",
    "METHODS",
    "CalibrationError",
    "Hessian",
    "InputNorms",
    "PruneResult",
    "ROTATE_OBJECTIVES",
    "RotateOptions",
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
