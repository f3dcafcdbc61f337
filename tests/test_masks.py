import pytest
import torch

from sparse_runtime.errors import MaskError, ShapeError
from sparse_runtime.format.masks import (nm_mask, sparsity,
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


def _reference_nm_mask(scores, n, m):
    """The reference Wanda/SparseGPT loop: per group of columns, topk(largest=False) picks the pruned ones."""
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    for i in range(0, scores.shape[1], m):
        pruned.scatter_(1, i + torch.topk(scores[:, i:i + m].float(), m - n, dim=1, largest=False)[1], True)
    return ~pruned


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_breaks_ties_exactly_as_the_reference_topk(n, m):
    # Few distinct values, as on a 4-bit grid: most groups hold ties, where a different rule would differ.
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (256, 8 * m), generator=g).float()
    ref = _reference_nm_mask(scores, n, m)
    assert torch.equal(nm_mask(scores, n, m), ref)
    lower_first = torch.ones_like(scores, dtype=torch.bool).view(-1, m).scatter_(
        -1, torch.sort(scores.view(-1, m), stable=True).indices[:, : m - n], False).view(scores.shape)
    assert not torch.equal(lower_first, ref)  # the tie rule matters on this input: the test can fail
    assert torch.equal(nm_mask(scores.half(), n, m), ref)  # scored in float32, as the reference does


def test_validate_nm_error_names_row_and_group():
    mask = nm_mask(torch.randn(4, 16))
    mask[3, 9] = ~mask[3, 9]
    with pytest.raises(MaskError, match=r"row 3, group 2 \(columns 8..11\)"):
        validate_nm(mask, 2, 4, name="q_proj")
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


@pytest.mark.parametrize("shape", [(3, 5), (16, 64), (1, 1), (7, 172)])
def test_packed_masks_round_trip_at_an_eighth_of_the_memory(shape):
    from sparse_runtime.format.masks import PackedMasks

    mask = torch.rand(shape) < 0.5
    packed = PackedMasks({"a": mask, "b": ~mask})
    assert list(packed) == ["a", "b"] and len(packed) == 2
    assert torch.equal(packed["a"], mask) and torch.equal(packed["b"], ~mask) and packed["a"].dtype == torch.bool
    assert packed.nbytes() == 2 * shape[0] * -(-shape[1] // 8)
    del packed["a"]
    assert "a" not in packed and dict(packed).keys() == {"b"}
    with pytest.raises(ShapeError, match="2-D"):
        packed["c"] = torch.ones(4, dtype=torch.bool)
