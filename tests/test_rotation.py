"""Rotations in front of a sparse matmul: full and block-diagonal R, shape checks."""
import pytest
import torch

from sparse_runtime.errors import ShapeError
from sparse_runtime.format.rotation import apply_rotation, check_rotation


@pytest.mark.parametrize("k,b", [(12, 4), (96, 32), (40, 40)])
def test_block_diagonal_equals_its_dense_matrix(k, b):
    gen = torch.Generator().manual_seed(k * b)
    blocks = torch.linalg.qr(torch.randn(k // b, b, b, generator=gen, dtype=torch.float64))[0]
    x = torch.randn(2, 3, k, generator=gen, dtype=torch.float64)
    dense = torch.zeros(k, k, dtype=torch.float64)  # built by hand: block i on the diagonal at rows/cols i*b..
    for i in range(k // b):
        dense[i * b:(i + 1) * b, i * b:(i + 1) * b] = blocks[i]
    assert torch.allclose(dense @ dense.T, torch.eye(k, dtype=torch.float64))
    # the reference product, element by element: y[t, j] = sum_i x[t, i] R[i, j]
    want = (x[..., :, None] * dense).sum(-2)
    torch.testing.assert_close(apply_rotation(x, blocks), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(apply_rotation(x, dense), want, rtol=1e-12, atol=1e-12)
    # Orthogonal R keeps norms: the point of rotating before pruning.
    torch.testing.assert_close(apply_rotation(x, blocks).norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize("shape", [(8, 4), (4, 4, 4), (2, 4, 5), (16,), (1, 2, 3, 4)])
def test_bad_shapes_are_named(shape):
    with pytest.raises(ShapeError, match=r"neither \[K, K\] nor block-diagonal"):
        check_rotation(torch.zeros(shape), 8)


def test_integer_rotation_is_rejected():
    with pytest.raises(TypeError, match="floating point"):
        check_rotation(torch.eye(8, dtype=torch.int32), 8)
    check_rotation(torch.eye(8), 8)
    check_rotation(torch.zeros(2, 4, 4), 8)
