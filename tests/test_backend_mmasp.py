"""The ``mmasp`` backend: what it refuses (on any machine), and agreement with ``reference`` on a GPU."""
import pytest
import torch
from torch import nn

from sparse_runtime import SparseLinear, backends

from sparse_runtime.ops import mmasp
from sparse_runtime.backends import dispatch
from sparse_runtime.errors import BackendUnavailable, ShapeError


def test_registered_reached_only_through_dispatch():
    b = backends.get("mmasp")
    assert b.capabilities.auto_devices == () and b.capabilities.max_m == 16
    assert "mmasp" in dispatch.CANDIDATES
    assert dispatch.fits(b, 16) and not dispatch.fits(b, 32)
    assert dispatch.fits(backends.get("cusparselt"), 4096)  # no limit
    assert b.unavailable(torch.device("cpu"))  # CUDA only (or the extension is missing)
    assert SparseLinear.from_linear(nn.Linear(64, 16)).active_backend != "mmasp"


@pytest.mark.parametrize("make, match", [
    (lambda: SparseLinear(64, 16, pattern="4:8"), "supported: 2:4"),
    (lambda: SparseLinear(64, 16, dtype=torch.float32), "supported: float16, bfloat16"),
    (lambda: SparseLinear(96, 16, dtype=torch.float16), "multiple of 64"),
])
def test_unsupported_layers(make, match):
    assert match in backends.get("mmasp").unsupported(make())


def test_refused_below_sm80(monkeypatch):
    if mmasp._D is None:
        pytest.skip(mmasp._IMPORT_ERROR)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Tesla T4")
    assert "compute capability >= 8.0" in backends.get("mmasp").unavailable(torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 8)])
def test_matches_reference(lead, dtype):
    if backends.get("mmasp").unavailable(torch.device("cuda")):
        pytest.skip(backends.get("mmasp").unavailable(torch.device("cuda")))
    torch.manual_seed(len(lead))
    lin = nn.Linear(320, 200).to("cuda", dtype)
    layer = SparseLinear.from_linear(lin, backend="mmasp")
    ref = SparseLinear.from_linear(lin, backend="reference")
    x = torch.randn(*lead, 320, device="cuda", dtype=dtype)
    y = layer(x)
    assert layer.active_backend == "mmasp" and y.shape == (*lead, 200)
    w = ref.dense_weight().double()
    scale = x.double().abs().reshape(-1, 320) @ w.abs().T + 1
    tol = {torch.float16: 4e-3, torch.bfloat16: 3.2e-2}[dtype]
    assert ((y.double() - ref(x).double()).abs().reshape(scale.shape) <= tol * scale).all()
    with pytest.raises(ShapeError, match="M <= 16"):
        layer(torch.randn(17, 320, device="cuda", dtype=dtype))


@pytest.mark.gpu
def test_refuses_by_name_what_it_cannot_run():
    if backends.get("mmasp").unavailable(torch.device("cuda")):
        pytest.skip(backends.get("mmasp").unavailable(torch.device("cuda")))
    layer = SparseLinear.from_linear(nn.Linear(96, 16).to("cuda", torch.float16), backend="reference")
    with pytest.raises(BackendUnavailable, match="multiple of 64"):
        layer.set_backend("mmasp")
