"""Quantization in the pruning front-end: which linears a scheme can take, and round-to-nearest after masking.

The schemes and their arithmetic are :mod:`sparse_runtime.format.quant`'s; this module only applies them to the
linears a prune chose. Magnitude and Wanda round the kept weights to the nearest grid point under absmax scales
of the kept entries (:func:`round_to_nearest`); SparseGPT quantizes inside its column sweep and GPTQ is that sweep
with nothing pruned (:mod:`.sparsegpt`, :mod:`.gptq`)."""
from __future__ import annotations

import torch

from ..errors import ShapeError
from ..format.quant import QuantScheme, absmax_scales, fake_quantize


def check_groups(scheme: QuantScheme | None, linears: dict) -> None:
    """Refuse, before any weight changes, a grouped ``scheme`` whose group size does not divide every chosen
    linear's in_features; the error names the first such linear."""
    if scheme is None:
        return
    for name, linear in linears.items():
        try:
            scheme.groups(linear.in_features)
        except ShapeError as e:
            raise ShapeError(f"{name}: {e}; choose another group_size or leave it out (ignore=...)") from None


@torch.no_grad()
def round_to_nearest(linear, keep: torch.Tensor, scheme: QuantScheme | None) -> torch.Tensor | None:
    """Round ``linear``'s kept weights to ``scheme``'s grid in place (pruned entries stay zero) under absmax
    scales of the kept entries; return the scales ``[out, groups]`` (None, and nothing done, without a scheme)."""
    if scheme is None:
        return None
    scales = absmax_scales(linear.weight, scheme, keep)
    linear.weight.copy_(fake_quantize(linear.weight, scheme, scales, keep))
    return scales
