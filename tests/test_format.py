import math

import pytest
import torch

from sparse_runtime.errors import MaskError, ShapeError
from sparse_runtime.format.codec import (SparseWeight, cdiv, compress_nm, decompress_nm, dtype_name, is_24,
                                         pack_bits, pack_meta_24, parse_pattern, unpack_bits, unpack_meta_24,
                                         unsupported_dtype, unsupported_pattern)
from sparse_runtime.format.masks import nm_mask, unstructured_mask

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4), (7, 12), (5, 172), (16, 64), (3, 36)])
def test_24_round_trip_is_exact(dtype, shape):
    w = torch.randn(shape).to(dtype)
    mask = nm_mask(w.abs(), 2, 4)
    values, meta = compress_nm(w, mask, 2, 4)
    assert values.shape == (shape[0], shape[1] // 2) and values.dtype == dtype
    assert meta.shape == (shape[0], (shape[1] + 7) // 8) and meta.dtype == torch.uint8
    assert torch.equal(decompress_nm(values, meta, 2, 4, shape[1]), w * mask)


def test_24_meta_bit_order_is_documented_one():
    # Row: group 0 keeps columns 1,3; group 1 keeps 0,2  -> nibbles 0b1101, 0b1000 -> byte 0x8D
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 4.0, 0.0]])
    values, meta = compress_nm(w, w != 0, 2, 4)
    assert values.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert meta.tolist() == [[0x8D]]
    # odd number of groups: high nibble of the last byte is padding
    values, meta = compress_nm(w[:, :4], w[:, :4] != 0, 2, 4)
    assert meta.tolist() == [[0x0D]]


def test_meta_pack_unpack_inverse():
    idx = torch.sort(torch.rand(6, 9, 4).argsort(-1)[..., :2], -1).values
    assert torch.equal(unpack_meta_24(pack_meta_24(idx), 36), idx)


@pytest.mark.parametrize("pattern,k", [("4:8", 24), ("1:4", 20), ("2:8", 16), ("8:16", 32)])
def test_general_nm_round_trip(pattern, k):
    n, m = parse_pattern(pattern)
    w = torch.randn(5, k)
    mask = nm_mask(w.abs(), n, m)
    sw = SparseWeight.compress(w, mask, pattern)
    assert sw.values.shape == (5, k * n // m)
    sw.validate()
    assert torch.equal(sw.to_dense(), w * mask)
    assert torch.equal(sw.mask(), mask)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unstructured_round_trip(dtype):
    w = torch.randn(9, 13).to(dtype)
    mask = unstructured_mask(w.abs(), 0.7)
    sw = SparseWeight.compress(w, mask, "unstructured")
    sw.validate()
    assert sw.values.numel() == int(mask.sum())
    assert torch.equal(sw.to_dense(), w * mask)
    assert torch.equal(unpack_bits(pack_bits(mask), 13), mask)


def test_compress_without_mask_uses_nonzeros_and_fills_short_groups():
    w = torch.tensor([[0.0, 0.0, 0.0, 5.0, 1.0, 2.0, 0.0, 0.0]])
    sw = SparseWeight.compress(w)
    assert torch.equal(sw.to_dense(), w)
    sw.validate()


def test_too_many_nonzeros_without_mask_names_row_and_group():
    w = torch.ones(2, 8)
    with pytest.raises(MaskError, match="row 0, group 0"):
        SparseWeight.compress(w)


def test_mask_violating_24_names_row_and_group():
    w = torch.randn(3, 8)
    mask = nm_mask(w.abs())
    mask[2, 5] = ~mask[2, 5]
    with pytest.raises(MaskError, match="row 2, group 1"):
        SparseWeight.compress(w, mask)


def test_in_features_not_divisible():
    with pytest.raises(ShapeError, match="not divisible"):
        SparseWeight.compress(torch.randn(2, 6))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_unsupported_dtype(dtype):
    with pytest.raises(TypeError, match="unsupported dtype"):
        SparseWeight.compress(torch.zeros(2, 8, dtype=dtype))


def test_unsupported_dtype_names_them_all():
    with pytest.raises(TypeError, match="w: unsupported dtype int8; supported: float16, bfloat16, float32, float64$"):
        SparseWeight.compress(torch.zeros(2, 8, dtype=torch.int8), name="w")
    assert unsupported_dtype(torch.float16, (torch.float16,)) is None


def test_pattern_predicates():
    assert is_24("2:4") and is_24("02:4") and not is_24("4:8") and not is_24("unstructured")
    assert unsupported_pattern("02:4", ("2:4",)) is None
    assert unsupported_pattern("4:8", ("2:4", "1:4")) == "unsupported pattern 4:8; supported: 2:4, 1:4"
    assert unsupported_pattern("unstructured", ("2:4",)) == "unsupported pattern unstructured; supported: 2:4"


@pytest.mark.parametrize("dtype, name, short", [(torch.float16, "float16", "fp16"), (torch.bfloat16, "bfloat16", "bf16"),
                                                (torch.float32, "float32", "fp32"), (torch.int8, "int8", "int8")])
def test_dtype_names(dtype, name, short):
    assert dtype_name(dtype) == name and dtype_name(dtype, short=True) == short
    assert getattr(torch, name) is dtype


@pytest.mark.parametrize("a, b", [(0, 8), (1, 8), (8, 8), (9, 8), (17, 16), (1000, 7)])
def test_cdiv(a, b):
    assert cdiv(a, b) == math.ceil(a / b)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_rejected(bad):
    w = torch.randn(4, 8)
    w[1, 3] = bad
    with pytest.raises(ValueError, match="row 1, column 3"):
        SparseWeight.compress(w)


def test_validate_catches_corrupt_meta():
    w = torch.randn(4, 12)
    sw = SparseWeight.compress(w, nm_mask(w.abs()))
    sw.meta[2, 0] = 0x00  # indices (0, 0): not strictly increasing
    with pytest.raises(ShapeError, match="row 2, group 0"):
        sw.validate()
    sw = SparseWeight.compress(w, nm_mask(w.abs()))
    sw.meta[0, -1] |= 0x10  # padding nibble of an odd group count
    with pytest.raises(ShapeError, match="padding"):
        sw.validate()
    with pytest.raises(ShapeError, match="values"):
        SparseWeight("2:4", (4, 12), torch.zeros(4, 5), sw.meta).validate()


@pytest.mark.parametrize("bad", ["2-4", "4:2", "0:4", "x", "2:4:8"])
def test_parse_pattern_rejects(bad):
    with pytest.raises(ValueError):
        parse_pattern(bad)
