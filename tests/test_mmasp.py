"""The mma.sp decode kernel (csrc/mmasp.cu via sparse_runtime.ops.mmasp) on a GPU, against float64 references.

Every test runs on fresh random data and poisons the memory the outputs will take (NaN) first, so an element
the kernel does not write shows."""
import pytest
import torch

from sparse_runtime.ops import mmasp
from sparse_runtime.ops import mmasp_layout as L
from sparse_runtime.errors import ShapeError
from sparse_runtime.format.codec import SparseWeight
from sparse_runtime.format.masks import nm_mask

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture
def gpu():
    why = mmasp.unavailable("cuda")
    if why:
        pytest.skip(why)
    return torch.device("cuda")


def poison():
    """Fill the caching allocator's free blocks with NaN: outputs allocated next start as NaN."""
    junk = [torch.full((1 << s,), float("nan"), device="cuda") for s in range(10, 25)]
    del junk


def weight(n, k, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    sw = SparseWeight.compress(w, nm_mask(w.float().abs()))
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return sw, b


def check(y, x, sw, b):
    w = sw.to_dense().double()
    ref = x.double().cpu() @ w.T + (0 if b is None else b.double())
    scale = x.double().abs().cpu() @ w.abs().T + 1
    err = (y.double().cpu() - ref).abs()
    assert torch.isfinite(y).all(), "an output element was not written"
    assert (err <= TOL[y.dtype] * scale).all(), f"max error {err.max().item():.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("n, k, bias", [(37, 192, True), (130, 320, False), (1000, 1088, True), (4096, 4096, True)])
def test_matches_float64_reference(gpu, m, n, k, bias, dtype):
    sw, b = weight(n, k, dtype, bias, seed=m + n + k)
    w = mmasp.MmaspWeight.from_canonical(sw.values.to(gpu), sw.meta.to(gpu), k, None if b is None else b.to(gpu))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype).to(gpu)
    poison()
    check(mmasp.linear(x, w), x, sw, b)
    assert (w.counters == 0).all()  # the last CTA of each column reset its counter


@pytest.mark.gpu
@pytest.mark.parametrize("split_chunks", [1, 2, 3, 16, L.MAX_SPLIT_COLUMNS // L.K_CHUNK])
def test_every_split_gives_the_same_sums(gpu, split_chunks):
    """Splits of K (one CTA column, uneven last splits, the most columns a CTA takes) all match the reference;
    a split is deterministic: the same bits on every call."""
    n, k, m = 200, 2048, 11
    sw, b = weight(n, k, torch.float16, True, seed=split_chunks)
    vals, meta = L.fragment_layout(sw.values, sw.meta, k)
    w = mmasp.MmaspWeight(vals.to(gpu), meta.to(gpu), n, k, torch.float16, b.to(gpu), split_chunks)
    x = torch.randn(m, k, device=gpu, dtype=torch.float16)
    poison()
    y = mmasp.linear(x, w)
    check(y, x, sw, b)
    assert torch.equal(y, mmasp.linear(x, w))


@pytest.mark.gpu
def test_cuda_graph_replay_and_strided_input(gpu):
    n, k = 512, 2048
    sw, b = weight(n, k, torch.bfloat16, True, seed=5)
    w = mmasp.MmaspWeight.from_canonical(sw.values.to(gpu), sw.meta.to(gpu), k, b.to(gpu))
    x = torch.randn(16, k + 8, device=gpu, dtype=torch.bfloat16)[:, 8:]  # not contiguous, misaligned by 16 B
    eager = mmasp.linear(x, w)
    check(eager, x, sw, b)
    static = x.contiguous()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = mmasp.linear(static, w)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.gpu
def test_refuses_bad_calls(gpu):
    sw, _ = weight(32, 128, torch.float16, False, seed=0)
    w = mmasp.MmaspWeight.from_canonical(sw.values.to(gpu), sw.meta.to(gpu), 128)
    for x, match in ((torch.zeros(17, 128), "M <= 16"), (torch.zeros(4, 64), "M <= 16"),
                     (torch.zeros(4, 128, dtype=torch.float32), "float32")):
        with pytest.raises(ShapeError, match=match):
            mmasp.linear(x.to(gpu, x.dtype if x.dtype == torch.float32 else torch.float16), w)
    with pytest.raises(ShapeError, match="multiple of 64"):
        mmasp.MmaspWeight.from_canonical(torch.zeros(16, 48, dtype=torch.float16, device=gpu),
                                         torch.zeros(16, 12, dtype=torch.uint8, device=gpu), 96)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_llama3_8b_grids_fit_one_wave_at_the_kernels_occupancy(gpu, dtype):
    """The split comes from the extension's occupancy: every Llama-3-8B shape's grid is resident at once (both
    variants), unless even the largest K slice needs a second wave (14336x4096 on 108 SMs)."""
    sms = torch.cuda.get_device_properties(gpu).multi_processor_count
    for n, k in [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]:
        per = mmasp.split_columns(n, k, gpu, dtype)
        ctas_n, split = L.grid(n, k, per)
        occupancy = [mmasp._D.ctas_per_sm(torch.cuda.current_device(), m, per, str(dtype)[6:]) for m in (1, 16)]
        assert min(occupancy) >= 1, occupancy
        assert ctas_n * split <= min(occupancy) * sms or per * L.K_CHUNK == L.MAX_SPLIT_COLUMNS, (n, k, occupancy)
    with pytest.raises(RuntimeError, match="split_chunks"):
        mmasp._D.ctas_per_sm(torch.cuda.current_device(), 1, L.MAX_SPLIT_COLUMNS // L.K_CHUNK + 1, "float16")
