"""Quantization in the pruning front-end: which linears a scheme can take, how a group's scale is chosen, and
round-to-nearest after masking.

The schemes and their arithmetic are :mod:`sparse_runtime.format.quant`'s; this module only applies them to the
linears a prune chose. A scale is the absmax of the group's kept entries, or with ``scale_search`` the clipped
scale of least rounding error (:func:`choose_scales`). Magnitude and Wanda round the kept weights to the nearest
grid point (:func:`round_to_nearest`); SparseGPT quantizes inside its column sweep and GPTQ is that sweep with
nothing pruned (:mod:`.sparsegpt`, :mod:`.gptq`)."""
from __future__ import annotations

import torch

from ..errors import ShapeError
from ..format.quant import QuantScheme, absmax_scales, fake_quantize


# The scale search: candidate fractions of the absmax scale, and the norm of the rounding error it minimises (GPTQ's
# reference grid search uses the 2.4-norm: between the squared error and the largest one)
CLIP_RATIOS = tuple(1 - i / 50 for i in range(26))  # 1.0 (absmax) down to 0.5
CLIP_NORM = 2.4


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
def choose_scales(weight: torch.Tensor, scheme: QuantScheme, mask: torch.Tensor | None = None,
                  search: bool = False) -> torch.Tensor:
    """Scales ``[N, groups]`` for ``weight``'s kept entries: their absmax, or with ``search`` each group's absmax
    scale times the :data:`CLIP_RATIOS` ratio whose rounding error (the :data:`CLIP_NORM`-norm of ``w - q`` over the
    group) is least. A clipped scale gives the many small weights finer steps and clips the few largest; absmax is
    a candidate, so no group's error grows."""
    scales = absmax_scales(weight, scheme, mask)
    if not search:
        return scales
    w = weight if mask is None else weight * mask
    trials = torch.stack([scales * ratio for ratio in CLIP_RATIOS])
    errors = torch.stack([(w - fake_quantize(w, scheme, t)).float().abs().pow(CLIP_NORM)
                          .reshape(w.shape[0], scales.shape[1], -1).sum(-1) for t in trials])
    return trials.gather(0, errors.argmin(0, keepdim=True))[0]  # argmin: the first least, so ties keep absmax


@torch.no_grad()
def round_to_nearest(linear, keep: torch.Tensor, scheme: QuantScheme | None,
                     search: bool = False) -> torch.Tensor | None:
    """Round ``linear``'s kept weights to ``scheme``'s grid in place (pruned entries stay zero) under
    :func:`choose_scales`' scales of the kept entries; return the scales ``[out, groups]`` (None, and nothing
    done, without a scheme)."""
    if scheme is None:
        return None
    scales = choose_scales(linear.weight, scheme, keep, search)
    linear.weight.copy_(fake_quantize(linear.weight, scheme, scales, keep))
    return scales
