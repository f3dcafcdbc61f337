"""Masks: choose what to keep from scores, check a mask against a pattern, convert."""
from __future__ import annotations

from collections.abc import MutableMapping

import torch

from ..errors import MaskError, ShapeError
from .codec import _groups_keep, pack_bits, parse_pattern, unpack_bits


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the ``n`` highest scores of each group of ``m`` consecutive entries along the last dim.

    The ``m - n`` entries pruned are ``torch.topk(group, m - n, largest=False)``, the reference Wanda/SparseGPT
    rule, ties included: on quantised weights many groups hold equal magnitudes, and topk's choice among
    them (not the lower column) is what the published numbers were made with. topk's tie order is its
    kernel's, so a group of ties may be cut differently on CPU and CUDA, as in the reference code."""
    if scores.shape[-1] % m:
        raise ShapeError(f"last dimension {scores.shape[-1]} is not divisible by the group size {m}")
    if not 0 < n < m:
        raise ValueError(f"need 0 < n < m, got {n}:{m}")
    groups = scores.reshape(-1, m).float()
    drop = torch.topk(groups, m - n, dim=-1, largest=False).indices
    mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
    return mask.view(scores.shape)


def unstructured_mask(scores: torch.Tensor, sparsity: float, per: str = "row") -> torch.Tensor:
    """Drop the ``sparsity`` fraction of lowest scores, per output row or over the whole matrix."""
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
    if per not in ("row", "matrix"):
        raise ValueError(f"per must be 'row' or 'matrix', got {per!r}")
    flat = scores.float().reshape(scores.shape[0], -1) if per == "row" else scores.float().reshape(1, -1)
    drop = int(flat.shape[1] * sparsity)
    order = torch.sort(flat, dim=-1, stable=True).indices[:, :drop]
    mask = torch.ones_like(flat, dtype=torch.bool).scatter_(-1, order, False)
    return mask.view(scores.shape)


def pattern_mask(scores: torch.Tensor, pattern: str = "2:4", sparsity: float = 0.5, per: str = "row",
                 prior: torch.Tensor | None = None, toward: str | None = None) -> torch.Tensor:
    """One entry point for every pattern: N:M groups, or unstructured at ``sparsity``; ``prior`` and ``toward``
    constrain the choice as :func:`steer` says (a gradual schedule's steps)."""
    nm = parse_pattern(pattern)
    steered = steer(scores, prior, toward)
    mask = unstructured_mask(steered, sparsity, per) if nm is None else nm_mask(steered, *nm)
    check_prior(mask, prior)
    return mask


def steer(scores: torch.Tensor, prior: torch.Tensor | None = None, toward: str | None = None) -> torch.Tensor:
    """``scores`` for a mask chosen around an earlier one. Entries ``prior`` (an earlier keep mask) pruned score
    -inf, so a choice of the lowest scores drops them first; with ``toward`` (an N:M pattern), the N best of each
    group of M along the last dim score +inf, so an unstructured choice of at most ``1 - N/M`` drops no more than
    M - N of a group and a later N:M choice can complete it without restoring a pruned weight."""
    if prior is None and toward is None:
        return scores
    scores = scores.float()
    if prior is not None:
        scores = scores.masked_fill(~prior.to(scores.device, torch.bool), float("-inf"))
    if toward is not None:
        nm = parse_pattern(toward)
        if nm is None:
            raise ValueError(f"toward takes an N:M pattern, not {toward!r}")
        scores = scores.masked_fill(nm_mask(scores, *nm), float("inf"))
    return scores


def check_prior(mask: torch.Tensor, prior: torch.Tensor | None, name: str = "mask") -> None:
    """Raise :class:`MaskError` if ``mask`` keeps a weight the keep mask ``prior`` pruned (an earlier step of a
    gradual schedule pruned more than this one may: a lower sparsity, or more than M - N of a group of M)."""
    if prior is None:
        return
    back = mask & ~prior.to(mask.device, torch.bool)
    if back.any():
        raise MaskError(f"{name}: {int(back.sum())} weight(s) an earlier mask pruned would come back; each step "
                        "must prune a superset of the last (a higher sparsity, the same pattern's groups)")


def validate_nm(mask: torch.Tensor, n: int = 2, m: int = 4, name: str = "mask") -> None:
    """Raise :class:`MaskError` naming the first row/group that does not keep exactly ``n`` of ``m``."""
    if mask.dim() != 2:
        raise ShapeError(f"{name}: expected a 2-D mask, got shape {tuple(mask.shape)}")
    if mask.shape[1] % m:
        raise ShapeError(f"{name}: in_features={mask.shape[1]} is not divisible by the group size {m}")
    if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
        raise MaskError(f"{name}: mask values must be 0/1 or bool")
    _groups_keep(mask.bool(), n, m, name)


def sparsity(mask: torch.Tensor) -> float:
    return 1.0 - mask.float().mean().item()


class PackedMasks(MutableMapping):
    """A ``{name: 2-D bool mask}`` mapping that stores each mask as the format's row bitmap: a whole
    model's masks cost an eighth of their bool size (0.9 GB instead of 7 GB at 8B parameters); each
    unpacks when read."""

    def __init__(self, masks=None):
        self._packed: dict[str, tuple[torch.Tensor, int]] = {}
        self.update(masks or {})

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        if mask.dim() != 2:
            raise ShapeError(f"{name}: expected a 2-D mask, got shape {tuple(mask.shape)}")
        self._packed[name] = (pack_bits(mask.detach().bool()).cpu(), mask.shape[1])  # pack where it is: 1/8 the copy

    def __getitem__(self, name: str) -> torch.Tensor:
        packed, in_features = self._packed[name]
        return unpack_bits(packed, in_features)

    def __delitem__(self, name: str) -> None:
        del self._packed[name]

    def __iter__(self):
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def nbytes(self) -> int:
        return sum(p.numel() for p, _ in self._packed.values())
