"""Quantized values in the canonical format: the codec stores what ``fake_quantize`` computes, bit for bit, packs
int4 in the documented order, and ``validate`` refuses every corruption with a clear error."""
import pytest
import torch

from sparse_runtime.errors import QuantError, ShapeError
from sparse_runtime.format.codec import SparseWeight, expected_shapes
from sparse_runtime.format.masks import pattern_mask
from sparse_runtime.format.quant import QuantScheme, absmax_scales, fake_quantize, pack_int4, unpack_int4

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCHEMES = {"int8": QuantScheme.parse("int8"), "int4": QuantScheme.parse("int4"),
           "int4-g32": QuantScheme.parse("int4", 32), "fp8": QuantScheme.parse("fp8")}


def _weight(n=8, k=256, dtype=torch.float32, pattern="2:4", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)).to(dtype)
    return w, pattern_mask(w.abs(), pattern)


def _quantized(scheme="int8", dtype=torch.float32, **kw):
    w, mask = _weight(dtype=dtype, **kw)
    return SparseWeight.compress(w, mask, quant=SCHEMES[scheme]), w, mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_round_trip_is_fake_quantize_bit_for_bit(dtype, scheme):
    sw, w, mask = _quantized(scheme, dtype)
    s = SCHEMES[scheme]
    sw.validate()
    assert torch.equal(sw.to_dense(), fake_quantize(w, s, mask=mask))
    assert sw.to_dense().dtype == dtype == sw.dtype and sw.scales.dtype == dtype
    assert sw.values.dtype == s.code_dtype
    cols = 256 // 2 // (2 if s.name == "int4" else 1)
    assert sw.values.shape == (8, cols) and sw.scales.shape == (8, s.groups(256))
    assert torch.equal(sw.scales, absmax_scales(w, s, mask))
    assert torch.equal(sw.mask(), mask) and sw.nnz == 8 * 128


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_a_fake_quantized_weight_re_quantizes_exactly_under_its_scales(dtype, scheme):
    w, mask = _weight(dtype=dtype, seed=1)
    s = SCHEMES[scheme]
    scales = absmax_scales(w, s, mask)
    fq = fake_quantize(w, s, scales, mask)
    assert torch.equal(SparseWeight.compress(fq, mask, quant=s, scales=scales).to_dense(), fq)


@pytest.mark.parametrize("pattern", ["4:8", "1:4"])
def test_other_nm_patterns_quantize_too(pattern):
    w, mask = _weight(k=64, pattern=pattern)
    for s in (QuantScheme.parse("int8"), QuantScheme.parse("int4", 32)):
        sw = SparseWeight.compress(w, mask, pattern, quant=s)
        sw.validate()
        assert torch.equal(sw.to_dense(), fake_quantize(w, s, mask=mask))


def test_int4_packing_is_the_documented_order():
    codes = torch.tensor([[-7, 7, 0, 1]], dtype=torch.int8)
    packed = pack_int4(codes)
    # kept value 0 (code -7 -> 1) in the low nibble, kept value 1 (7 -> 15) in the high nibble
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0xF1, 0x98]]
    every = torch.arange(-7, 8, dtype=torch.int8).repeat(2, 2)
    assert torch.equal(unpack_int4(pack_int4(every)), every)


def test_nbytes_counts_codes_meta_and_scales():
    for scheme, code_bytes in (("int8", 8 * 128), ("int4", 8 * 64), ("fp8", 8 * 128)):
        sw, *_ = _quantized(scheme)
        assert sw.nbytes() == code_bytes + 8 * 32 + sw.scales.numel() * 4


def _corrupt(scheme, **change):
    sw, *_ = _quantized(scheme)
    for k, v in change.items():
        setattr(sw, k, v(sw) if callable(v) else v)
    return sw


@pytest.mark.parametrize("scheme,stored,code", [("int8", -128, -128), ("int4", 0x08, -8)])
def test_the_whole_twos_complement_range_is_a_valid_code(scheme, stored, code):
    """Our quantizer codes in [-qmax, qmax]; others' (compressed-tensors: absmax / 7.5) also use -8 / -128."""
    sw, *_ = _quantized(scheme)
    sw.values[0, 1] = stored  # int4 0x08: kept value 2 of row 0 (low nibble) codes 0, kept value 3 codes -8
    sw.validate()
    col = 3 if scheme == "int4" else 1
    assert sw.to_dense()[0, sw.mask()[0].nonzero()[col, 0]] == code * sw.scales[0, 0]


@pytest.mark.parametrize("scheme,change,error,match", [
    ("int4", dict(values=lambda sw: torch.full((8, 128), 0x88, dtype=torch.uint8)), ShapeError,
     r"values: shape \(8, 128\), expected \(8, 64\)"),
    ("int8", dict(values=lambda sw: sw.values.view(torch.uint8)), TypeError, "expected torch.int8 for int8 codes"),
    ("fp8", dict(values=lambda sw: sw.values.view(torch.int8)), TypeError, "float8_e4m3fn for fp8 codes"),
    ("fp8", dict(values=lambda sw: sw.values.view(torch.uint8).index_fill(1, torch.tensor([5]), 0xFF)
                 .view(torch.float8_e4m3fn)), QuantError, "column 5 holds a code outside the fp8 range"),
    ("int8", dict(scales=lambda sw: sw.scales[:, :0]), ShapeError, r"scales: shape \(8, 0\), expected \(8, 1\)"),
    ("int4", dict(scales=lambda sw: sw.scales[:4]), ShapeError, r"scales: shape \(4, 2\), expected \(8, 2\)"),
    ("int8", dict(scales=lambda sw: sw.scales.index_fill(0, torch.tensor([2]), float("nan"))), QuantError,
     "row 2, group 0 has scale nan; scales must be finite"),
    ("int8", dict(scales=lambda sw: sw.scales.index_fill(0, torch.tensor([1]), float("inf"))), QuantError,
     "must be finite"),
    ("int4", dict(scales=lambda sw: sw.scales.index_fill(1, torch.tensor([1]), 0.0)), QuantError,
     "row 0, group 1 has scale 0.0; scales must be > 0"),
    ("fp8", dict(scales=lambda sw: -sw.scales), QuantError, "scales must be > 0"),
    ("int8", dict(scales=lambda sw: sw.scales.to(torch.int32)), TypeError, "scales: unsupported dtype int32"),
    ("int8", dict(scales=None), QuantError, "scales and a quantization scheme go together"),
    ("int8", dict(quant=None), QuantError, "scales and a quantization scheme go together"),
    ("int4", dict(quant=QuantScheme("int4", 96)), ShapeError, "not divisible by the int4 group size 96"),
])
def test_validate_refuses_each_corruption(scheme, change, error, match):
    with pytest.raises(error, match=match):
        _corrupt(scheme, **change).validate()


def test_compress_refuses_what_cannot_be_quantized():
    w, mask = _weight(k=64)
    with pytest.raises(ShapeError, match="in_features=64 is not divisible by the int4 group size 128"):
        SparseWeight.compress(w, mask, quant=QuantScheme.parse("int4"))
    with pytest.raises(QuantError, match="unstructured weights cannot be quantized"):
        SparseWeight.compress(w, mask, "unstructured", quant=QuantScheme.parse("int8"))
    w16, mask16 = _weight(k=64, pattern="8:16")
    with pytest.raises(ShapeError, match="group_size 8 is not a multiple of the pattern's group of 16"):
        SparseWeight.compress(w16, mask16, "8:16", quant=QuantScheme("int4", 8))
    with pytest.raises(QuantError, match="scales given without a quantization scheme"):
        SparseWeight.compress(w, mask, scales=torch.ones(8, 1))
    s = QuantScheme.parse("int8")
    with pytest.raises(TypeError, match="scales: dtype bfloat16, expected the weight's float32"):
        SparseWeight.compress(w, mask, quant=s, scales=torch.ones(8, 1, dtype=torch.bfloat16))
    with pytest.raises(ShapeError, match=r"scales: shape \(8, 2\), expected \(8, 1\)"):
        SparseWeight.compress(w, mask, quant=s, scales=torch.ones(8, 2))
    with pytest.raises(QuantError, match="row 3, group 0 has scale 0.0"):
        SparseWeight.compress(w, mask, quant=s, scales=torch.ones(8, 1).index_fill(0, torch.tensor([3]), 0.0))
    with pytest.raises(ShapeError, match="int4 packs two codes per byte"):
        expected_shapes("1:4", (2, 4), quant=QuantScheme("int4"))  # one kept value per row
