"""benchmarks.sink_weight: its run specs, which Hessian each quantizer solves on, and its table."""
import pytest
import torch

from benchmarks import sink_weight as bench
from benchmarks import tables
from sparse_runtime.format.quant import QuantScheme, fake_quantize
from sparse_runtime.prune.sparsegpt import sparsegpt_solve
from sparse_runtime.prune.statistics import Hessian


@pytest.mark.parametrize("spec", ["gptq", "awq:all", "gptq-sink:", "rtn"])
def test_bad_run_specs_are_refused(spec):
    with pytest.raises(SystemExit, match="want QUANTIZER:LINEARS"):
        bench.parse_run(spec)


def test_each_quantizer_solves_on_its_hessian():
    """rtn ignores the statistics; gptq-sink takes the first-token-weighted Hessian for k/v only, gptq-sink-all for
    every linear, gptq never."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g)
    pair = (Hessian(64, "cpu"), Hessian(64, "cpu", first_weight=32.0))
    x = torch.randn(2, 16, 64, generator=g)
    x[:, 0] *= 10  # a sink-like first token, so the two Hessians give different solutions
    for h in pair:
        h.add(x)
    scheme = QuantScheme("int4", 32)
    solve = lambda H: sparsegpt_solve(w, H, keep=torch.ones_like(w, dtype=torch.bool), quant=scheme).weight  # noqa: E731
    plain, weighted = solve(pair[0].H), solve(pair[1].H)
    assert not torch.equal(plain, weighted)
    q = lambda quantizer, name: bench.quantize(w, pair, quantizer, name, scheme)  # noqa: E731
    assert torch.equal(q("rtn", "model.layers.0.self_attn.v_proj"), fake_quantize(w, scheme))
    assert torch.equal(q("gptq", "model.layers.0.self_attn.v_proj"), plain)
    assert torch.equal(q("gptq-sink", "model.layers.0.self_attn.k_proj"), weighted)
    assert torch.equal(q("gptq-sink", "model.layers.0.self_attn.q_proj"), plain)
    assert torch.equal(q("gptq-sink-all", "model.layers.0.mlp.up_proj"), weighted)


def test_the_table_says_each_runs_quantizer_and_its_cost_over_dense():
    report = {"calibration": {"nsamples": 32, "seqlen": 512, "seed": 0}, "eval": {"seqlen": 512, "tokens": 40880},
              "model": "m", "group_size": 64, "sink_weight": 512, "device": "cpu", "torch": "t", "date": "2026-12-07",
              "perplexity": {"dense": 30.0, "gptq:v_proj": 39.0, "gptq-sink:v_proj": 30.3}}
    table = tables.sink_weight.__wrapped__(report)
    assert "| v_proj | GPTQ, every token alike | 39.00 | +30.0% |" in table
    assert "| v_proj | GPTQ, first token x 512 in k/v | 30.30 | +1.0% |" in table
