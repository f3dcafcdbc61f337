"""Magnitude pruning: keep the largest |W|. Needs no calibration data."""
from __future__ import annotations

import torch

from ..format.masks import pattern_mask
from .quantize import round_to_nearest
from .statistics import Method, Pruned


def scores(weight: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """Magnitude's importance, ``|W|``; ``squared``: ``W^2``, the form a rotation is learned on (same order)."""
    return weight.pow(2) if squared else weight.abs()


def magnitude_mask(weight: torch.Tensor, pattern: str = "2:4", sparsity: float = 0.5, per: str = "matrix",
                   prior: torch.Tensor | None = None, toward: str | None = None) -> torch.Tensor:
    """N:M: the n largest |w| of each m consecutive inputs of a row; unstructured: a per-row or per-matrix threshold
    (``prior``, ``toward``: see :func:`~sparse_runtime.format.masks.steer`)."""
    return pattern_mask(scores(weight.detach()), pattern, sparsity, per, prior, toward)


def prune_linear(linear, stats, pattern: str, sparsity: float, config, prior=None) -> Pruned:
    mask = magnitude_mask(linear.weight, pattern, sparsity, config.per, prior, config.toward)
    linear.weight.mul_(mask)
    return Pruned(mask, round_to_nearest(linear, mask, config.quant, config.scale_search))


MAGNITUDE = Method("magnitude", None, prune_linear)
