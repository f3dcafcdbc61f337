"""cuSPARSELt wrapper: pure logic on CPU; numerics, the bias epilogue, plan cache, overhead and graphs on a GPU."""
import time
import weakref

import pytest
import torch
from torch import nn

from sparse_runtime import BackendUnavailable, SparseLinear, backends
from sparse_runtime.ops import cusparselt as cs
from sparse_runtime.format.codec import SparseWeight
from sparse_runtime.format.masks import nm_mask


# -- pure logic ---------------------------------------------------------------------------------------
def test_padding_rules():
    assert cs.padded_shape(1, 4096, 4096, torch.float16) == (8, 4096, 4096)
    assert cs.padded_shape(17, 20, 36, torch.bfloat16) == (24, 32, 48)
    assert cs.padded_shape(3, 20, 36, torch.int8) == (16, 32, 64)
    assert cs.padded_shape(0, 16, 16, torch.float16)[0] == 8


def test_keys():
    a = cs.plan_key(0, 8, 64, 64, "float16", 0)
    assert a != cs.plan_key(0, 8, 64, 64, "float16", 1234)  # a plan captures its bias pointer
    key = cs.tune_key(64, 128, "float16", True, 32)  # a JSON key: a bias or another bucket is another search
    assert key != cs.tune_key(64, 128, "float16", False, 32) and key != cs.tune_key(64, 128, "float16", True, 64)


@pytest.fixture
def fake_capture(monkeypatch):
    """cuSPARSELt's allocation and plan logic with a stand-in for a GPU: flip ``state["capturing"]``."""
    state = {"capturing": False}
    monkeypatch.setattr(cs, "_capturing", lambda: state["capturing"])
    monkeypatch.setattr(cs, "_new_workspace", lambda index, nbytes: torch.empty(nbytes, dtype=torch.uint8))
    monkeypatch.setattr(cs, "_WORKSPACES", {})
    monkeypatch.setattr(cs, "_RETIRED", [])
    monkeypatch.setattr(cs, "_PROVISIONAL", set())
    monkeypatch.setattr(cs, "_PLANS", cs.LRU(8))
    monkeypatch.setattr(cs, "raw_stream", lambda index: 7)
    return state


def test_captures_leave_no_workspace_behind(fake_capture):
    """Each capture's workspace is a temporary of that graph (its pool keeps the memory): none is kept here, however
    many graphs are captured, and none comes from the shared table, so replacing an outgrown one frees it."""
    fake_capture["capturing"] = True
    captured = []
    for _ in range(5):  # five captures of a call that needs a workspace
        ws = cs._workspace(0, 7, 64)
        assert ws.numel() == 64
        captured.append(weakref.ref(ws))
        del ws
    assert all(ref() is None for ref in captured)  # freed with the call (the graph's pool holds the memory)
    assert cs._WORKSPACES == {} and cs._RETIRED == []
    fake_capture["capturing"] = False
    small = cs._workspace(0, 7, 64)
    assert cs._WORKSPACES[(0, 7)] is small and cs._workspace(0, 7, 32) is small  # eager calls share it
    outgrown = weakref.ref(small)
    del small
    big = cs._workspace(0, 7, 128)
    assert cs._WORKSPACES[(0, 7)] is big and outgrown() is None  # replaced and freed: only its stream used it
    fake_capture["capturing"] = True
    assert cs._workspace(0, 7, 32) is not big  # a capture never takes the shared one
    assert cs._workspace(0, 7, 0) is None


def test_search_times_device_time_in_graphs(fake_capture, monkeypatch):
    """The manual search times each (algorithm, split-K) with timing.device_time_us (CUDA graphs, L2 flushed),
    skips the ones the library refuses, and keeps the fastest; each candidate's workspace is its own."""
    cost = {(-1, -1): 9.0, (0, 1): 7.0, (0, 2): 5.0, (0, 4): 6.0, (1, 1): 8.0, (1, 4): 4.0}
    launched = []

    class Plan:
        max_alg_id = 1

        def __init__(self, *args):
            self.key, self.workspace_size = args[-2:], 256
            if self.key == (1, 2):
                raise RuntimeError("CUSPARSE_STATUS_NOT_SUPPORTED")

        def matmul(self, *args):
            launched.append((self.key, args[3]))

    def device_time(fn, calls, replays):
        fn()  # the call the graphs would capture
        return cost[launched[-1][0]]

    monkeypatch.setattr(cs, "_C", type("C", (), {"Plan": Plan}))
    monkeypatch.setattr(cs, "device_time_us", device_time)
    monkeypatch.delenv("SPARSE_RUNTIME_CSLT_SEARCH", raising=False)
    w = type("W", (), dict(index=0, npad=64, kpad=64, dtype_name="float16", bias_ptr=0, packed_ptr=0,
                           device=torch.device("cpu"), dtype=torch.float16))()
    assert cs._search(w, 8) == {"alg_id": 1, "split_k": 4, "us": 4.0}
    assert {key for key, _ in launched} == set(cost) and all(ws for _, ws in launched)
    assert cs._WORKSPACES == {}  # the candidates' workspaces were their own


def test_plan_made_in_a_capture_is_searched_at_the_next_eager_call(fake_capture, monkeypatch):
    class Plan:
        def __init__(self, *args):
            self.alg_id, self.workspace_size = args[-2], 128

    searched = []

    def config(w, mpad):  # the real one: library default in a capture, else a search
        if fake_capture["capturing"]:
            return -1, -1
        searched.append(mpad)
        return 3, 1

    monkeypatch.setattr(cs, "_C", type("C", (), {"Plan": Plan}))
    monkeypatch.setattr(cs, "_config", config)
    w = type("W", (), dict(index=0, npad=64, kpad=64, dtype_name="float16", bias_ptr=0))()
    fake_capture["capturing"] = True
    captured = cs.get_plan(w, 8)
    assert captured.alg_id == -1 and cs._WORKSPACES == {}  # nothing timed or grown inside the capture
    assert cs.get_plan(w, 8) is captured  # later captures reuse it
    fake_capture["capturing"] = False
    eager = cs.get_plan(w, 8)
    assert eager.alg_id == 3 and searched == [8] and captured in cs._RETIRED  # the captured graph keeps its plan
    assert cs._WORKSPACES[(0, 7)].numel() == 128  # sized at plan time, outside any capture
    assert cs.get_plan(w, 8) is eager and searched == [8]




# -- without a GPU ------------------------------------------------------------------------------------
def test_backend_registered():
    b = backends.get("cusparselt")
    assert b.unavailable(torch.device("cpu"))
    layer = SparseLinear(64, 32, dtype=torch.float32)
    assert "unsupported dtype float32; supported: float16, bfloat16" in b.unsupported(layer)
    assert "unsupported pattern 4:8; supported: 2:4" in b.unsupported(SparseLinear(64, 32, pattern="4:8",
                                                                                 dtype=torch.float16))
    assert b.unsupported(SparseLinear(64, 32, dtype=torch.float16)) is None


def test_cpu_calls_raise_clearly():
    w = torch.zeros(16, 16, dtype=torch.float16)
    with pytest.raises(BackendUnavailable, match="CUDA"):
        cs.compress_dense(w)
    with pytest.raises(ValueError, match="multiples of 16"):
        cs.compress_dense(torch.zeros(16, 20, dtype=torch.float16))
    with pytest.raises(BackendUnavailable):
        SparseLinear(64, 32, backend="cusparselt", dtype=torch.float16)._resolve()


def test_fake_impl_shapes():
    x = torch.empty(5, 32, device="meta", dtype=torch.float16)
    packed = torch.empty(100, dtype=torch.uint8, device="meta")
    assert torch.ops.sparse_runtime.cslt_linear(x, packed, None, 48, 32).shape == (5, 48)


# -- GPU ------------------------------------------------------------------------------------------------
def _sparse_weight(n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w = (w * nm_mask(w.abs(), 2, 4)).to(dtype).cuda()
    return w


def _ref(x, w, bias=None):
    y = x.double() @ w.double().t()
    return y if bias is None else y + bias.double()


def _close(y, ref, dtype):
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    scale = ref.abs().max().clamp_min(1.0)
    assert (y.double() - ref).abs().max() <= tol * scale, (y.double() - ref).abs().max()


@pytest.fixture
def gpu_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_RUNTIME_CACHE", str(tmp_path))
    monkeypatch.setenv("SPARSE_RUNTIME_CSLT_SEARCH", "off")  # searches are tested once, below
    cs._TUNED._section = None
    cs._PLANS.clear()
    if cs.unavailable("cuda"):
        pytest.skip(cs.unavailable("cuda"))
    return tmp_path


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, k", [(64, 128), (48, 80), (256, 512), (20, 36)])
@pytest.mark.parametrize("m", [1, 3, 17, 64, 257])
def test_linear_matches_float64(gpu_cache, m, n, k, dtype):
    w = _sparse_weight(n, k, dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    cw = cs.CusparseLtWeight.from_dense(w)
    y = cs.linear(x, cw)
    assert y.shape == (m, n) and y.dtype == dtype
    _close(y, _ref(x, w), dtype)


@pytest.mark.gpu
def test_bias_epilogue(gpu_cache):
    dtype = torch.float16
    w = _sparse_weight(96, 128, dtype)
    bias = torch.randn(96, device="cuda", dtype=dtype)
    x = torch.randn(33, 128, device="cuda", dtype=dtype)
    cw = cs.CusparseLtWeight.from_dense(w, bias)
    _close(cs.linear(x, cw), _ref(x, w, bias), dtype)


@pytest.mark.gpu
def test_canonical_expand(gpu_cache):
    w = _sparse_weight(64, 72, torch.float16)  # K/4 odd: the last meta nibble is padding
    sw = SparseWeight.compress(w)
    assert torch.equal(cs.expand_canonical(sw.values, sw.meta, 72), w)


@pytest.mark.gpu
def test_plan_cache_hit(gpu_cache):
    w = _sparse_weight(128, 128, torch.float16)
    a, b = cs.CusparseLtWeight.from_dense(w), cs.CusparseLtWeight.from_dense(w)
    x = torch.randn(40, 128, device="cuda", dtype=torch.float16)
    cs.linear(x, a)
    size, hits, plan = len(cs._PLANS), cs._PLANS.hits, a.last[1]
    for _ in range(5):
        cs.linear(x, a)
    assert a.last[1] is plan  # steady state: no look-up at all
    cs.linear(x, b)  # another layer of the same shape shares the plan
    assert b.last[1] is plan and len(cs._PLANS) == size and cs._PLANS.hits == hits + 1
    cs.linear(x[:17], a)  # a new M gets its own plan
    assert len(cs._PLANS) == size + 1


@pytest.mark.gpu
def test_search_is_cached_on_disk(gpu_cache, monkeypatch):
    monkeypatch.setenv("SPARSE_RUNTIME_CSLT_SEARCH", "manual")
    w = _sparse_weight(256, 256, torch.float16)
    cw = cs.CusparseLtWeight.from_dense(w)
    x = torch.randn(512, 256, device="cuda", dtype=torch.float16)
    _close(cs.linear(x, cw), _ref(x, w), torch.float16)
    entries = next(iter(cs.load_cache_file(gpu_cache / "cusparselt_search.json").values()))
    (found,) = [v for key, v in entries.items() if key.startswith("n=256,k=256") and key.endswith("m<=512")]
    assert found["us"] > 0 and isinstance(found["alg_id"], int)


@pytest.mark.gpu
def test_host_overhead(gpu_cache):
    """Host time per call after warm-up (target < 10 us on H100; asserted loosely against CI noise)."""
    cw = cs.CusparseLtWeight.from_dense(_sparse_weight(256, 256, torch.float16))
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    for _ in range(20):
        cs.linear(x, cw)
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(100):
            cs.linear(x, cw)
        times.append((time.perf_counter() - t0) / 100 * 1e6)
        torch.cuda.synchronize()
    us = sorted(times)[3]
    print(f"cusparselt host overhead: {us:.1f} us/call")
    assert us < 30


@pytest.mark.gpu
def test_sparse_linear_cuda_graph_and_compile(gpu_cache):
    torch.manual_seed(0)
    layer = SparseLinear.from_linear(nn.Linear(128, 96).half().cuda(), backend="cusparselt")
    ref = SparseLinear.from_linear(nn.Linear(128, 96).half().cuda(), backend="reference")
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 9, 128, device="cuda", dtype=torch.float16)
    _close(layer(x), ref(x).double(), torch.float16)

    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layer(static_x)  # warm-up: plan and search outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
    static_x.copy_(torch.randn_like(x))
    graph.replay()
    _close(static_y, ref(static_x).double(), torch.float16)

    compiled = torch.compile(layer, fullgraph=True)
    _close(compiled(x), ref(x).double(), torch.float16)


@pytest.mark.gpu
def test_custom_op_opcheck(gpu_cache):
    w = _sparse_weight(48, 64, torch.float16)
    cw = cs.CusparseLtWeight.from_dense(w, torch.randn(48, device="cuda", dtype=torch.float16))
    x = torch.randn(5, 64, device="cuda", dtype=torch.float16)
    torch.library.opcheck(torch.ops.sparse_runtime.cslt_linear.default, (x, cw.packed, cw.bias, 48, 64),
                          test_utils=("test_schema", "test_faketensor"))
