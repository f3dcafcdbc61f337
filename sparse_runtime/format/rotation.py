"""Orthogonal input rotations applied in front of a sparse matmul: ``Y = (X @ R) @ W^T``.

``R`` is either a full ``[K, K]`` matrix or block-diagonal, stored as its blocks
``[K/b, b, b]``. Rotated (DenoiseRotator-style) models keep ``R`` beside the
sparse weight; backends that can fuse it into the matmul do so."""
from __future__ import annotations

import torch

from ..errors import ShapeError


def check_rotation(rotation: torch.Tensor, in_features: int, name: str = "rotation") -> None:
    if rotation.dim() == 2:
        ok = tuple(rotation.shape) == (in_features, in_features)
    elif rotation.dim() == 3:
        nb, b, b2 = rotation.shape
        ok = b == b2 and nb * b == in_features
    else:
        ok = False
    if not ok:
        raise ShapeError(
            f"{name}: shape {tuple(rotation.shape)} is neither [K, K] nor block-diagonal [K/b, b, b] for K={in_features}"
        )
    if not torch.is_floating_point(rotation):
        raise TypeError(f"{name}: rotation must be floating point, got {rotation.dtype}")


def apply_rotation(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """``x @ R`` for a full or block-diagonal ``R``."""
    if rotation.dim() == 2:
        return x @ rotation
    nb, b, _ = rotation.shape
    # one batched matmul over the blocks: [nb, tokens, b] @ [nb, b, b] (broadcasting R per token would copy it)
    blocks = x.reshape(-1, nb, b).transpose(0, 1)
    return (blocks @ rotation).transpose(0, 1).reshape(x.shape)

