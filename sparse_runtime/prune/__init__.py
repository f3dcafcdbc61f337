"""Pruning front-end: magnitude, Wanda and SparseGPT for 2:4, N:M and unstructured sparsity.

``prune(model, config, calib=...)`` zeroes pruned weights in place (SparseGPT also updates the kept ones) and
returns the keep masks, ready for :func:`sparse_runtime.nn.sparsify`; with ``config.quantize`` the kept weights
are also put on the scheme's grid and the result carries the scales (:mod:`.quantize`; ``gptq`` quantizes
without pruning). A :class:`PruneConfig` says what to do; the
calibrated methods run on the sequential driver (:mod:`.sequential`), magnitude and the searches' trials on
:mod:`.dense_statistics`."""
from __future__ import annotations

from ..data.calibration import DEFAULT_CALIB, DEFAULT_EVAL, CalibrationError, calibration_windows
from ..models.architecture import UnsupportedModel, find_decoder_layers
from .config import OBJECTIVES as ROTATE_OBJECTIVES
from .config import PruneConfig, RotateOptions, as_config
from .dense_statistics import DenseStatistics, collect_statistics, prune_from_statistics
from .magnitude import magnitude_mask
from .methods import ALL_METHODS, METHODS, QUANTIZERS
from .result import PruneResult
from .sequential import prune_sequential
from .sparsegpt import sparsegpt_prune
from .statistics import Hessian, InputNorms
from .wanda import wanda_mask


def prune(model, config: PruneConfig | str = "sparsegpt", pattern: str | None = None, sparsity: float | None = None,
          calib=None, *, inputs=None, **fields) -> PruneResult:
    """Prune ``model`` in place as ``config`` says: a :class:`PruneConfig`, or a method name (in :data:`METHODS`,
    or :data:`QUANTIZERS`' ``gptq``, which quantizes only) whose config is built from ``pattern``, ``sparsity`` and
    ``fields`` (any :class:`PruneConfig` field: ``prune(model, "wanda", "2:4", calib=calib)``); given with a
    config, they replace its fields.

    ``calib`` is a ``[N, L]`` tensor of token ids (see :func:`calibration_windows`) for the calibrated methods;
    ``inputs`` reuses first-block inputs from :func:`~.statistics.capture_inputs` (a search's trials)."""
    config = as_config(config, pattern, sparsity, **fields)
    if config.quantize_after:
        result = prune(model, config.full_precision(), calib=calib, inputs=inputs)
        return quantize_pruned(model, result, config, calib)
    if ALL_METHODS[config.method].statistics is None:
        return prune_from_statistics(model, config)
    if calib is None:
        raise ValueError(f"{config.method} needs calibration token ids (calib=[N, L] tensor)")
    return prune_sequential(model, calib, config, inputs)


def quantize_pruned(model, result: PruneResult, config: PruneConfig, calib) -> PruneResult:
    """Quantize the linears ``result`` pruned in ``model`` with ``config.quant`` by GPTQ on their fixed masks (pruned
    weights stay zero), calibrated on ``calib`` through the pruned model, layer after quantized layer; ``result``
    comes back with the scheme and the scales. The second stage of ``PruneConfig.quantize_after``."""
    gptq = PruneConfig("gptq", config.pattern, targets=tuple(result.masks), ignore=(), device=config.device,
                       offload=config.offload, progress=config.progress, blocksize=config.blocksize,
                       damp=config.damp, quantize=config.quantize, group_size=config.group_size,
                       scale_search=config.scale_search, sink_weight=config.sink_weight)
    quantized = prune_sequential(model, calib, gptq)
    result.quant, result.scales = quantized.quant, quantized.scales
    result.seconds += quantized.seconds
    return result


__all__ = [
    "DEFAULT_CALIB",
    "DEFAULT_EVAL",
    "METHODS",
    "QUANTIZERS",
    "CalibrationError",
    "DenseStatistics",
    "Hessian",
    "InputNorms",
    "PruneConfig",
    "PruneResult",
    "ROTATE_OBJECTIVES",
    "RotateOptions",
    "UnsupportedModel",
    "calibration_windows",
    "collect_statistics",
    "find_decoder_layers",
    "magnitude_mask",
    "prune",
    "prune_from_statistics",
    "prune_sequential",
    "quantize_pruned",
    "sparsegpt_prune",
    "wanda_mask",
]
