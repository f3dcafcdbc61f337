"""Each backend's capability table: ``unsupported()`` and ``unavailable()`` refuse exactly what it excludes, with
the message the table builds, and accept the rest. ``REFUSES`` states what each backend must refuse,
independently of the tables, so a wrong table fails here too."""
import pytest
import torch

from sparse_runtime import SparseLinear, backends
from sparse_runtime.format.codec import FLOAT_DTYPES, dtype_name

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
PATTERNS = ("2:4", "1:4", "4:8", "unstructured")
# backend -> (dtypes, patterns it refuses, the most rows per call or None, the one device type it runs on or None)
REFUSES = {
    "reference": ((), (), None, None),
    "decompressed": ((), (), None, None),
    "cpu": ((F16, F64), ("1:4", "4:8", "unstructured"), None, "cpu"),
    "triton": ((F64,), ("1:4", "4:8", "unstructured"), None, "cuda"),
    "cusparselt": ((F32, F64), ("1:4", "4:8", "unstructured"), None, "cuda"),
    "torch": ((F32, F64), ("1:4", "4:8", "unstructured"), None, "cuda"),
    "mmasp": ((F32, F64), ("1:4", "4:8", "unstructured"), 16, "cuda"),
    "dispatch": ((), ("1:4", "4:8", "unstructured"), None, "cuda"),
}


def test_every_backend_has_a_row():
    assert set(backends.names()) <= set(REFUSES), "add the new backend's row to REFUSES"


@pytest.fixture(params=sorted(REFUSES))
def case(request):
    if request.param not in backends.names():
        pytest.skip(f"{request.param} is not registered here: {backends.availability().get(request.param)}")
    return backends.get(request.param), *REFUSES[request.param]


def _layer(dtype=F16, pattern="2:4"):
    return SparseLinear(128, 64, pattern=pattern, dtype=dtype)  # K = 128: every kernel's shape rules hold


def _refused(why: str | None) -> bool:
    return why is not None and why.startswith(("unsupported dtype", "unsupported pattern", "takes M <="))


@pytest.mark.parametrize("kind", ["dtype", "pattern"])
def test_dtypes_and_patterns(case, kind):
    backend, dtypes, patterns, *_ = case
    refused = dtypes if kind == "dtype" else patterns
    taken = next(d for d in (F16, F32) if d not in dtypes)  # a dtype it takes, for the pattern checks
    for item in FLOAT_DTYPES if kind == "dtype" else PATTERNS:
        why = backend.unsupported(_layer(**{kind: item}) if kind == "dtype" else _layer(taken, item))
        if item in refused:
            assert why == backend.capabilities.refusal(**{kind: item})
            assert why.startswith(f"unsupported {kind} {dtype_name(item) if kind == 'dtype' else item}; supported: ")
        else:
            assert not _refused(why), why


def test_rows_per_call(case):
    backend, _, _, max_m, _ = case
    caps = backend.capabilities
    layer = _layer(next(d for d in (F16, F32) if d not in case[1]))
    if max_m is None:
        assert not _refused(backend.unsupported(layer, m=1 << 20))
        return
    assert backend.unsupported(layer, m=max_m) is None
    assert backend.unsupported(layer, m=max_m + 1) == caps.refusal(m=max_m + 1) == \
        f"takes M <= {max_m} rows per call, got M={max_m + 1}"


def test_devices(case):
    backend, *_, only = case
    meta = torch.device("meta")  # no backend runs there; one without a device limit still passes the table
    if only:
        assert backend.unavailable(meta) == backend.capabilities.refusal(device=meta) == \
            f"runs on {only.upper()} devices, not meta"
    else:
        assert backend.unavailable(meta) is None

