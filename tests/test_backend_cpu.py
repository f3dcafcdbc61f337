"""The ``cpu`` backend: what ``auto`` picks on the CPU, its numerics through SparseLinear (rotations, bias,
3-D inputs), no dense copy, and the fallbacks it leaves to ``decompressed``."""
import pytest
import torch
from torch import nn

from sparse_runtime import SparseLinear, backends
from sparse_runtime.ops import cpu24

pytestmark = pytest.mark.skipif(not cpu24.available(), reason=str(cpu24.unavailable_reason()))


def _layers(n, k, bias, dtype, backend="cpu"):
    torch.manual_seed(0)
    dense = nn.Linear(k, n, bias=bias).to(dtype)
    return SparseLinear.from_linear(dense, backend=backend), SparseLinear.from_linear(dense, backend="reference")


def test_auto_picks_cpu_for_24_fp32_and_bf16():
    for dtype in (torch.float32, torch.bfloat16):
        layer, _ = _layers(24, 64, True, dtype, backend="auto")
        assert layer.active_backend == "cpu"


@pytest.mark.parametrize("pattern, dtype, k, why", [("4:8", torch.float32, 64, "pattern"),
                                                     ("2:4", torch.float16, 64, "dtype"),
                                                     ("2:4", torch.float32, 36, "multiple of 8")])
def test_auto_leaves_what_it_cannot_run_to_decompressed(pattern, dtype, k, why):
    dense = nn.Linear(k, 16).to(dtype)
    layer = SparseLinear.from_linear(dense, backend="auto", pattern=pattern)
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


@pytest.mark.parametrize("block", [None, 8])
def test_rotation_is_applied_first(block):
    layer, ref = _layers(16, 64, True, torch.float32)
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
