"""Magnitude pruning: keep the largest |W|. Needs no calibration data."""
from __future__ import annotations

import time

import torch

from ..format.masks import pattern_mask
from ..models.architecture import decoder_linears, find_decoder_layers
from .layerwise import PruneResult, check_sparsity
from .rotate import rotate_by_weights


def magnitude_mask(weight: torch.Tensor, pattern: str = "2:4", sparsity: float = 0.5,
                   per: str = "matrix") -> torch.Tensor:
    """N:M: the n largest |w| of each m consecutive inputs of a row; unstructured: a per-row or per-matrix threshold."""
    return pattern_mask(weight.detach().abs(), pattern, sparsity, per)


@torch.no_grad()
def magnitude(model, calib=None, *, pattern: str = "2:4", sparsity: float = 0.5, targets=None,
              ignore=("lm_head",), per: str = "matrix", progress: bool = True, device=None, true_sequential=None,
              offload=False, record_errors=False, rotate=None, allocation=None, inputs=None) -> PruneResult:
    """Zero the smallest weights of every target linear in place. ``calib`` and the layerwise
    driver's options are accepted, so every method takes the same call, and unused. ``rotate``
    (:class:`~.rotate.RotateOptions`) first learns and folds rotations from the weights alone; ``allocation``
    (:class:`~.allocation.Allocation`) gives each decoder block its own pattern and sparsity."""
    check_sparsity(pattern, sparsity)
    chosen, skipped = decoder_linears(model, pattern, targets, ignore)
    t0 = time.perf_counter()
    result = PruneResult("magnitude", pattern, sparsity, skipped=skipped,
                         allocation=None if allocation is None else allocation.to_dict())
    if rotate is not None:
        result.rotation = rotate_by_weights(model, pattern, sparsity, rotate, progress)
    _, path = find_decoder_layers(model)
    for name, linear in chosen.items():
        block = int(name[len(path) + 1:].split(".")[0]) if name.startswith(path + ".") else None
        p, s = (pattern, sparsity) if allocation is None or block is None else allocation.block(block)
        if s == 0:
            continue
        mask = magnitude_mask(linear.weight, p, s, per)
        linear.weight.mul_(mask)
        result.masks[name] = mask
        result.patterns[name] = p
    result.seconds = time.perf_counter() - t0
    return result


