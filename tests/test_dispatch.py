"""The dispatch backend: selection logic and cache format on CPU; measured choices on a GPU."""
import math

import pytest
import torch
from torch import nn

from sparse_runtime import SparseLinear, backends

from sparse_runtime.ops import caches
from sparse_runtime.backends import dispatch as dp
from sparse_runtime.format.quant import QuantScheme
from sparse_runtime.ops.timing import device_time_us


def test_select_prefers_dense_unless_clearly_faster():
    assert dp.select({"dense": 100.0, "cusparselt": 60.0, "triton": 80.0}) == "cusparselt"
    assert dp.select({"dense": 100.0, "cusparselt": 98.0}) == "dense"  # within the noise margin
    assert dp.select({"dense": 100.0, "cusparselt": 98.0}, margin=0.0) == "cusparselt"
    assert dp.select({"dense": 100.0, "triton": None, "cusparselt": math.inf}) == "dense"  # failed candidates
    assert dp.select({"dense": 10.0}) == "dense"
    with pytest.raises(ValueError, match="dense"):
        dp.select({"cusparselt": 1.0})


def test_completeness():
    assert dp.complete({"dense": 1.0, "cusparselt": None}, ["cusparselt"])
    assert not dp.complete({"dense": 1.0}, ["cusparselt"])
    assert not dp.complete(None, [])


def test_keys():
    # Each of shape, dtype, bias and rotation is another measurement, and so is each M bucket.
    args = [(14336, 4096, torch.float16, False), (4096, 14336, torch.float16, False),
            (14336, 4096, torch.bfloat16, False), (14336, 4096, torch.float16, True),
            (14336, 4096, torch.float16, False, (2, 32, 32)), (14336, 4096, torch.float16, False, (4, 32, 32))]
    keys = {dp.entry_key(dp.shape_key(*a), bucket) for a in args for bucket in (1024, 2048)}
    assert len(keys) == 2 * len(args)


def test_cache_file_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_RUNTIME_CACHE", str(tmp_path))
    cache = caches.DiskCache("dispatch.json")
    cache.bind("GPU|torch=2.11")
    cache.put(dp.entry_key("n=64,k=64,float16,bias=0,rot=none", 8), {"dense": 4.0, "cusparselt": 6.0})
    loaded = caches.load_cache_file(tmp_path / "dispatch.json")
    assert dp.select(loaded["GPU|torch=2.11"]["n=64,k=64,float16,bias=0,rot=none,m<=8"]) == "dense"


def test_measure_uses_graph_device_time_and_eager_only_for_what_will_not_capture(monkeypatch):
    # The timers are stubbed: this checks the policy, not the GPU.
    class Fake:
        capabilities = backends.Capabilities()

        def __init__(self, name):
            self.name = name

        def prepare(self, layer):
            return None

        def forward(self, layer, state, x):
            return self.name

    layer = SparseLinear(64, 32, backend="reference")
    st = dp._State({"triton": [Fake("triton"), None], "cusparselt": [Fake("cusparselt"), None]})
    monkeypatch.setattr(dp, "DECOMPRESSED", Fake("dense"))
    graph = {"dense": 10.0, "triton": 6.0, "cusparselt": 9.0}
    monkeypatch.setattr(dp, "device_time_us", lambda fn: graph[fn()])
    monkeypatch.setattr(dp, "time_us", lambda fn, **kw: {"dense": 5.0, "triton": 50.0, "cusparselt": 4.0}[fn()])
    assert dp.DispatchBackend()._measure(layer, st, 8) == graph

    def no_capture(fn):
        if fn() == "cusparselt":
            raise RuntimeError("operation not permitted when stream is capturing")
        return graph[fn()]

    # one candidate will not capture: it alone is timed eagerly, the others keep their graph times
    monkeypatch.setattr(dp, "device_time_us", no_capture)
    assert dp.DispatchBackend()._measure(layer, st, 8) == {"dense": 10.0, "triton": 6.0, "cusparselt": 4.0}


def test_only_the_chosen_layouts_stay_prepared(monkeypatch, tmp_path):
    # Timers and the GPU name are stubbed: this checks what the layer keeps after deciding, not the GPU.
    class Fake:
        capabilities = backends.Capabilities()

        def __init__(self, name):
            self.name = name

        def prepare(self, layer):
            return f"{self.name} layout"

        def forward(self, layer, state, x):
            assert self.name == "dense" or state == f"{self.name} layout"
            return self.name

    monkeypatch.setenv("SPARSE_RUNTIME_CACHE", str(tmp_path))
    monkeypatch.setattr(dp, "_TIMINGS", caches.DiskCache("dispatch.json"))
    monkeypatch.setattr(dp, "_section", lambda device: "stub")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # the CPU build has no CUDA
    monkeypatch.setattr(dp, "DECOMPRESSED", Fake("dense"))
    speed = {8: {"dense": 10.0, "triton": 5.0, "cusparselt": 9.0}, 512: {"dense": 10.0, "triton": 12.0, "cusparselt": 4.0}}
    layer = SparseLinear(64, 32, backend="reference")
    st = dp._State({"triton": [Fake("triton"), None], "cusparselt": [Fake("cusparselt"), None]})
    backend = dp.DispatchBackend()
    bucket = {}
    monkeypatch.setattr(dp, "device_time_us", lambda fn: speed[bucket["m"]][fn()])
    bucket["m"] = 8
    assert backend._decide(layer, st, 8) == "triton"
    assert st.candidates["triton"][1] == "triton layout" and st.candidates["cusparselt"][1] is None
    bucket["m"] = 512
    assert backend._decide(layer, st, 512) == "cusparselt"
    assert [st.candidates[n][1] for n in ("triton", "cusparselt")] == ["triton layout", "cusparselt layout"]


def test_registration_and_cpu():
    b = backends.get("dispatch")
    assert b.unavailable(torch.device("cpu"))
    assert "unsupported pattern 4:8" in b.unsupported(SparseLinear(64, 32, pattern="4:8"))
    assert SparseLinear(64, 32).active_backend != "dispatch"  # auto on CPU


def test_auto_runs_dispatch_on_a_gpu_and_decompressed_on_the_cpu(monkeypatch):
    """What the README promises of ``auto``, on a stand-in GPU where every backend would run."""
    for name in backends.names():
        monkeypatch.setattr(backends.get(name), "unavailable", lambda device: None)
    cpu = SparseLinear(64, 32, dtype=torch.float16)
    gpu = type("Layer", (), dict(pattern="2:4", in_features=64, out_features=32, bias=None, quant=None,
                                 dtype=torch.float16,
                                 weight_values=type("W", (), dict(device=torch.device("cuda"), dtype=torch.float16))))
    assert backends.resolve("auto", gpu).name == "dispatch"
    assert backends.resolve("auto", cpu).name == "decompressed"
    gpu.quant = QuantScheme.parse("int8")  # quantized values: the Triton kernel dequantizes them, dispatch refuses
    assert backends.resolve("auto", gpu).name == "triton"
    monkeypatch.setattr(backends.get("triton"), "unavailable", lambda device: "no GPU")  # then the fallback that dequantizes
    assert backends.resolve("auto", gpu).name == "reference"
    gpu.pattern, gpu.quant = "4:8", None  # no sparse CUDA kernel takes it: the dense fallback that runs everywhere
    assert backends.resolve("auto", gpu).name == "reference"


# -- GPU ------------------------------------------------------------------------------------------------
@pytest.fixture
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_RUNTIME_CACHE", str(tmp_path))
    dp._TIMINGS._section = None
    return tmp_path


@pytest.mark.gpu
def test_auto_resolves_to_dispatch_and_is_correct(fresh):
    torch.manual_seed(0)
    dense = nn.Linear(256, 128).half().cuda()
    layer = SparseLinear.from_linear(dense, backend="auto")
    assert layer.active_backend == "dispatch"
    ref = SparseLinear.from_linear(dense, backend="reference")
    for m in (1, 5, 64, 300):
        x = torch.randn(m, 256, device="cuda", dtype=torch.float16)
        torch.testing.assert_close(layer(x), ref(x), rtol=2e-2, atol=2e-2)
    table = dp.DispatchBackend.table(layer)
    assert set(table) == {1, 8, 64, 512}
    assert set(table.values()) <= {"dense", "cusparselt", "triton", "mmasp"}
    assert table[64] != "mmasp" and table[512] != "mmasp"  # decode only
    entries = next(iter(caches.load_cache_file(fresh / "dispatch.json").values()))
    assert len(entries) == 4 and all("dense" in t for t in entries.values())


@pytest.mark.gpu
def test_never_slower_than_dense(fresh):
    torch.manual_seed(0)
    dense = nn.Linear(4096, 4096, bias=False).half().cuda()
    layer = SparseLinear.from_linear(dense, backend="dispatch")
    w = layer.dense_weight()
    for m in (16, 2048):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
        layer(x)
        # Device time, the dispatcher's own criterion (eager calls add host overhead to every path).
        t_dispatch = device_time_us(lambda x=x: layer(x))
        t_dense = device_time_us(lambda x=x: torch.nn.functional.linear(x, w))
        assert t_dispatch <= t_dense * 1.05, (m, t_dispatch, t_dense)


@pytest.mark.gpu
def test_unmeasured_bucket_in_graph_runs_dense(fresh):
    torch.manual_seed(0)
    layer = SparseLinear.from_linear(nn.Linear(128, 64).half().cuda(), backend="dispatch")
    x = torch.randn(4, 128, device="cuda", dtype=torch.float16)
    expected = layer(x).clone()  # measures bucket 4 eagerly
    dp._TIMINGS.clear()
    layer._runner = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    graph.replay()
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)
    assert dp.DispatchBackend.table(layer) == {}
