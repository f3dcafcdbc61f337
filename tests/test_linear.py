import copy

import pytest
import torch
from torch import nn

from sparse_runtime import SparseLinear, backends
from sparse_runtime.ops import cpu24
from sparse_runtime.errors import BackendUnavailable, MaskError, ShapeError
from sparse_runtime.format.masks import nm_mask
from sparse_runtime.format.quant import QuantScheme, fake_quantize


def _linear(k=24, n=10, bias=True, dtype=torch.float32):
    torch.manual_seed(torch.randint(0, 10**6, ()).item())
    return nn.Linear(k, n, bias=bias, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_masked_dense_bitwise(dtype, bias):
    lin = _linear(bias=bias, dtype=dtype)
    layer = SparseLinear.from_linear(lin, backend="reference")  # the format is exact: bit for bit
    mask = nm_mask(lin.weight.abs())
    x = torch.randn(2, 3, 24, dtype=dtype)
    ref = nn.functional.linear(x, lin.weight * mask, lin.bias)
    assert torch.equal(layer(x), ref)
    assert layer.weight.shape == lin.weight.shape and layer.weight.dtype == dtype


def test_matches_float64_reference():
    lin = _linear(k=172, n=33)
    layer = SparseLinear.from_linear(lin)
    x = torch.randn(5, 172)
    w64 = (lin.weight * nm_mask(lin.weight.abs())).double()
    ref = x.double() @ w64.T + lin.bias.double()
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_explicit_mask_and_bad_mask():
    lin = _linear()
    mask = nm_mask(torch.randn_like(lin.weight))
    layer = SparseLinear.from_linear(lin, mask=mask)
    assert torch.equal(layer.dense_weight(), lin.weight * mask)
    mask[0, :4] = True
    with pytest.raises(MaskError, match="row 0, group 0"):
        SparseLinear.from_linear(lin, mask=mask)


def test_state_dict_round_trip_and_keys():
    layer = SparseLinear.from_linear(_linear())
    sd = layer.state_dict()
    assert set(sd) == {"weight_values", "weight_meta", "bias"}
    fresh = SparseLinear(24, 10)
    fresh.load_state_dict(sd)
    x = torch.randn(4, 24)
    assert torch.equal(fresh(x), layer(x))


def test_dtype_and_device_moves_keep_meta_and_rebuild_backend_state():
    layer = SparseLinear.from_linear(_linear())
    x = torch.randn(3, 24)
    y = layer(x)
    layer.half()
    assert layer.weight_values.dtype == torch.float16 and layer.weight_meta.dtype == torch.uint8
    assert layer._runner is None
    torch.testing.assert_close(layer(x.half()).float(), y, rtol=1e-2, atol=1e-2)
    layer.to(torch.bfloat16).to("cpu")
    assert layer.bias.dtype == torch.bfloat16


def test_forward_rejects_bad_input():
    layer = SparseLinear.from_linear(_linear())
    with pytest.raises(ShapeError, match="last dimension 23"):
        layer(torch.randn(2, 23))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(2, 24, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="input is on meta"):
        layer(torch.randn(2, 24, device="meta"))
    layer(torch.randn(2, 24))
    layer.half()  # the check follows a move: the runner it compares against is rebuilt
    with pytest.raises(TypeError, match="does not match weight dtype torch.float16"):
        layer(torch.randn(2, 24))


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_under_autocast_an_input_in_autocasts_dtype_is_taken(backend):
    """Recovery trains under bf16 autocast: a bf16 input reaches an fp32 layer. A backend that runs F.linear
    (reference) follows autocast; any other gets x in the layer's dtype. Outside autocast it stays an error."""
    dense = _linear(n=40, k=48)
    layer = SparseLinear.from_linear(dense, backend=backend)
    x = torch.randn(3, 48)
    ref = x.double() @ layer.dense_weight().double().T + layer.bias.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    expected = torch.bfloat16 if layer.active_backend in ("reference", "decompressed") else torch.float32
    assert y.dtype == expected and torch.allclose(y.double(), ref, rtol=0.05, atol=0.05)
    with pytest.raises(TypeError, match="does not match weight dtype"):
        layer(x.bfloat16())


def test_from_linear_rejects_bad_weights():
    lin = _linear(k=22)
    with pytest.raises(ShapeError, match="in_features=22"):
        SparseLinear.from_linear(lin)
    lin = _linear()
    lin.weight.data[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        SparseLinear.from_linear(lin)
    with pytest.raises(TypeError, match="unsupported dtype"):
        SparseLinear(8, 4, dtype=torch.int8)


def test_unknown_or_unavailable_backend_is_a_clear_error():
    lin = _linear()
    with pytest.raises(BackendUnavailable, match="unknown backend 'nope'"):
        SparseLinear.from_linear(lin, backend="nope")


def test_auto_backend_works_on_cpu():
    layer = SparseLinear.from_linear(_linear(), backend="auto")
    assert layer.active_backend == ("cpu" if cpu24.available() else "decompressed")
    fp16 = SparseLinear.from_linear(_linear(dtype=torch.float16), backend="auto")
    assert fp16.active_backend == "decompressed"  # no CPU kernel takes fp16


def test_decompressed_backend_caches_lazily_and_matches_reference_bitwise():
    lin = _linear()
    layer = SparseLinear.from_linear(lin, backend="decompressed")
    state = layer._resolve()[1]
    assert state == {}  # nothing materialised until the first forward
    x = torch.randn(5, lin.in_features)
    y = layer(x)
    assert state["weight"].shape == lin.weight.shape
    ref = SparseLinear.from_linear(lin, backend="reference")
    assert torch.equal(y, ref(x))
    layer.double()  # a dtype move drops the cached weight
    assert layer._resolve()[1] == {} and layer(x.double()).dtype == torch.float64


@pytest.mark.parametrize("pattern", ["4:8", "1:4", "unstructured"])
def test_other_patterns_run_on_reference(pattern):
    lin = _linear(k=32)
    layer = SparseLinear.from_linear(lin, pattern=pattern, sparsity=0.7)
    w = layer.dense_weight()
    x = torch.randn(3, 32)
    assert torch.equal(layer(x), nn.functional.linear(x, w, lin.bias))
    fresh = SparseLinear(32, 10, pattern=pattern, nnz=layer.weight_values.numel())
    fresh.load_state_dict(copy.deepcopy(layer.state_dict()))
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize("block", [None, 8])
def test_rotation_in_front(block):
    lin = _linear(k=32)
    layer = SparseLinear.from_linear(lin)
    q, _ = torch.linalg.qr(torch.randn(32, 32) if block is None else torch.randn(32 // block, block, block))
    layer.set_rotation(q)
    x = torch.randn(4, 32, dtype=torch.float64)
    r = q.double() if block is None else torch.block_diag(*q.double())
    w = lin.weight.detach().double()  # magnitude 2:4 by hand: the two largest |w| of every group of four
    keep = torch.zeros_like(w, dtype=torch.bool).view(w.shape[0], -1, 4)
    keep.scatter_(-1, w.abs().view(w.shape[0], -1, 4).topk(2, dim=-1).indices, True)
    ref = (x @ r) @ (w * keep.view_as(w)).T + lin.bias.double()
    torch.testing.assert_close(layer(x.float()).double(), ref, rtol=1e-5, atol=1e-5)
    assert "rotation" in layer.state_dict()
    with pytest.raises(ShapeError, match="block-diagonal"):
        layer.set_rotation(torch.eye(16))


# -- quantized values ---------------------------------------------------------------------------------------
QUANT = [QuantScheme.parse("int8"), QuantScheme.parse("int4", 32), QuantScheme.parse("fp8")]


@pytest.mark.parametrize("quant", QUANT, ids=lambda s: s.name)
def test_quantized_layer_runs_on_auto_and_matches_the_float64_reference(quant):
    lin = _linear(k=64, n=12)
    mask = nm_mask(lin.weight.abs())
    layer = SparseLinear.from_linear(lin, mask, quant=quant)
    # the CPU kernels take int8 and int4 codes where they are built; fp8 falls back to dequantizing once
    cpu = quant.name in backends.get("cpu").capabilities.quant and backends.availability()["cpu"] is None
    assert layer.active_backend == ("cpu" if cpu else "decompressed")
    fq = fake_quantize(lin.weight.detach(), quant, mask=mask)
    assert torch.equal(layer.dense_weight(), fq) and layer.weight_values.dtype == quant.code_dtype
    x = torch.randn(5, 64)
    ref = x.double() @ fq.double().T + lin.bias.double()
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    decompressed = SparseLinear.from_linear(lin, mask, quant=quant, backend="decompressed")
    assert torch.equal(SparseLinear.from_linear(lin, mask, quant=quant, backend="reference")(x), decompressed(x))
    assert layer.sparsity == 0.5 and "quant=" + quant.name in repr(layer)


@pytest.mark.parametrize("quant", QUANT, ids=lambda s: s.name)
def test_quantized_state_dict_round_trips(quant):
    layer = SparseLinear.from_linear(_linear(k=64), quant=quant)
    sd = layer.state_dict()
    assert set(sd) == {"weight_values", "weight_meta", "weight_scales", "bias"}
    fresh = SparseLinear(64, 10, quant=quant)
    fresh.sparse_weight.validate()  # a fresh layer holds a valid all-zero weight
    fresh.load_state_dict(sd)
    x = torch.randn(4, 64)
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize("quant", QUANT, ids=lambda s: s.name)
def test_a_dtype_move_converts_the_scales_never_the_codes(quant):
    layer = SparseLinear.from_linear(_linear(k=64), quant=quant)
    codes, scales = layer.weight_values.clone(), layer.weight_scales.clone()
    layer.to(torch.bfloat16)
    assert layer.dtype == layer.weight_scales.dtype == layer.bias.dtype == torch.bfloat16
    assert layer.weight_values.dtype == quant.code_dtype and torch.equal(layer.weight_values, codes)
    assert torch.equal(layer.weight_scales, scales.bfloat16())
    layer(torch.randn(2, 64, dtype=torch.bfloat16))
    layer.float()
    assert torch.equal(layer.weight_values, codes) and layer.weight_scales.dtype == torch.float32


def test_every_backend_without_int8_refuses_quantized_layers_by_name():
    lin = _linear(k=64)
    for name in backends.names():
        backend = backends.get(name)
        layer = SparseLinear.from_linear(lin, quant=QuantScheme.parse("int8"), backend="reference")
        if name in ("reference", "decompressed", "cpu", "triton"):
            assert backend.unsupported(layer) is None
            continue
        assert backend.unsupported(layer) == "unsupported quantization int8; supported: none"
        if backend.unavailable(layer.weight_values.device) is None:  # the ones that could run here otherwise
            with pytest.raises(BackendUnavailable, match="cannot run .* int8 values.*unsupported quantization int8"):
                SparseLinear.from_linear(lin, quant=QuantScheme.parse("int8"), backend=name)
