"""GPU timers: eager (host overhead included) and graph device time (L2 flushed)."""
import pytest
import torch

from sparse_runtime.ops.timing import device_time_us, time_us

pytestmark = pytest.mark.gpu


def test_device_time_scales_with_work_and_excludes_host_overhead():
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    x1, x8 = (torch.randn(m, 4096, device="cuda", dtype=torch.float16) for m in (64, 4096))
    small = device_time_us(lambda: x1 @ a.T)
    big = device_time_us(lambda: x8 @ a.T)
    assert 0 < small < big
    # A chain of tiny launches: eager pays the host for each, the graph does not.
    t = torch.zeros(16, device="cuda")

    def many():
        for _ in range(50):
            t.add_(1)

    assert device_time_us(many, flush_l2=False) < time_us(many)


def test_flushing_l2_makes_a_cache_resident_weight_cost_more():
    w = torch.randn(2048, 2048, device="cuda", dtype=torch.float16)  # 8 MB: fits in L2
    x = torch.randn(1, 2048, device="cuda", dtype=torch.float16)
    warm = device_time_us(lambda: x @ w.T, flush_l2=False)
    cold = device_time_us(lambda: x @ w.T)
    assert cold > warm
