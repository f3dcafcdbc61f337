"""The Triton 2:4 kernels (kernels/sparse24.py) against float64 references, every output element checked.

On the CPU they run under the Triton interpreter (conftest sets TRITON_INTERPRET=1)
in fp32 and fp16; the @gpu tests run fp16/bf16 at Llama-3-8B shapes."""
import pytest
import torch

from sparse_runtime.ops import triton_ops
from sparse_runtime.ops.triton_plan import SMEM_LIMIT, launch_plan, smem_estimate
from sparse24_cases import assert_close, random_layer, random_rotation, reference

SHAPES = [(40, 44), (72, 136)]  # N, K: not powers of two; K % 32 != 0
SEED = iter(range(1000, 10**6))  # a fresh seed per case


def run(x, sw, values, meta, bias=None, rotation=None, split_k=None):
    """Launch into a NaN-poisoned output, so unwritten elements fail the check."""
    out = torch.full((*x.shape[:-1], sw.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    if rotation is None:
        return triton_ops.sparse24_matmul(x, values, meta, bias, out=out, split_k=split_k)
    return triton_ops.rotate_sparse24_matmul(x, rotation, values, meta, bias, out=out, split_k=split_k)


def case(m, n, k, dtype, bias, device="cpu"):
    seed = next(SEED)
    sw, values, meta = random_layer(n, k, dtype, seed, device)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, generator=gen).to(device=device, dtype=dtype) if bias else None
    return x, sw, values, meta, b


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 17])  # decode schedule, ragged decode, tiled schedule
def test_matmul(m, n, k, dtype, bias):
    x, sw, values, meta, b = case(m, n, k, dtype, bias)
    assert_close(run(x, sw, values, meta, b), *reference(x, sw, b), dtype)


@pytest.mark.parametrize("split_k", [2, 3])
def test_split_k_reduction(split_k):
    # K = 200 spans 4 interpreter K tiles: split 2 -> 2 + 2 tiles, split 3 -> 1 + 1 + 2 (the last ragged)
    x, sw, values, meta, b = case(5, 40, 200, torch.float16, True)
    y = run(x, sw, values, meta, b, split_k=split_k)
    assert_close(y, *reference(x, sw, b), torch.float16)


def test_split_k_on_the_tiled_schedule():
    # M > 16 splits too where the output tiles alone would not fill the GPU: 3 slices of 4 K tiles
    x, sw, values, meta, b = case(40, 40, 200, torch.float32, True)
    assert_close(run(x, sw, values, meta, b, split_k=3), *reference(x, sw, b), torch.float32)


def test_split_k_counters_reset_for_the_next_call():
    # The last split of a tile resets its counter: repeated calls (and CUDA graph replays) stay correct.
    x, sw, values, meta, b = case(4, 72, 256, torch.float32, True)
    for _ in range(2):
        assert_close(run(x, sw, values, meta, b, split_k=4), *reference(x, sw, b), torch.float32)
    assert not launch_plan(4, 72, 256, torch.float32, x.device, None, True, 4).counters(False).any()


@pytest.mark.parametrize("m", [1, 17])
# full R; blocks inside one K tile (ROT_TILE with the interpreter's BLOCK_K=64); blocks straddling or wider
# (ROT_ROWS)
@pytest.mark.parametrize("k,block", [(44, None), (136, None), (128, 32), (192, 64), (192, 96), (256, 128)])
def test_rotation(m, k, block):
    dtype = torch.float32 if m == 1 else torch.float16
    x, sw, values, meta, b = case(m, 40, k, dtype, True)
    rot = random_rotation(k, block, dtype, next(SEED))
    y = run(x, sw, values, meta, b, rotation=rot)
    assert_close(y, *reference(x, sw, b, rotation=rot), dtype)


def test_rotation_with_split_k():
    x, sw, values, meta, b = case(2, 40, 256, torch.float32, False)
    rot = random_rotation(256, 32, torch.float32, next(SEED))
    assert_close(run(x, sw, values, meta, rotation=rot, split_k=4), *reference(x, sw, rotation=rot), torch.float32)


def test_bf16_on_the_interpreter_runs_in_fp32():
    x, sw, values, meta, b = case(3, 40, 44, torch.bfloat16, True)
    assert_close(run(x, sw, values, meta, b), *reference(x, sw, b), torch.bfloat16)


def test_leading_dims_and_empty_input():
    x, sw, values, meta, b = case(6, 40, 44, torch.float32, True)
    y = run(x.view(2, 3, 44), sw, values, meta, b)
    assert y.shape == (2, 3, 40)
    assert_close(y.view(6, 40), *reference(x, sw, b), torch.float32)
    assert triton_ops.sparse24_matmul(x[:0], values, meta, b).shape == (0, 40)


LLAMA = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", LLAMA)
@pytest.mark.parametrize("m", [1, 7, 16, 64, 512])
def test_llama_shapes_gpu(m, n, k, dtype):
    x, sw, values, meta, b = case(m, n, k, dtype, True, device="cuda")
    assert_close(run(x, sw, values, meta, b), *reference(x, sw, b), dtype)  # poisoned output
    assert_close(torch.ops.sparse_runtime.sparse24_matmul(x, values, meta, b), *reference(x, sw, b), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", SHAPES + [(1000, 1064)])
@pytest.mark.parametrize("m", [1, 3, 17, 33])
def test_odd_shapes_gpu(m, n, k, dtype):
    x, sw, values, meta, b = case(m, n, k, dtype, m % 2 == 1, device="cuda")
    assert_close(run(x, sw, values, meta, b), *reference(x, sw, b), dtype)


@pytest.mark.gpu
def test_split_k_on_concurrent_streams_gpu():
    # Each stream has its own split-K counters: interleaved launches on two streams must not mix partials.
    cases = [case(4, 4096, 4096, torch.float16, True, device="cuda") for _ in range(2)]
    streams = [torch.cuda.Stream() for _ in cases]
    torch.cuda.synchronize()
    outs = [[], []]
    for _ in range(20):
        for i, (s, (x, sw, values, meta, b)) in enumerate(zip(streams, cases)):
            with torch.cuda.stream(s):
                outs[i].append(triton_ops.sparse24_matmul(x, values, meta, b, split_k=8))
    torch.cuda.synchronize()
    for (x, sw, values, meta, b), ys in zip(cases, outs):
        ref = reference(x, sw, b)
        for y in ys:
            assert_close(y, *ref, torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block", [None, 32, 128, 256])
@pytest.mark.parametrize("m", [1, 16, 100])
def test_rotation_gpu(m, block, dtype):
    x, sw, values, meta, b = case(m, 1024, 4096, dtype, True, device="cuda")
    rot = random_rotation(4096, block, dtype, next(SEED), device="cuda")
    y = triton_ops.rotate_sparse24_matmul(x, rot, values, meta, b)
    assert_close(y, *reference(x, sw, b, rotation=rot), dtype)


# Compiles (no GPU needed) every kernel variant for Ampere and Hopper: the interpreter
# checks the numbers, this checks that the GPU lowering (layouts, MMA, pipelining) accepts the code.
AOT = r"""
from benchmarks.kernel_report import compile_variant
from sparse_runtime.kernels import sparse24 as k

for dtype, arch, (bm, bn, bk), swap, rot, rot_b, quant, qgroup in [
        ("fp16", 90, (16, 64, 128), True, k.ROT_NONE, 1, k.Q_NONE, 0),
        ("bf16", 80, (16, 128, 128), True, k.ROT_TILE, 128, k.Q_NONE, 0),
        ("fp16", 90, (64, 128, 64), False, k.ROT_ROWS, 4096, k.Q_NONE, 0),
        ("bf16", 90, (128, 128, 64), False, k.ROT_TILE, 32, k.Q_NONE, 0),
        # quantized: the tile schedule (the report compiles the decode ones) and sm_80's e4m3 bytes
        ("bf16", 80, (64, 128, 64), False, k.ROT_NONE, 1, k.Q_INT4, 32),
        ("fp16", 90, (128, 128, 128), False, k.ROT_TILE, 128, k.Q_INT8, 0),
        ("fp16", 80, (16, 64, 128), True, k.ROT_NONE, 1, k.Q_FP8, 0)]:
    const = dict(HAS_BIAS=True, ROT=rot.value, ROT_B=rot_b, DOT_PREC="tf32", SWAP_AB=swap,
                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_J=32, GROUP_M=8, QUANT=quant.value, QGROUP=qgroup)
    # div16=(): the integer arguments unspecialised, the general case (odd K, ragged N)
    compile_variant(k.sparse24_matmul_kernel, dtype, arch, const, 8 if bm == 128 else 4, 3, div16=())
print("compiled")
"""


def test_kernels_compile_for_ampere_and_hopper():
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # AOT imports benchmarks.kernel_report
    r = subprocess.run([sys.executable, "-c", AOT], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]


def test_kernel_report_covers_every_config_and_each_fits():
    """benchmarks/results/kernel_report*.json (the compiler's shared memory, AOT for sm_80 and sm_90) covers
    the current config lists, and every config the prune keeps fits its architecture's limit; the estimate the
    prune uses bounds what the compiler allocates. Regenerate with python -m benchmarks.kernel_report."""
    import json

    from benchmarks import kernel_report

    for dtype in ("fp16", "bf16"):
        path = kernel_report.RESULTS / ("kernel_report.json" if dtype == "fp16" else f"kernel_report_{dtype}.json")
        rows = json.loads(path.read_text())["rows"]
        for arch in (80, 90):
            expected = {label: (const, cfg) for label, const, _, _, cfg in kernel_report.variants(arch, dtype)}
            got = {r["config"]: r for r in rows if r["arch"] == arch}
            assert set(got) == set(expected), f"{path.name} is stale for sm_{arch}: rerun python -m benchmarks.kernel_report"
            for label, (const, cfg) in expected.items():
                r = got[label]
                assert "error" not in r, (arch, label, r.get("error"))
                est = smem_estimate(cfg, const["ROT"], kernel_report.ESIZE[dtype], const["QUANT"], const["QGROUP"])
                assert r["smem_estimate"] == est, f"{label}: stale estimate in {path.name}"
                assert r["shared"] <= est, f"sm_{arch} {label}: compiler {r['shared']} B > estimate {est} B"
                if est <= SMEM_LIMIT[arch]:
                    assert r["shared"] <= SMEM_LIMIT[arch], (arch, label)
