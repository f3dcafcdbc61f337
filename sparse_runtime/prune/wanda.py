"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2 over all calibration tokens, compared within each output row."""
from __future__ import annotations

import torch

from ..format.masks import pattern_mask
from .quantize import round_to_nearest
from .statistics import InputNorms, Method, Pruned


def scores(weight: torch.Tensor, sq_norms: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """Wanda's importance ``|W_ij| ||X_j||_2`` from ``sq_norms`` ``[in]`` (sum over tokens of ``x_j^2``, or any
    multiple of it: the order is the same); ``squared``: ``W_ij^2 ||X_j||^2``, the form a rotation is learned on."""
    if squared:
        return weight.pow(2) * sq_norms.unsqueeze(0)
    return weight.abs() * sq_norms.sqrt().unsqueeze(0)


def wanda_mask(weight: torch.Tensor, sq_norms: torch.Tensor, pattern: str = "2:4", sparsity: float = 0.5,
               prior: torch.Tensor | None = None, toward: str | None = None) -> torch.Tensor:
    """Mask from Wanda scores; N:M groups run along the input dim, unstructured is per output row (``prior``,
    ``toward``: see :func:`~sparse_runtime.format.masks.steer`)."""
    return pattern_mask(scores(weight.detach().float(), sq_norms.to(weight.device)), pattern, sparsity, "row",
                        prior, toward)


def prune_linear(linear, stats: InputNorms, pattern: str, sparsity: float, config, prior=None) -> Pruned:
    mask = wanda_mask(linear.weight, stats.sq, pattern, sparsity, prior, config.toward)
    linear.weight.mul_(mask)
    return Pruned(mask, round_to_nearest(linear, mask, config.quant, config.scale_search))


WANDA = Method("wanda", InputNorms, prune_linear)
