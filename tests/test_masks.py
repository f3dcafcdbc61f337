import pytest
import torch

from sparse_runtime.errors import MaskError, ShapeError
from sparse_runtime.masks import (indices_to_mask, is_nm, mask_to_indices, nm_mask, pattern_mask, sparsity,
                                  unstructured_mask, validate_nm)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_mask_keeps_the_n_largest_of_each_group(n, m):
    scores = torch.randn(6, 4 * m)
    mask = nm_mask(scores, n, m)
    validate_nm(mask, n, m)
    g, k = scores.view(-1, m), mask.view(-1, m)
    kept_min = torch.where(k, g, torch.inf).min(-1).values
    dropped_max = torch.where(~k, g, -torch.inf).max(-1).values
    assert (kept_min >= dropped_max).all()


def test_nm_mask_ties_drop_the_lower_columns():
    assert nm_mask(torch.ones(1, 4)).tolist() == [[False, False, True, True]]
    assert nm_mask(torch.tensor([[3.0, 1, 1, 2]])).tolist() == [[True, False, False, True]]
    assert nm_mask(torch.tensor([[1.0, 1, 1, 1, 2, 2, 2, 2]]), 3, 8).tolist() == [[False] * 5 + [True] * 3]


def test_validate_nm_error_names_row_and_group():
    mask = nm_mask(torch.randn(4, 16))
    mask[3, 9] = ~mask[3, 9]
    with pytest.raises(MaskError, match=r"row 3, group 2 \(columns 8..11\)"):
        validate_nm(mask, 2, 4, name="q_proj")
    assert not is_nm(mask)
    with pytest.raises(ShapeError):
        validate_nm(torch.ones(2, 6, dtype=torch.bool))


def test_unstructured_mask_hits_sparsity_per_row_and_matrix():
    s = torch.randn(10, 40)
    row = unstructured_mask(s, 0.6, per="row")
    assert (row.sum(1) == 16).all()
    mat = unstructured_mask(s, 0.25, per="matrix")
    assert abs(sparsity(mat) - 0.25) < 1e-6
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\)"):
            unstructured_mask(s, bad)


def test_indices_mask_round_trip():
    mask = pattern_mask(torch.randn(5, 32), "4:8")
    idx = mask_to_indices(mask, 4, 8)
    assert idx.shape == (5, 4, 4)
    assert torch.equal(indices_to_mask(idx, 8), mask)


@pytest.mark.parametrize("shape", [(3, 5), (16, 64), (1, 1), (7, 172)])
def test_packed_masks_round_trip_at_an_eighth_of_the_memory(shape):
    from sparse_runtime.masks import PackedMasks

    mask = torch.rand(shape) < 0.5
    packed = PackedMasks({"a": mask, "b": ~mask})
    assert list(packed) == ["a", "b"] and len(packed) == 2
    assert torch.equal(packed["a"], mask) and torch.equal(packed["b"], ~mask) and packed["a"].dtype == torch.bool
    assert packed.nbytes() == 2 * shape[0] * -(-shape[1] // 8)
    del packed["a"]
    assert "a" not in packed and dict(packed).keys() == {"b"}
    with pytest.raises(ShapeError, match="2-D"):
        packed["c"] = torch.ones(4, dtype=torch.bool)
