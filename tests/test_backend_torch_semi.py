"""The ``torch`` backend over torch._cslt_sparse_mm: registration on CPU; numerics, compile and graphs on GPU."""
import pytest
import torch
from torch import nn

from sparse_runtime import SparseLinear, backends


def test_registration_and_cpu():
    b = backends.get("torch")
    assert "CUDA" in b.unavailable(torch.device("cpu"))
    assert b.unsupported(SparseLinear(64, 32, dtype=torch.float16)) is None
    assert b.unsupported(SparseLinear(64, 32, dtype=torch.float32))


def test_fake_impl_shapes():
    x = torch.empty(5, 40, device="meta", dtype=torch.float16)
    packed = torch.empty(10, dtype=torch.uint8, device="meta")
    assert torch.ops.sparse_runtime.torch_semi_linear(x, packed, None, 20, 32, 48).shape == (5, 20)


def _pair(n, k, bias, dtype=torch.float16):
    torch.manual_seed(0)
    dense = nn.Linear(k, n, bias=bias).to(dtype).cuda()
    return (SparseLinear.from_linear(dense, backend="torch"), SparseLinear.from_linear(dense, backend="reference"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, k, bias", [(64, 128, True), (40, 72, False), (256, 512, True)])
@pytest.mark.parametrize("m", [1, 3, 17, 130])
def test_matches_reference(m, n, k, bias, dtype):
    if backends.get("torch").unavailable(torch.device("cuda")):
        pytest.skip(backends.get("torch").unavailable(torch.device("cuda")))
    layer, ref = _pair(n, k, bias, dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    tol = 2e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(layer(x), ref(x), rtol=tol, atol=tol)


@pytest.mark.gpu
def test_compile_and_cuda_graph():
    if backends.get("torch").unavailable(torch.device("cuda")):
        pytest.skip(backends.get("torch").unavailable(torch.device("cuda")))
    layer, ref = _pair(96, 128, True)
    x = torch.randn(3, 7, 128, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), ref(x), rtol=2e-2, atol=2e-2)
    layer(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(y, ref(x), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_custom_op_opcheck():
    if backends.get("torch").unavailable(torch.device("cuda")):
        pytest.skip(backends.get("torch").unavailable(torch.device("cuda")))
    layer, _ = _pair(40, 72, True)
    packed, bias, npad, kpad = layer._resolve()[1]
    x = torch.randn(5, 72, device="cuda", dtype=torch.float16)
    torch.library.opcheck(torch.ops.sparse_runtime.torch_semi_linear.default, (x, packed, bias, 40, npad, kpad),
                          test_utils=("test_schema", "test_faketensor"))
