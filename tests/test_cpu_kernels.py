"""benchmarks/cpu_kernels.py: its byte model against the bytes the layers really hold, the stack sizing, and one
tiny end-to-end run whose report has a row per provider and M."""
import json

import pytest
import torch

from benchmarks import cpu_kernels as bench
from sparse_runtime import SparseLinear
from sparse_runtime.format.quant import QuantScheme
from sparse_runtime.ops import cpu24

pytestmark = pytest.mark.skipif(not cpu24.available(), reason=str(cpu24.unavailable_reason()))


@pytest.mark.parametrize("n, k", [(64, 128), (33, 72), (576, 1536)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_bytes_are_what_the_layers_hold(n, k, dtype):
    dense = torch.nn.Linear(k, n, bias=False).to(dtype)
    sparse = SparseLinear.from_linear(dense, backend="cpu")
    elem = dtype.itemsize
    assert bench.weight_bytes("dense", n, k, elem) == dense.weight.nbytes
    assert bench.weight_bytes("cpu24", n, k, elem) == sparse.weight_values.nbytes + sparse.weight_meta.nbytes
    assert bench.weight_bytes("cpu24", n, k, 4) * 32 == bench.weight_bytes("dense", n, k, 4) * 17  # the 17/32


@pytest.mark.parametrize("n, k", [(64, 128), (33, 96), (576, 576)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_weight_bytes_are_codes_meta_and_scales(n, k, dtype):
    dense = torch.nn.Linear(k, n, bias=False).to(dtype)
    for scheme in bench.QUANT:
        q = QuantScheme.parse(scheme, bench.int4_group(k) if scheme == "int4" else None)
        layer = SparseLinear.from_linear(dense, backend="cpu", quant=q)
        held = layer.weight_values.nbytes + layer.weight_meta.nbytes + layer.weight_scales.nbytes
        assert bench.weight_bytes(f"cpu24-{scheme}", n, k, dtype.itemsize) == held
    assert bench.weight_bytes("dense-int8", n, k, dtype.itemsize) == n * k + n * dtype.itemsize
    assert bench.int4_group(576) == 64 and bench.int4_group(72) is None


def test_stacks_exceed_the_last_level_cache_within_the_budget():
    llc = 32 << 20
    assert bench.stack_size(10 << 20, llc, 1 << 40) * (10 << 20) >= 4 * llc
    assert bench.stack_size(10 << 20, llc, 50 << 20) == 5  # the budget caps it
    assert bench.stack_size(1 << 30, llc, 1 << 40) == 2  # at least two distinct layers
    assert bench.llc_bytes() >= 1 << 20


def test_a_tiny_run_reports_every_provider_and_m(tmp_path):
    out = tmp_path / "r.json"
    bench.measure([(32, 64)], [1, 20], "fp32", compiled_ms=(), out=out, budget_gib=0.01, log=lambda *a: None)
    r = json.loads(out.read_text())
    assert {(x["m"], x["provider"]) for x in r["rows"]} == {(m, p) for m in (1, 20) for p in ("dense", "cpu24")}
    assert r["read_bandwidth_gbps"] > 0 and r["cpu"] and r["threads"] >= 1 and out.with_suffix(".png").exists()
    for x in r["rows"]:
        assert x["bytes"] == bench.call_bytes(x["provider"], x["m"], 32, 64, 4)
        assert x["gbps"] == pytest.approx(x["bytes"] / (x["us"] * 1e-6) / 1e9, rel=0.02, abs=0.005)  # 2 decimals
        assert x["bandwidth_fraction"] == pytest.approx(x["gbps"] / x["read_bandwidth_gbps"], rel=0.02, abs=1e-3)


def test_the_bandwidth_is_read_between_the_timed_passes():
    """Each row's share is against reads interleaved with its own passes, not a figure from the run's start."""
    events = []

    class Probe:
        nbytes = 10**9

        def read(self):
            events.append("read")

    t, gbps = bench.time_pass([lambda: events.append("pass")], Probe(), min_seconds=0, min_passes=4, probes=3)
    assert events == ["pass", "pass", "read", "pass", "read", "pass", "read", "pass"]  # warm-up pass first
    assert t > 0 and gbps > 0


def test_a_tiny_quantized_run_reports_the_quantized_providers(tmp_path):
    out = tmp_path / "q.json"
    bench.measure([(32, 64)], [1], "bf16", compiled_ms=(), out=out, budget_gib=0.01, log=lambda *a: None,
                  quant=bench.parse_quant("int8,int4"))
    rows = json.loads(out.read_text())["rows"]
    assert {x["provider"] for x in rows} == {"dense", "cpu24", "cpu24-int8", "cpu24-int4", "dense-int8"}
    for x in rows:
        assert x["bytes"] == bench.call_bytes(x["provider"], 1, 32, 64, 2)
    assert next(x for x in rows if x["provider"] == "cpu24-int4")["group_size"] == 64
    with pytest.raises(ValueError, match="unknown scheme.*fp8"):
        bench.parse_quant("int8,fp8")


def test_the_compiled_int8_stacks_compute_the_int8_linears():
    """The engine's compiled dense int8 path and compiled 2:4 int8 layers, each stack one graph, odd shapes, against
    float64 references."""
    from sparse_runtime.nn.int8_dense import int8_matmul

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 72, generator=g)
    stack = [(torch.randint(-127, 128, (n, 72), generator=g, dtype=torch.int8), torch.rand(n, generator=g) + 0.1,
              torch.randn(n, generator=g)) for n in (40, 24)]
    for y, (c, sc, b) in zip(bench.compiled(lambda x: [int8_matmul(x, c, sc.view(-1, 1)) + b
                                                       for c, sc, b in stack])(x), stack):
        want = x.double() @ (c.double() * sc.double()[:, None]).T + b.double()
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-4)
    layers = [SparseLinear.from_linear(torch.nn.Linear(72, n), backend="cpu", quant=QuantScheme("int8"))
              for n in (40, 24)]
    for y, layer in zip(bench.compiled(lambda x: [layer(x) for layer in layers])(x), layers):
        want = x.double() @ layer.dense_weight().double().T + layer.bias.double()
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-4)
    assert bench.weight_bytes("compiled-int8", 40, 72, 4) == bench.weight_bytes("dense-int8", 40, 72, 4)
    assert bench.weight_bytes("compiled-cpu24-int8", 40, 72, 4) == bench.weight_bytes("cpu24-int8", 40, 72, 4)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of 8"):
        bench.parse_named_shapes("64x36")
    with pytest.raises(ValueError, match="NxK"):
        bench.parse_named_shapes("64-36")
    assert bench.parse_named_shapes("smollm2,8x16")[0] == (576, 576) and bench.parse_named_shapes("8x16") == [(8, 16)]
