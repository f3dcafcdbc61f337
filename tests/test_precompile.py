"""benchmarks/precompile.py: between them, its workers (each with SPARSE_RUNTIME_TRITON_CONFIGS=shard:i/n) compile
every config the benchmark's full autotune will try, for every shape and M it runs."""
import pytest
import torch

from benchmarks import precompile
from sparse_runtime.ops import triton_plan


def _tried(n, k, m, rot_b):
    """The configs the autotuner tries for this launch, on a fake 132-SM sm_90 GPU."""
    plan = triton_plan.LaunchPlan(m, n, k, torch.float16, torch.device("cpu"), rot_b, False, None)
    return {str(c) for c in plan.configs}


@pytest.mark.parametrize("shards", [3, 8])
def test_the_shards_compile_every_config_the_benchmark_tries(monkeypatch, shards):
    monkeypatch.setattr(triton_plan, "interpreting", lambda: False)
    monkeypatch.setattr(triton_plan, "sms_and_l2", lambda device: (132, 50 << 20))
    monkeypatch.setattr(triton_plan, "smem_limit", lambda device: triton_plan.SMEM_LIMIT[90])
    for n, k in precompile.bench.LLAMA3_8B:  # main()'s default shapes and --ms
        for m in (1, 16, 64, 2048):
            for rot_b in (None, 128):
                monkeypatch.delenv(triton_plan.CONFIGS_ENV, raising=False)
                full = _tried(n, k, m, rot_b)
                compiled = set()
                for i in range(shards):
                    monkeypatch.setenv(triton_plan.CONFIGS_ENV, f"shard:{i}/{shards}")
                    compiled |= _tried(n, k, m, rot_b)
                assert full <= compiled, (n, k, m, rot_b, full - compiled)
