"""sparse_runtime.ops.triton_ops: layout, checks and errors, the torch.library custom ops, and the one launch path
that the functional API, the custom ops and the prepared layer share."""
import pytest
import torch

from sparse_runtime.ops import triton_launch, triton_ops, triton_plan
from sparse_runtime.errors import ShapeError
from sparse_runtime.format.codec import unpack_meta_24
from sparse24_cases import assert_close, random_layer, random_quantized_layer, random_rotation, reference


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


# -- quantized values: codes and scales, dequantized in registers ------------------------------------------------
# (scheme, group, K): odd N; K a multiple of the group, and not of the interpreter's K tile (64) where the group allows
QUANT_CASES = [("int8", None, 96), ("int4", 32, 96), ("int4", 64, 192), ("int4", 128, 384), ("fp8", None, 160)]


@pytest.mark.parametrize("scheme,group,k", QUANT_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 33])  # 33: the tile (prefill) schedule
@pytest.mark.parametrize("bias", [False, True])
def test_quantized_matches_the_dequantized_weight(scheme, group, k, dtype, m, bias):
    n = 37
    seed = 1000 * k + 10 * m + bias
    sw, codes, meta = random_quantized_layer(n, k, scheme, group, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    y = triton_ops.sparse24_matmul(x, codes, meta, b, out=torch.full((m, n), float("nan"), dtype=dtype),
                                   scales=sw.scales)
    assert_close(y, *reference(x, sw, b), dtype)  # reference: float64 from sw.to_dense(), the dequantized weight


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantized_paths_agree(dtype):
    """The prepared layer, the functional API and the custom op run one launch path: the same bits."""
    sw, codes, meta = random_quantized_layer(21, 96, "int4", 32, dtype, seed=7)
    x, bias = torch.randn(3, 96).to(dtype), torch.randn(21).to(dtype)
    rot = random_rotation(96, 32, dtype, seed=8)
    y = triton_ops.sparse24_matmul(x, codes, meta, bias, scales=sw.scales)
    assert torch.equal(torch.ops.sparse_runtime.sparse24_matmul(x, codes, meta, bias, None, sw.scales), y)
    assert torch.equal(triton_ops.Sparse24Layer(sw.values, sw.meta, sw.scales)(x, bias), y)
    yr = triton_ops.rotate_sparse24_matmul(x, rot, codes, meta, bias, scales=sw.scales)
    assert_close(yr, *reference(x, sw, bias, rotation=rot), dtype)
    assert torch.equal(triton_ops.Sparse24Layer(sw.values, sw.meta, sw.scales)(x, bias, rot), yr)


@pytest.fixture(scope="module")
def quantized():
    sw, codes, meta = random_quantized_layer(40, 96, "int4", 32, torch.float16, seed=22)
    return codes, meta, sw.scales


@pytest.mark.parametrize("mutate,error,match", [
    (lambda a: {**a, "scales": a["scales"][:39]}, ShapeError, r"scales must be \[N, groups\] = \[40"),
    (lambda a: {**a, "scales": a["scales"][:, :2]}, ShapeError, r"groups of 48 columns"),  # K=96 over 2 groups
    (lambda a: {**a, "scales": a["scales"].flatten()}, ShapeError, "scales must be"),
    (lambda a: {**a, "scales": a["scales"].float()}, TypeError, "scales dtype torch.float32 != x dtype"),
    (lambda a: {**a, "scales": None}, TypeError, "codes need their scales"),
    (lambda a: {**a, "values": a["values"].view(torch.int8)}, ShapeError, "expected \\[\\.\\.\\., 48\\]"),
    (lambda a: {**a, "values": torch.zeros(40, 48, dtype=torch.float16)}, TypeError, "scales given for torch.float16"),
])
def test_quantized_clear_errors(quantized, mutate, error, match):
    codes, meta, scales = quantized
    args = mutate({"x": torch.randn(3, 96, dtype=torch.float16), "values": codes, "meta": meta, "scales": scales})
    with pytest.raises(error, match=match):
        triton_ops.sparse24_matmul(**args)


def test_group_refusal():
    assert triton_ops.group_refusal(96, 1) is None and triton_ops.group_refusal(96, 3) is None  # a row; 32 columns
    assert "power of two" in triton_ops.group_refusal(96, 4)  # 24 columns
    assert "power of two" in triton_ops.group_refusal(96, 24)  # 4 columns: under 8


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
    monkeypatch.setattr(triton_plan, "_PLANS", {})
    fitting = triton_plan.within_shared_memory
    monkeypatch.setattr(triton_plan, "within_shared_memory",
                        lambda configs, rot, *a: [] if rot else fitting(configs, rot, *a))
    calls = []
    monkeypatch.setattr(triton_launch, "apply_rotation", lambda x, r: calls.append(r) or (x @ r))
    sw, values, meta = random_layer(40, 44, torch.float32, seed=23)
    x, rot = torch.randn(2, 44), random_rotation(44, None, torch.float32, seed=24)
    assert_close(triton_ops.rotate_sparse24_matmul(x, rot, values, meta), *reference(x, sw, rotation=rot),
                 torch.float32)
    assert len(calls) == 1




# -- one launch path: every caller, one plan, direct launches ------------------------------------------------------
N, K = 33, 72  # odd: a ragged N tile, K not a multiple of 32


def poisoned(m, n=N, dtype=torch.float32):
    return torch.full((m, n), float("nan"), dtype=dtype)


@pytest.mark.parametrize("block", [None, 4])
@pytest.mark.parametrize("m", [1, 5, 17])  # decode, ragged decode, tiles
def test_every_path_gives_the_same_result(m, block):
    sw, values, meta = random_layer(N, K, torch.float32, seed=70 + m)
    x, bias = torch.randn(m, K), torch.randn(N)
    rot = None if block is None else random_rotation(K, block, torch.float32, seed=71)
    if rot is None:
        functional = triton_ops.sparse24_matmul(x, values, meta, bias, out=poisoned(m))
        op = torch.ops.sparse_runtime.sparse24_matmul(x, values, meta, bias)
    else:
        functional = triton_ops.rotate_sparse24_matmul(x, rot, values, meta, bias, out=poisoned(m))
        op = torch.ops.sparse_runtime.rotate_sparse24_matmul(x, rot, values, meta, bias)
    prepared = triton_ops.Sparse24Layer(sw.values, sw.meta)(x, bias, rot)
    assert_close(functional, *reference(x, sw, bias, rotation=rot), torch.float32)
    assert torch.equal(op, functional) and torch.equal(prepared, functional)


def test_one_plan_serves_every_path(monkeypatch):
    monkeypatch.setattr(triton_plan, "_PLANS", {})
    made, plan = [], triton_plan.LaunchPlan
    monkeypatch.setattr(triton_plan, "LaunchPlan", lambda *a: made.append(a[:3]) or plan(*a))
    sw, values, meta = random_layer(N, K, torch.float32, seed=72)
    bias = torch.randn(N)
    layers = [triton_ops.Sparse24Layer(sw.values, sw.meta) for _ in range(2)]
    for m in (5, 7, 8):  # one M bucket
        x = torch.randn(m, K)
        ys = [triton_ops.sparse24_matmul(x, values, meta, bias), torch.ops.sparse_runtime.sparse24_matmul(
            x, values, meta, bias), *(layer(x, bias) for layer in layers)]
        assert all(torch.equal(y, ys[0]) for y in ys)
    assert made == [(5, N, K)]
    layers[0](torch.randn(9, K), bias)  # the next bucket: its own plan
    assert made == [(5, N, K), (9, N, K)]


class InterpretedCompiled:
    """A kernel compiled for one config, over the interpreter. Its ``run`` is Triton's launcher: ``run(grid_0,
    grid_1, grid_2, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook, *every_parameter)``
    takes every kernel parameter but runs with the constexprs it was compiled with, as a compiled kernel does."""

    function, packed_metadata = "function", "packed"

    def __init__(self, log, constexprs):
        self.log, self.constexprs = log, constexprs

    def run(self, grid_0, grid_1, grid_2, stream, function, packed, metadata, enter, leave, *params):
        kernel = triton_plan.kernels().sparse24_matmul_kernel
        assert len(params) == len(kernel.arg_names)
        self.log.append(("direct", blocks(self.constexprs)))
        runtime = kernel.arg_names.index("HAS_BIAS")
        kernel[grid_0, grid_1, grid_2](*params[:runtime], **self.constexprs)

    def launch_metadata(self, grid, stream, *args):
        return None


def blocks(kw):
    return tuple(kw[x] for x in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))


class Interpreted:
    """The kernel as a plan's tuner holds it (``tuner.fn``): runs a config on the interpreter, logging a compile."""

    def __init__(self, log):
        self.log = log

    def run(self, *args, grid, warmup, **kw):
        self.log.append(("compile", blocks(kw)))
        triton_plan.kernels().sparse24_matmul_kernel.run(*args, grid=grid, warmup=warmup, **kw)
        return InterpretedCompiled(self.log, kw)


class Tuner:
    """Triton's autotuner as a plan uses it: ``tuner[grid](...)`` tunes (counted; takes the last config, not the
    first) and runs the choice; ``tuner.best_config``; ``tuner.fn``."""

    def __init__(self, configs, log, tunings):
        self.configs, self.fn, self.tunings = configs, Interpreted(log), tunings

    def __getitem__(self, grid):
        def tune(*args, **kw):
            self.tunings.append(triton_plan.blocks(self.configs[-1]))
            self.best_config = self.configs[-1]
            return self.fn.run(*args, grid=grid, warmup=False, **kw, **self.best_config.all_kwargs())
        return tune


@pytest.fixture
def compiled(monkeypatch):
    """Plans whose kernels 'compile' into InterpretedCompiled, so launches after the first go direct; two configs
    per schedule. Returns (log of compiles and direct launches, tunings)."""
    from sparse_runtime.kernels import sparse24 as ker

    log, tunings = [], []
    # the tuner takes the last: the first's wider N tiles would leave output columns unwritten
    lists = {True: ker._configs([(16, 64, 64), (16, 32, 64)], [4], [1], True),
             False: ker._configs([(64, 32, 64), (32, 32, 64)], [4], [1], False)}
    monkeypatch.setattr(triton_plan, "_PLANS", {})
    monkeypatch.setattr(triton_plan, "configs", lambda decode, interpreting: lists[decode])
    monkeypatch.setattr(triton_plan, "autotuner", lambda configs: Tuner(configs, log, tunings))
    return log, tunings


@pytest.mark.parametrize("split_k", [None, 2])
def test_direct_launches_compute_what_the_kernel_does(compiled, split_k):
    log, tunings = compiled
    sw, values, meta = random_layer(N, K, torch.float32, seed=73)
    bias, rot = torch.randn(N), random_rotation(K, 4, torch.float32, seed=74)
    for i, m in enumerate((3, 4, 3)):
        del log[:]
        x = torch.randn(m, K)
        y = triton_ops.rotate_sparse24_matmul(x, rot, values, meta, bias, out=poisoned(m), split_k=split_k)
        assert_close(y, *reference(x, sw, bias, rotation=rot), torch.float32)
        assert log == [("compile" if i == 0 else "direct", (16, 32, 64))]  # the autotuner's choice
    assert tunings == [(16, 32, 64)]


def test_each_bucket_is_tuned_once_and_each_specialisation_compiled_once(compiled):
    log, tunings = compiled
    sw, values, meta = random_layer(N, K, torch.float32, seed=75)
    layer = triton_ops.Sparse24Layer(sw.values, sw.meta)

    def call(x):
        del log[:]
        assert_close(layer(x), *reference(x, sw), torch.float32)
        choice = (16, 32, 64) if x.shape[0] <= 16 else (32, 32, 64)  # the schedule's tuned choice
        assert all(config == choice for _, config in log)  # compiled or launched
        return [kind for kind, _ in log]

    assert call(torch.randn(3, K)) == ["compile"] and len(tunings) == 1
    assert call(torch.randn(4, K)) == ["direct"]  # same bucket and specialisation
    assert call(torch.randn(9, K)) == ["compile"] and len(tunings) == 2  # bucket 9..16
    # 16 in the same bucket is another specialisation (a multiple of 16): compiled, not tuned again
    assert call(torch.randn(16, K)) == ["compile"] and len(tunings) == 2
    assert call(torch.randn(16, K)) + call(torch.randn(12, K)) == ["direct", "direct"]
    assert call(torch.randn(40, K)) == ["compile"] and tunings[-1] == (32, 32, 64)  # the tile schedule
    x = torch.randn(4 * K + 2)
    assert call(x[:-2].view(4, K)) == ["direct"]
    assert call(x[2:].view(4, K)) == ["compile"] and len(tunings) == 3  # 8 bytes off 16-byte alignment


def test_a_launch_that_would_compile_inside_a_capture_raises(compiled, monkeypatch):
    log, tunings = compiled
    sw, values, meta = random_layer(N, K, torch.float32, seed=76)
    layer, bias = triton_ops.Sparse24Layer(sw.values, sw.meta), torch.randn(N)
    layer(torch.randn(2, K), bias)  # another bucket's plan: made and compiled before the capture
    monkeypatch.setattr(triton_plan, "capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="M=5 .*capturing a CUDA graph.*warm_up"):
        layer(torch.randn(5, K), bias)  # untuned bucket
    monkeypatch.setattr(triton_plan, "capturing", lambda device: False)
    layer.warm_up([5, 16], bias)  # buckets 5..8 and 9..16
    monkeypatch.setattr(triton_plan, "capturing", lambda device: True)
    for m in range(5, 17):
        del log[:]
        x = torch.randn(m, K)
        assert_close(layer(x, bias), *reference(x, sw, bias), torch.float32)
        assert [kind for kind, _ in log] == ["direct"]
    x = torch.randn(6 * K + 2)
    with pytest.raises(RuntimeError, match="no compiled kernel for this specialisation"):
        layer(x[2:].view(6, K), bias)  # misaligned: another kernel
    with pytest.raises(RuntimeError, match="capturing"):
        layer(torch.randn(3, K))  # no bias: another plan


def test_captured_split_k_launches_allocate_nothing(monkeypatch):
    monkeypatch.setattr(triton_plan, "_PLANS", {})
    sw, values, meta = random_layer(N, K, torch.float32, seed=77)
    x = torch.randn(3, K)
    triton_ops.sparse24_matmul(x, values, meta, split_k=2)  # eager: the plan, its counters, its kernel
    monkeypatch.setattr(triton_plan, "capturing", lambda device: True)

    def refuse(*a, **kw):
        raise AssertionError("allocated split-K counters inside a capture")
    monkeypatch.setattr(torch, "zeros", refuse)
    monkeypatch.setattr(torch, "zeros_like", refuse)
    y = triton_ops.sparse24_matmul(x, values, meta, split_k=2, out=poisoned(3))
    monkeypatch.undo()
    assert_close(y, *reference(x, sw), torch.float32)


@pytest.mark.gpu
def test_cuda_graph_of_a_warmed_up_layer_gpu():
    sw, values, meta = random_layer(4096, 4096, torch.float16, seed=78, device="cuda")
    rot = random_rotation(4096, 128, torch.float16, seed=79, device="cuda")
    layer = triton_ops.Sparse24Layer(sw.values, sw.meta)
    layer.warm_up([1, 16, 64], rotation=rot)
    torch.cuda.synchronize()
    xs = [torch.randn(m, 4096, device="cuda", dtype=torch.float16) for m in (1, 7, 16, 33, 64)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ys = [layer(x, rotation=rot) for x in xs]
    for x in xs:
        x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    for x, y in zip(xs, ys):
        assert_close(y, *reference(x, sw, rotation=rot), torch.float16)
