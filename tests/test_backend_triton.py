"""The ``triton`` backend of SparseLinear: availability, rejections, and agreement with ``reference``."""
import pytest
import torch
from torch import nn

from sparse_runtime import SparseLinear, backends
from sparse_runtime.errors import BackendUnavailable
from sparse_runtime.format.quant import QuantScheme
from sparse_runtime.format.rotation import apply_rotation
from sparse24_cases import TOL, random_rotation


def make_layer(k, n, dtype, bias=True, seed=0, device="cpu", quant=None):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias).to(device=device, dtype=dtype)
    return SparseLinear.from_linear(lin, backend="triton", quant=quant)


def assert_matches_reference(layer, x):
    y = layer(x)
    assert layer.active_backend == "triton"
    layer.set_backend("reference")
    ref = layer(x)
    layer.set_backend("triton")
    assert y.shape == ref.shape and y.dtype == ref.dtype
    w = layer.dense_weight().double()
    xr = x.double() if layer.rotation is None else apply_rotation(x.double(), layer.rotation.double())
    scale = xr.abs().reshape(-1, w.shape[1]) @ w.abs().T + 1
    tol = TOL[x.dtype] * 2  # both sides round
    assert ((y.double() - ref.double()).abs().reshape(scale.shape) <= tol * scale).all()


def test_available_on_the_interpreter_only():
    backend = backends.get("triton")
    assert backend.unavailable(torch.device("cpu")) is None  # conftest sets TRITON_INTERPRET=1
    assert backends.availability("cpu")["triton"] is None


def test_unavailable_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA" in backends.get("triton").unavailable(torch.device("cpu"))


def test_auto_does_not_pick_triton_on_cpu():
    assert SparseLinear.from_linear(nn.Linear(16, 8)).active_backend != "triton"


@pytest.mark.parametrize("make,match", [
    (lambda: SparseLinear(16, 8, pattern="4:8"), "supported: 2:4"),
    (lambda: SparseLinear(16, 8, dtype=torch.float64), "dtype"),
])
def test_rejects_unsupported_layers(make, match):
    layer = make()
    with pytest.raises(BackendUnavailable, match=match):
        layer.set_backend("triton")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 9)])
def test_matches_reference(lead, dtype, bias):
    layer = make_layer(44, 40, dtype, bias, seed=len(lead) * 10 + lead[0])
    assert_matches_reference(layer, torch.randn(*lead, 44).to(dtype))


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32), ("fp8", None)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantized_layers_match_reference(scheme, group, dtype):
    layer = make_layer(96, 37, dtype, seed=3, quant=QuantScheme.parse(scheme, group))
    assert backends.get("triton").unsupported(layer) is None
    assert_matches_reference(layer, torch.randn(2, 3, 96).to(dtype))


def test_refuses_quantization_groups_it_cannot_tile():
    layer = SparseLinear.from_linear(nn.Linear(96, 8), quant=QuantScheme("int4", 24), backend="reference")
    with pytest.raises(BackendUnavailable, match="power of two"):
        layer.set_backend("triton")


@pytest.mark.parametrize("block", [None, 4, 32])
def test_rotation_matches_reference(block):
    layer = make_layer(128, 40, torch.float32, seed=7)
    layer.set_rotation(random_rotation(128, block, torch.float32, seed=8))
    assert_matches_reference(layer, torch.randn(5, 128))


def test_dtype_move_rebuilds_the_layout():
    layer = make_layer(44, 40, torch.float32)
    layer(torch.randn(2, 44))
    layer.half()
    assert_matches_reference(layer, torch.randn(2, 44).half())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16, 300])
def test_matches_reference_gpu(m, dtype):
    layer = make_layer(4096, 1024, dtype, device="cuda")
    assert "triton" in backends.names() and backends.availability("cuda")["triton"] is None
    assert_matches_reference(layer, torch.randn(2, m, 4096, device="cuda", dtype=dtype))
    layer.set_rotation(random_rotation(4096, 128, dtype, seed=3, device="cuda"))
    assert_matches_reference(layer, torch.randn(m, 4096, device="cuda", dtype=dtype))
