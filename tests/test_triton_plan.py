"""sparse_runtime.ops.triton_plan: the config lists a plan picks, the configs it lets the autotuner try (shared memory
against what the compiler allocates, SMs filled), split-K, and one plan per problem."""
import json

import pytest
import torch

from sparse_runtime.ops import triton_plan
from sparse_runtime.ops.triton_plan import LaunchPlan, blocks, kernels

# Llama-3-8B's linears (q/o, k/v, gate/up, down, lm_head); (SMs, L2, arch) of an H100/H200 and an A100.
LLAMA3_8B = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (128256, 4096)]
GPUS = [(132, 50 << 20, 90), (108, 40 << 20, 80)]


@pytest.fixture
def fake_gpu(monkeypatch):
    """Plans made for a GPU of the given (SMs, L2 bytes, arch), with its config lists, on the CPU."""
    monkeypatch.setattr(triton_plan, "interpreting", lambda: False)
    monkeypatch.delenv(triton_plan.CONFIGS_ENV, raising=False)

    def use(sms, l2, arch):
        monkeypatch.setattr(triton_plan, "sms_and_l2", lambda device: (sms, l2))
        monkeypatch.setattr(triton_plan, "smem_limit", lambda device: triton_plan.SMEM_LIMIT[arch])
    return use


def plan(m, n, k, rot_b=None, dtype=torch.float16, split=None):
    return LaunchPlan(m, n, k, dtype, torch.device("cpu"), rot_b, False, split)


def launches(p, m):
    """(config, grid) of every config the autotuner may try."""
    grid = p.grid_of(m)
    return [(c, grid(c.kwargs)) for c in p.configs]


@pytest.mark.parametrize("gpu", GPUS, ids=lambda g: f"{g[0]}sms")
def test_every_llama_shape_fills_the_gpu(fake_gpu, gpu):
    """Every config a Llama-3-8B linear can launch with gives >= 4 CTAs per SM, each split has K tiles of its
    own, and the split-K partials either stay in half the L2 or cost under 10% of the weight's bytes."""
    sms, l2, arch = gpu
    fake_gpu(sms, l2, arch)
    for n, k in LLAMA3_8B:
        for m in (1, 16, 64, 2048):
            p = plan(m, n, k)
            assert p.configs, (n, k, m)
            for c, (tiles, splits) in launches(p, m):
                bm, bn, bk = blocks(c)
                assert tiles == -(-m // bm) * -(-n // bn)
                assert tiles * splits >= 4 * sms, (n, k, m, str(c), tiles, splits)
                assert splits <= -(-k // bk), (n, k, m, str(c))  # no empty split
                partials = 4 * splits * m * n if splits > 1 else 0
                assert partials <= l2 // 2 or 2 * partials <= 0.1 * n * k * 1.125, (n, k, m, str(c))
                assert splits <= p.max_splits  # the workspace holds every split's partials
                if splits > 1:
                    from sparse_runtime.ops.triton_ops import decode_locks

                    assert tiles <= p.lock_tiles <= decode_locks(n, torch.device("cpu")).numel()


def test_split_k_follows_the_m_bucket(fake_gpu):
    # Every M of a bucket gets the bucket's grid and configs, so one compiled kernel serves the whole bucket.
    fake_gpu(*GPUS[0])
    for n in (1024, 4096, 14336):
        for m in [*range(1, 17), 33, 64, 100]:
            p, q = plan(m, n, 4096), plan(triton_plan.m_bucket(m), n, 4096)
            assert p.splits == q.splits and p.configs == q.configs, (n, m)
    assert "M_BUCKET" in triton_plan.AUTOTUNE_KEY


def test_split_k_off_a_gpu_only_when_asked():
    p = plan(1, 4096, 4096, dtype=torch.float32)
    assert set(p.splits.values()) == {1} and p.max_splits == 1
    p = plan(1, 4096, 4096, dtype=torch.float32, split=6)
    assert set(p.splits.values()) == {6} and p.lock_tiles > 0


def test_rotation_modes():
    import triton

    ker = kernels()
    cfgs = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": bk}) for bk in (64, 128, 256)]
    assert triton_plan.rotation_mode(None, cfgs) == ker.ROT_NONE.value
    assert triton_plan.rotation_mode(32, cfgs) == triton_plan.rotation_mode(128, cfgs) == ker.ROT_TILE.value
    # R's tile too big / blocks straddling the K tiles
    assert triton_plan.rotation_mode(256, cfgs) == triton_plan.rotation_mode(96, cfgs) == ker.ROT_ROWS.value


def test_a_config_too_big_for_the_shared_memory_is_rejected():
    import triton

    small = triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}, num_stages=2)
    # 8 stages of a 256x256 K tile: 2 * 8 * (128 * 256 + 256 * 128) bytes alone exceed any GPU's 228 KB
    big = triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 256}, num_stages=8)
    none = kernels().ROT_NONE.value
    for limit in triton_plan.SMEM_LIMIT.values():
        assert triton_plan.within_shared_memory([small, big], none, 1, 2, limit) == [small]


# -- shared memory: every config a plan can choose fits the device, by the compiler's count ----------------------
def _compiled_shared(dtype):
    """(arch, label) -> the shared memory the compiler allocates (benchmarks/results/kernel_report*.json)."""
    from benchmarks import kernel_report

    name = "kernel_report.json" if dtype == "fp16" else f"kernel_report_{dtype}.json"
    rows = json.loads((kernel_report.RESULTS / name).read_text())["rows"]
    return {(r["arch"], r["config"]): r["shared"] for r in rows}


def _label(c, rot, schedule):
    bm, bn, bk = blocks(c)
    label = f"{schedule} {bm}x{bn}x{bk} w{c.num_warps} s{c.num_stages}"
    return label + f" +rot b{bk}" if rot == kernels().ROT_TILE.value else label  # R's tile is [BK, BK]


@pytest.mark.parametrize("gpu", GPUS, ids=lambda g: f"sm_{g[2]}")
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_chosen_configs_fit_the_shared_memory_the_compiler_allocates(fake_gpu, gpu, dtype):
    fake_gpu(*gpu)
    arch, shared = gpu[2], _compiled_shared(dtype)
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    for m, schedule in ((1, "decode"), (2048, "tiles")):
        for rot_b in (None, 32, 64, 128):  # no rotation, and the fused rotation's tile (ROT_TILE)
            p = plan(m, 4096, 4096, rot_b, torch_dtype)
            assert not p.rotate_first, (arch, dtype, rot_b)  # the fused 16-bit rotation stays available
            for c in p.configs:
                assert shared[arch, _label(c, p.constexprs["ROT"], schedule)] <= triton_plan.SMEM_LIMIT[arch]
                assert rot_b is None or c.kwargs["BLOCK_K"] % rot_b == 0


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("esize", [2, 4])  # fp16/bf16, fp32
def test_some_config_fits_every_rotation(arch, esize):
    # an empty ROT_TILE set means rotate-first (tested in test_triton_ops); the others must never be empty
    ker = kernels()
    for configs in (ker.GPU_DECODE_CONFIGS, ker.GPU_TILE_CONFIGS):
        for rot, rot_b in [(ker.ROT_NONE, 1), (ker.ROT_TILE, 32), (ker.ROT_TILE, 128), (ker.ROT_ROWS, 4096)]:
            kept = triton_plan.within_shared_memory(configs, rot.value, rot_b, esize, triton_plan.SMEM_LIMIT[arch])
            assert kept or (rot.value == ker.ROT_TILE.value and esize == 4), (arch, esize, rot, rot_b)


# -- config lists ----------------------------------------------------------------------------------------------
def test_the_interpreter_gets_its_own_configs(monkeypatch):
    monkeypatch.setenv(triton_plan.CONFIGS_ENV, "pinned")  # ignored: the interpreter has one config per schedule
    ker = kernels()
    assert triton_plan.configs(True, True) == ker.INTERPRETER_DECODE_CONFIGS
    assert triton_plan.configs(False, True) == ker.INTERPRETER_TILE_CONFIGS


def test_pinned_gpu_configs(monkeypatch):
    """gpu_check.sh's correctness stage pins one config per schedule (SPARSE_RUNTIME_TRITON_CONFIGS=pinned),
    read when a plan is made."""
    ker = kernels()
    monkeypatch.setenv(triton_plan.CONFIGS_ENV, "pinned")
    for decode, full in ((True, ker.GPU_DECODE_CONFIGS), (False, ker.GPU_TILE_CONFIGS)):
        pinned = triton_plan.configs(decode, False)
        assert len(pinned) == 1 and pinned[0] in full  # compiled and checked in the AOT report like the others
        for limit in triton_plan.SMEM_LIMIT.values():  # the fused 128-block rotation stays on the fused path
            assert triton_plan.within_shared_memory(pinned, ker.ROT_TILE.value, 128, 2, limit) == pinned
    monkeypatch.delenv(triton_plan.CONFIGS_ENV)
    assert triton_plan.configs(True, False) == ker.GPU_DECODE_CONFIGS


@pytest.mark.parametrize("value", ["pinnned", "shard:4/4", "shard:1", "shard:a/2"])
def test_a_bad_config_selection_is_refused(monkeypatch, value):
    monkeypatch.setenv(triton_plan.CONFIGS_ENV, value)
    with pytest.raises(ValueError, match=triton_plan.CONFIGS_ENV):
        triton_plan.configs(True, False)


def test_one_plan_per_problem(monkeypatch):
    monkeypatch.setattr(triton_plan, "_PLANS", {})
    cpu = torch.device("cpu")
    p = triton_plan.launch_plan(5, 33, 72, torch.float32, cpu, None, True)
    assert triton_plan.launch_plan(8, 33, 72, torch.float32, cpu, None, True) is p  # same bucket
    others = [triton_plan.launch_plan(*args) for args in [(9, 33, 72, torch.float32, cpu, None, True),
                                                          (5, 33, 72, torch.float16, cpu, None, True),
                                                          (5, 33, 72, torch.float32, cpu, 4, True),
                                                          (5, 33, 72, torch.float32, cpu, None, False),
                                                          (5, 33, 72, torch.float32, cpu, None, True, 2)]]
    assert len({id(q) for q in [p, *others]}) == 6


def test_no_plan_is_made_inside_a_capture(monkeypatch):
    monkeypatch.setattr(triton_plan, "_PLANS", {})
    monkeypatch.setattr(triton_plan, "capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="capturing a CUDA graph.*warm_up"):
        triton_plan.launch_plan(5, 33, 72, torch.float32, torch.device("cpu"), None, True)
