"""The ``cpu`` backend: what ``auto`` picks on the CPU, its numerics through SparseLinear (rotations, bias,
3-D inputs), no dense copy, and the fallbacks it leaves to ``decompressed``."""
import pytest
import torch
from torch import nn

from sparse_runtime import SparseLinear, backends
from sparse_runtime.format.quant import QuantScheme
from sparse_runtime.ops import cpu24

pytestmark = pytest.mark.skipif(not cpu24.available(), reason=str(cpu24.unavailable_reason()))


def _layers(n, k, bias, dtype, backend="cpu", quant=None):
    torch.manual_seed(0)
    dense = nn.Linear(k, n, bias=bias).to(dtype)
    return (SparseLinear.from_linear(dense, backend=backend, quant=quant),
            SparseLinear.from_linear(dense, backend="reference", quant=quant))


QUANT = [QuantScheme.parse("int8"), QuantScheme.parse("int4", 32), QuantScheme.parse("int4")]


def test_auto_picks_cpu_for_24_fp32_and_bf16():
    for dtype in (torch.float32, torch.bfloat16):
        layer, _ = _layers(24, 64, True, dtype, backend="auto")
        assert layer.active_backend == "cpu"


@pytest.mark.parametrize("quant", QUANT[:2], ids=lambda q: q.name)
def test_auto_picks_cpu_for_int8_and_int4_values(quant):
    for dtype in (torch.float32, torch.bfloat16):
        layer, _ = _layers(24, 64, True, dtype, backend="auto", quant=quant)
        assert layer.active_backend == "cpu"
    assert backends.get("cpu").capabilities.table()["quant"] == "int8, int4"  # what `sparse-runtime info` prints


@pytest.mark.parametrize("pattern, dtype, k, quant, why", [("4:8", torch.float32, 64, None, "pattern"),
                                                            ("2:4", torch.float16, 64, None, "dtype"),
                                                            ("2:4", torch.float32, 36, None, "multiple of 8"),
                                                            ("2:4", torch.float32, 64, "fp8", "quantization fp8")])
def test_auto_leaves_what_it_cannot_run_to_decompressed(pattern, dtype, k, quant, why):
    dense = nn.Linear(k, 16).to(dtype)
    layer = SparseLinear.from_linear(dense, backend="auto", pattern=pattern,
                                     quant=quant and QuantScheme.parse(quant))
    assert layer.active_backend == "decompressed"
    assert why in backends.get("cpu").unsupported(layer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 72), (3, 5, 72), (40, 72)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(shape, bias, dtype):
    layer, ref = _layers(33, 72, bias, dtype)
    x = torch.randn(*shape, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(layer(x), ref(x), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 128), (3, 5, 128), (40, 128)])
@pytest.mark.parametrize("quant", QUANT, ids=["int8", "int4-g32", "int4-g128"])
def test_quantized_matches_reference(quant, shape, dtype):
    """Through SparseLinear: the codes and scales as the layer stores them, against the reference backend (which
    dequantizes in the layer's dtype), decode and beyond."""
    layer, ref = _layers(33, 128, True, dtype, quant=quant)
    assert layer.active_backend == "cpu"
    x = torch.randn(*shape, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(layer(x), ref(x), rtol=tol, atol=tol)


@pytest.mark.parametrize("quant", [None, *QUANT[:2]], ids=["float", "int8", "int4"])
@pytest.mark.parametrize("block", [None, 8])
def test_rotation_is_applied_first(block, quant):
    layer, ref = _layers(16, 64, True, torch.float32, quant=quant)
    q = torch.linalg.qr(torch.randn(64 // (block or 64), block or 64, block or 64, dtype=torch.float64))[0]
    rot = (q[0] if block is None else q).float()
    layer.set_rotation(rot)
    ref.set_rotation(rot)
    x = torch.randn(4, 64)
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v)


@pytest.mark.parametrize("backend, dense_copy", [("cpu", False), ("decompressed", True)])
def test_holds_no_dense_weight(backend, dense_copy):
    layer, _ = _layers(64, 128, True, torch.float32, backend)
    layer(torch.randn(2, 128))  # decompressed builds its dense weight at the first forward
    state = layer._runner[1]
    held = [t for t in (*layer.parameters(), *layer.buffers(), *_tensors(state)) if t.numel() >= 64 * 128]
    assert bool(held) == dense_copy


def test_unavailable_off_the_cpu():
    assert backends.get("cpu").unavailable(torch.device("meta")) == "runs on CPU devices, not meta"


def test_beyond_decode_the_faster_path_is_measured_once_per_bucket(monkeypatch):
    from sparse_runtime.backends import cpu as backend

    layer, ref = _layers(24, 64, True, torch.float32)
    real, calls = cpu24.linear, []

    def recording(*args, path="", **kwargs):
        calls.append(path)
        return real(*args, path=path, **kwargs)

    now = [0]

    def timer():  # a "stream" call lasts 5 ticks, a "gemm" call 3, a "panels" call 1: panels must win
        now[0] += {"stream": 5, "gemm": 3, "panels": 1}[calls[-1]] if calls else 0
        return now[0]

    monkeypatch.setattr(backend.cpu24, "linear", recording)
    monkeypatch.setattr(backend, "_CHOSEN", {})
    assert backend.choose_path(layer, layer.bias.detach(), torch.randn(40, 64), timer=timer) == "panels"
    assert backend._CHOSEN == {(24, 64, torch.float32, None, 64): "panels"}
    assert calls == ["stream"] * 4 + ["gemm"] * 4 + ["panels"] * 4  # a warm-up and 3 timed calls each
    x = torch.randn(2, 25, 64)  # 50 rows: the same bucket, so no new measurement
    del calls[:]
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)
    assert calls == ["panels"]
    layer(torch.randn(8, 64))  # decode: always streamed, never measured
    assert calls == ["panels", ""]


@pytest.mark.parametrize("path", cpu24.PATHS)
@pytest.mark.parametrize("m", [17, 40, 130])
def test_every_path_beyond_decode_matches_reference(path, m):
    layer, ref = _layers(33, 72, True, torch.float32)
    x = torch.randn(m, 72)
    y = cpu24.linear(x, layer.weight_values, layer.weight_meta, layer.bias.detach(), path=path)
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)


def test_a_bad_path_is_refused():
    layer, _ = _layers(16, 64, False, torch.float32)
    with pytest.raises(ValueError, match="path must be"):
        cpu24.linear(torch.randn(20, 64), layer.weight_values, layer.weight_meta, path="dense")
