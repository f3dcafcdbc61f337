"""sparse_runtime.ops.triton_ops: layout, checks and errors, the torch.library custom ops."""
import pytest
import torch

from sparse_runtime.ops import triton_ops
from sparse_runtime.errors import ShapeError
from sparse_runtime.format.codec import unpack_meta_24
from sparse24_cases import assert_close, random_layer, random_rotation, reference


def test_meta_int32_layout_matches_the_format():
    sw, values, meta = random_layer(8, 136, torch.float32, seed=11)
    assert meta.dtype == torch.int32 and meta.shape == (8, 5)  # ceil(136 / 32)
    idx = unpack_meta_24(sw.meta, 136)  # [N, K/4, 2]
    g = torch.arange(136 // 4)
    nib = (meta.long()[:, g // 8] >> (4 * (g % 8))) & 0xF
    assert torch.equal(nib, (1 << idx[..., 0]) | (1 << idx[..., 1]))  # the kept columns' bitmask
    assert (meta[:, -1].long() >> 8 == 0).all()  # 136 = 4 * 32 + 8: one meta byte used in the last word


def test_pack_meta_rejects_wrong_meta():
    with pytest.raises(ShapeError, match="uint8"):
        triton_ops.pack_meta_int32(torch.zeros(4, 5, dtype=torch.uint8), 44)


@pytest.fixture(scope="module")
def layer():
    sw, values, meta = random_layer(40, 44, torch.float32, seed=21)
    return sw, values, meta, torch.randn(40)


@pytest.mark.parametrize("mutate,error,match", [
    (lambda a: {**a, "x": a["x"][:, :40]}, ShapeError, r"expected \[\.\.\., 44\]"),
    (lambda a: {**a, "x": a["x"].double()}, TypeError, "unsupported dtype"),
    (lambda a: {**a, "values": a["values"].half()}, TypeError, "values dtype"),
    (lambda a: {**a, "values": a["values"][:, :21]}, ShapeError, "not a multiple of 4"),
    (lambda a: {**a, "meta": a["meta"].view(torch.uint8)}, ShapeError, "prepare_sparse24"),
    (lambda a: {**a, "bias": a["bias"][:5]}, ShapeError, "bias"),
    (lambda a: {**a, "out": torch.empty(3, 41)}, ShapeError, "out must be"),
])
def test_clear_errors(layer, mutate, error, match):
    sw, values, meta, bias = layer
    args = mutate({"x": torch.randn(3, 44), "values": values, "meta": meta, "bias": bias})
    with pytest.raises(error, match=match):
        triton_ops.sparse24_matmul(**args)


def test_rotation_errors(layer):
    sw, values, meta, bias = layer
    with pytest.raises(ShapeError, match="block-diagonal"):
        triton_ops.rotate_sparse24_matmul(torch.randn(2, 44), torch.eye(40), values, meta)
    with pytest.raises(TypeError, match="rotation dtype"):
        triton_ops.rotate_sparse24_matmul(torch.randn(2, 44), torch.eye(44, dtype=torch.float16), values, meta)


def test_cpu_without_interpreter_is_refused(layer, monkeypatch):
    sw, values, meta, bias = layer
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA device"):
        triton_ops.sparse24_matmul(torch.randn(2, 44), values, meta)


# Llama-3-8B's linears (q/o, k/v, gate/up, down, lm_head) at decode and prefill sizes; (SMs, L2, arch) of an
# H100/H200 and an A100.
LLAMA3_8B = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (128256, 4096)]
GPUS = [(132, 50 << 20, 90), (108, 40 << 20, 80)]


@pytest.fixture
def gpu_configs(monkeypatch):
    """The GPU config lists on the kernels, with a fake device of the given (SMs, L2 bytes, arch)."""
    ker = triton_ops._kernels()
    monkeypatch.setattr(ker.sparse24_decode, "configs", ker.GPU_DECODE_CONFIGS)
    monkeypatch.setattr(ker.sparse24_tiles, "configs", ker.GPU_TILE_CONFIGS)

    def use(sms, l2, arch):
        monkeypatch.setattr(ker, "gpu_fill", lambda device: (sms, l2))
        monkeypatch.setattr(ker, "smem_limit", lambda device: ker.SMEM_LIMIT[arch])
    return ker, use


def _launches(ker, m, n, k, rot_b=None, esize=2):
    """(config, grid) of every config the autotuner may try for this call: the launch's plan, pruned by the
    autotuner's own hook."""
    p = triton_ops._plan(m, n, k, torch.float16 if esize == 2 else torch.float32, torch.device("cpu"), rot_b,
                         False, None)
    x = torch.empty(0, dtype=torch.float16 if esize == 2 else torch.float32)
    args = {"x_ptr": x, "M_BUCKET": p.m_bucket, "N": n, "K": k}
    kept = ker._prune(p.kernel.configs, args, **p.kw)
    grid = triton_ops._grid(p, m, n)
    return p, [(c, grid(c.kwargs)) for c in kept]


@pytest.mark.parametrize("gpu", GPUS, ids=lambda g: f"{g[0]}sms")
def test_every_llama_shape_fills_the_gpu(gpu_configs, gpu):
    """Every config a Llama-3-8B linear can launch with gives >= 4 CTAs per SM, each split has K tiles of its
    own, and the split-K partials either stay in half the L2 or cost under 10% of the weight's bytes."""
    ker, use = gpu_configs
    sms, l2, arch = gpu
    use(sms, l2, arch)
    for n, k in LLAMA3_8B:
        for m in (1, 16, 64, 2048):
            p, launches = _launches(ker, m, n, k)
            assert launches, (n, k, m)
            for c, (tiles, splits) in launches:
                bm, bn, bk = ker.blocks(c)
                assert tiles == -(-m // bm) * -(-n // bn)
                assert tiles * splits >= 4 * sms, (n, k, m, str(c), tiles, splits)
                assert splits <= -(-k // bk), (n, k, m, str(c))  # no empty split
                partials = 4 * splits * m * n if splits > 1 else 0
                assert partials <= l2 // 2 or 2 * partials <= 0.1 * n * k * 1.125, (n, k, m, str(c))
                assert splits <= p.max_splits  # the workspace holds every split's partials
                if splits > 1:
                    assert tiles <= p.lock_tiles <= triton_ops.decode_locks(n, torch.device("cpu")).numel()


def test_split_k_follows_the_m_bucket(gpu_configs):
    # Every M of a bucket gets the bucket's grid and configs, so a graph capture at an M never run eagerly
    # reuses the autotuned entry (the key holds M_BUCKET, not M) instead of autotuning inside the capture.
    from sparse_runtime.ops.cusparselt import m_bucket

    ker, use = gpu_configs
    use(*GPUS[0])
    for n in (1024, 4096, 14336):
        for m in [*range(1, 17), 33, 64, 100]:
            p, launches = _launches(ker, m, n, 4096)
            q, bucket = _launches(ker, m_bucket(m), n, 4096)
            assert p.splits == q.splits and [c for c, _ in launches] == [c for c, _ in bucket], (n, m)
            assert "k_per_split" not in ker.AUTOTUNE_KEY and "M_BUCKET" in ker.AUTOTUNE_KEY


def test_split_k_off_a_gpu_only_when_asked():
    p = triton_ops._plan(1, 4096, 4096, torch.float32, torch.device("cpu"), None, False, None)
    assert set(p.splits.values()) == {1} and p.max_splits == 1
    p = triton_ops._plan(1, 4096, 4096, torch.float32, torch.device("cpu"), None, False, 6)
    assert set(p.splits.values()) == {6}


def test_custom_ops_are_registered_and_pass_opcheck(layer):
    sw, values, meta, bias = layer
    x = torch.randn(2, 44)
    rot = random_rotation(44, 4, torch.float32, seed=5)
    torch.library.opcheck(torch.ops.sparse_runtime.sparse24_matmul.default, (x, values, meta, bias))
    torch.library.opcheck(torch.ops.sparse_runtime.rotate_sparse24_matmul.default, (x, rot, values, meta, None))


def test_fake_tensors_give_shapes_without_running(layer):
    from torch._subclasses.fake_tensor import FakeTensorMode

    sw, values, meta, bias = layer
    with FakeTensorMode() as mode:
        fx, fv, fm = (mode.from_tensor(t) for t in (torch.randn(2, 5, 44), values, meta))
        assert torch.ops.sparse_runtime.sparse24_matmul(fx, fv, fm, None).shape == (2, 5, 40)
        with pytest.raises(ShapeError):
            torch.ops.sparse_runtime.sparse24_matmul(fx[..., :40], fv, fm, None)


def test_torch_compile_traces_the_op(layer):
    sw, values, meta, bias = layer
    x = torch.randn(3, 44)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(x):
        return triton_ops.sparse24_matmul(x * 2, values, meta, bias) + 1

    assert_close(f(x) - 1, *reference(x * 2, sw, bias), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64])
def test_cuda_graph_capture_gpu(m):
    sw, values, meta = random_layer(4096, 4096, torch.float16, seed=31, device="cuda")
    rot = random_rotation(4096, 128, torch.float16, seed=32, device="cuda")
    x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
    for _ in range(2):  # warm-up autotunes outside the capture
        triton_ops.sparse24_matmul(x, values, meta)
        triton_ops.rotate_sparse24_matmul(x, rot, values, meta)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = triton_ops.sparse24_matmul(x, values, meta)
        yr = triton_ops.rotate_sparse24_matmul(x, rot, values, meta)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(y, *reference(x, sw), torch.float16)
    assert_close(yr, *reference(x, sw, rotation=rot), torch.float16)


@pytest.mark.gpu
def test_torch_compile_inductor_gpu():
    sw, values, meta = random_layer(1024, 4096, torch.bfloat16, seed=41, device="cuda")
    bias = torch.randn(1024, device="cuda", dtype=torch.bfloat16)

    @torch.compile(fullgraph=True, mode="reduce-overhead")
    def f(x):
        return triton_ops.sparse24_matmul(x, values, meta, bias)

    for m in (1, 8, 33):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        assert_close(f(x), *reference(x, sw, bias), torch.bfloat16)


@pytest.mark.gpu
def test_opcheck_gpu():
    sw, values, meta = random_layer(256, 512, torch.float16, seed=51, device="cuda")
    x = torch.randn(4, 512, device="cuda", dtype=torch.float16)
    torch.library.opcheck(torch.ops.sparse_runtime.sparse24_matmul.default, (x, values, meta, None))


def test_shared_counters_are_never_allocated_in_a_capture(monkeypatch):
    monkeypatch.setattr(triton_ops, "_LOCKS", {})
    monkeypatch.setattr(triton_ops, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="inside a CUDA-graph capture"):
        triton_ops._tile_locks(torch.device("cpu"), 8)
    monkeypatch.setattr(triton_ops, "_capturing", lambda device: False)
    made = triton_ops._tile_locks(torch.device("cpu"), 8)  # eager: allocated once ...
    monkeypatch.setattr(triton_ops, "_capturing", lambda device: True)
    assert triton_ops._tile_locks(torch.device("cpu"), 8) is made  # ... and reused inside a capture


def test_layer_counters():
    sw, values, meta = random_layer(40, 256, torch.float32, seed=25)
    x, bias = torch.randn(3, 256), torch.randn(40)
    locks = triton_ops.decode_locks(40, x.device)
    assert locks.dtype == torch.int32 and locks.numel() == 3  # ceil(40 / 16) decode tiles
    for _ in range(2):  # the kernel leaves them zeroed for the next call
        y = triton_ops.sparse24_matmul(x, values, meta, bias, split_k=4, locks=locks)
        assert_close(y, *reference(x, sw, bias), torch.float32)
        assert not locks.any()
    with pytest.raises(ShapeError, match="locks must be int32"):
        triton_ops.sparse24_matmul(x, values, meta, bias, split_k=4, locks=locks[:1])


def test_rotation_falls_back_to_rotate_first_when_no_config_fits(monkeypatch):
    # A device whose shared memory holds no config with R's tile: rotate x first, then the plain kernel.
    ker = triton_ops._kernels()
    fitting = ker.fitting
    monkeypatch.setattr(ker, "fitting", lambda configs, rot, *a: [] if rot else fitting(configs, rot, *a))
    calls = []
    monkeypatch.setattr(triton_ops, "apply_rotation", lambda x, r: calls.append(r) or (x @ r))
    sw, values, meta = random_layer(40, 44, torch.float32, seed=23)
    x, rot = torch.randn(2, 44), random_rotation(44, None, torch.float32, seed=24)
    assert_close(triton_ops.rotate_sparse24_matmul(x, rot, values, meta), *reference(x, sw, rotation=rot),
                 torch.float32)
    assert len(calls) == 1


# -- direct launch: the plan's bookkeeping, with a fake autotuner and fake compiled kernels --------------------
class FakeCompiled:
    """A compiled kernel of one (config, specialisation); its ``run`` (the driver's launcher) logs the launch."""

    function, packed_metadata = "function", "packed"

    def __init__(self, log, config):
        self.log, self.config = log, config

    def run(self, *a):
        self.log.append(("direct", self.config, a[:2], a[9:]))  # grid, then every kernel parameter

    def launch_metadata(self, grid, stream, *args):
        return None


class FakeAutotuner:
    """What a plan uses of triton.autotune: ``kernel[grid](...)`` benchmarks (counted) and takes the last config,
    ``kernel.fn.run(..., **config)`` runs one config as JITFunction.run does; each returns a compiled kernel."""

    def __init__(self, configs, log):
        self.configs, self.fn, self.log, self.tunings = configs, self, log, 0

    def __getitem__(self, grid):
        def tune(*args, **kw):
            self.tunings += 1
            self.best_config = self.configs[-1]  # not the first: the plan must use the autotuner's choice
            return self.run(*args, grid=grid, warmup=False, **kw, **self.best_config.all_kwargs())
        return tune

    def run(self, *args, grid, warmup, **kw):
        config = next(c for c in self.configs if c.kwargs.items() <= kw.items())
        self.log.append(("jit", config, grid(kw), args))
        return FakeCompiled(self.log, config)


@pytest.fixture
def fake_kernels(monkeypatch):
    """Two decode and two tile configs that both survive the prune on a fake 132-SM GPU, behind fake autotuners."""
    ker = triton_ops._kernels()
    log = []
    decode = FakeAutotuner(ker._configs([(16, 64, 64), (16, 128, 64)], [4], [2], True), log)
    tiles = FakeAutotuner(ker._configs([(32, 32, 64), (64, 64, 64)], [4], [2], False), log)
    monkeypatch.setattr(ker, "sparse24_decode", decode)
    monkeypatch.setattr(ker, "sparse24_tiles", tiles)
    monkeypatch.setattr(ker, "gpu_fill", lambda device: (132, 50 << 20))
    monkeypatch.setattr(triton_ops, "_capturing", lambda device: False)
    sw, values, meta = random_layer(4096, 2048, torch.float16, seed=61)
    return triton_ops.Sparse24Layer(sw.values, sw.meta), decode, tiles, log


def test_direct_launch_per_m_bucket(fake_kernels):
    layer, decode, tiles, log = fake_kernels
    ker = triton_ops._kernels()

    def call(m):
        del log[:]
        x = torch.randn(m, 2048, dtype=torch.float16)
        layer(x)
        return x, log[:]

    x, ((kind, config, grid, args), *rest) = call(3)  # a new bucket: the autotuner, then its choice's launch
    assert kind == "jit" and config is decode.configs[-1] and decode.tunings == 1 and not rest
    p = layer._plans[4, True, None]  # (M bucket, no bias, no rotation)
    split = p.splits[16, 128, 64]
    assert split > 1 and grid == (4096 // 128, split) and args[8:12] == (3, 4096, 2048, 4)  # M, N, K, M_BUCKET
    for m in (4, 3):  # same bucket and specialisation: the compiled kernel, directly
        x, [(kind, config, grid, params)] = call(m)
        assert kind == "direct" and config is decode.configs[-1] and grid == (4096 // 128, split)
        assert params[0] is x and params[8:12] == (m, 4096, 2048, 4) and params[7] is layer.locks
        assert params[6].dtype == torch.float32 and params[6].shape == (p.max_splits, m, 4096)  # fresh partials
        # HAS_BIAS, ROT, ROT_B, DOT_PREC, SWAP_AB, BLOCK_M/N/K, and the defaults BLOCK_J, GROUP_M
        assert params[16:] == (False, 0, 1, "tf32", True, 16, 128, 64, 32, 8)
    assert decode.tunings == 1
    # M = 16 in the bucket 9..16: tuned once at 9; 16 is another specialisation (a multiple of 16): compiled with
    # the bucket's choice, without the autotuner, then launched directly
    assert [e[0] for e in call(9)[1]] == ["jit"] and decode.tunings == 2
    assert [(e[0], e[1]) for e in call(16)[1]] == [("jit", decode.configs[-1])] and decode.tunings == 2
    assert [e[0] for e in call(16)[1] + call(12)[1]] == ["direct", "direct"]
    # M > 16: the tile schedule, its own autotuner, a grid over M tiles
    x, [(kind, config, grid, _)] = call(40)
    assert kind == "jit" and tiles.tunings == 1 and ker.blocks(config) == (64, 64, 64)
    x, [(kind, _, grid, params)] = call(50)
    assert kind == "direct" and grid[0] == 1 * 4096 // 64 and params[8] == 50 and tiles.tunings == 1


def test_a_capture_never_autotunes(fake_kernels, monkeypatch):
    layer, decode, tiles, log = fake_kernels
    x = torch.randn(5, 2048, dtype=torch.float16)
    monkeypatch.setattr(triton_ops, "_capturing", lambda device: True)
    for _ in range(2):  # an untuned bucket inside a capture: the first config, nothing kept for later
        layer(x)
        assert decode.tunings == 0 and [(e[0], e[1]) for e in log] == [("jit", decode.configs[0])]
        del log[:]
    monkeypatch.setattr(triton_ops, "_capturing", lambda device: False)
    layer(x)  # the next eager call tunes the bucket
    assert decode.tunings == 1 and [(e[0], e[1]) for e in log] == [("jit", decode.configs[-1])]
    del log[:]
    monkeypatch.setattr(triton_ops, "_capturing", lambda device: True)
    layer(torch.randn(7, 2048, dtype=torch.float16))  # captured at another M of the bucket: the tuned kernel
    assert decode.tunings == 1 and [(e[0], e[1]) for e in log] == [("direct", decode.configs[-1])]


def test_a_misaligned_input_gets_its_own_specialisation(fake_kernels):
    layer, decode, tiles, log = fake_kernels
    x = torch.randn(4 * 2048 + 4, dtype=torch.float16)
    layer(x[:-4].view(4, 2048))
    del log[:]
    layer(x[4:].view(4, 2048))  # 8 bytes off 16-byte alignment: Triton would compile another kernel
    assert [e[0] for e in log] == ["jit"] and decode.tunings == 1
