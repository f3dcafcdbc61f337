"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2 over all calibration tokens, compared within each output row."""
from __future__ import annotations

import torch

from ..format.masks import pattern_mask
from .layerwise import PruneResult, prune_layerwise
from .statistics import InputNorms


def wanda_mask(weight: torch.Tensor, sq_norms: torch.Tensor, pattern: str = "2:4",
               sparsity: float = 0.5) -> torch.Tensor:
    """Mask from Wanda scores; N:M groups run along the input dim, unstructured is per output row."""
    scores = weight.detach().float().abs() * sq_norms.to(weight.device).sqrt().unsqueeze(0)
    return pattern_mask(scores, pattern, sparsity, per="row")


def wanda(model, calib: torch.Tensor, *, pattern: str = "2:4", sparsity: float = 0.5, true_sequential: bool = False,
          **options) -> PruneResult:
    """Wanda, layer by layer. As in the paper all linears of a layer are scored on the
    unpruned layer's inputs (``true_sequential=False``)."""
    def prune_one(name, linear, stats: InputNorms, pattern, sparsity):
        mask = wanda_mask(linear.weight, stats.sq, pattern, sparsity)
        linear.weight.mul_(mask)
        return mask

    return prune_layerwise(model, calib, InputNorms, prune_one, method="wanda", pattern=pattern,
                           sparsity=sparsity, true_sequential=true_sequential, **options)
