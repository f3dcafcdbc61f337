"""Deployment plans: the byte model, the greedy choice against hand-made costs, naive plans, plan files, and
mixed dense / 2:4 checkpoints written by ``prune --plan`` reloading with equal logits."""
import json

import pytest
import torch
from torch import nn

from sparse_runtime import SparseLinear, load_pretrained
from sparse_runtime.models.checkpoint import read_sparse_config
from sparse_runtime.cli import main
from sparse_runtime.models.sources import load_model
from sparse_runtime.prune import PruneConfig, calibration_windows, collect_statistics, prune, prune_from_statistics
from sparse_runtime.data.calibration import validation_windows
from sparse_runtime.prune.plan import (BYTES_24, DeploymentPlan, LinearCost, PlanError, choose, linear_costs,
                                      naive, predicted_speedup, search_depth_weight)

from conftest import TEXT

pytestmark = pytest.mark.usefixtures("one_thread")
STORIES_TEXT = str(TEXT / "tinystories_valid_head.txt")


def _costs(errors_by_block):
    """Equal linears, one per error, per block."""
    return [LinearCost(f"model.layers.{b}.{k}", b, 100, e) for b, errs in enumerate(errors_by_block)
            for k, e in zip("abc", errs)]


def test_byte_model():
    costs = _costs([[0.1, 0.1], [0.1, 0.1]])
    assert predicted_speedup(costs, set()) == 1.0
    assert predicted_speedup(costs, {c.name for c in costs}) == pytest.approx(16 / 9)
    # an lm_head of 400 parameters stays dense: (400 + 400) / (400 + 400 * 9/16)
    assert predicted_speedup(costs, {c.name for c in costs}, other=400) == pytest.approx(800 / (400 + 400 * BYTES_24))
    half = predicted_speedup(costs, {costs[0].name, costs[1].name})
    assert half == pytest.approx(400 / (200 + 200 * 9 / 16))


def test_choice_takes_the_smallest_errors_and_keeps_early_blocks_dense():
    costs = _costs([[0.3, 0.1], [0.2, 0.4]])
    plan = choose(costs, fraction=0.5)
    assert plan.sparse == ["model.layers.0.b", "model.layers.1.a"] and plan.fraction == 0.5
    equal = _costs([[0.2, 0.2], [0.2, 0.2], [0.2, 0.2]])
    plan = choose(equal, fraction=0.5, depth_weight=1.0)  # equal errors: depth decides, the deepest go 2:4
    assert {n.split(".")[2] for n in plan.sparse} <= {"1", "2"} and "model.layers.2.a" in plan.sparse
    assert len(choose(equal, speedup=1.2).sparse) == 3  # 3 of 6 linears: 600 / (300 + 300 * 9/16) = 1.28


def test_targets_out_of_reach_name_the_limit():
    costs = _costs([[0.1, 0.1]])
    with pytest.raises(PlanError, match=r"target speedup 2.0 is out of reach: the byte model allows \(1, 1.7778\]"):
        choose(costs, speedup=2.0)
    with pytest.raises(PlanError, match=r"target fraction must be in \(0, 1\], got 1.5"):
        choose(costs, fraction=1.5)
    with pytest.raises(PlanError, match="give exactly one target"):
        choose(costs)


def test_naive_plans():
    costs = _costs([[0.1, 0.1], [0.1, 0.1], [0.1, 0.1], [0.1, 0.1]])
    assert naive(costs, "all").fraction == 1.0
    first = naive(costs, "first_dense", fraction=0.5)
    assert first.dense == [c.name for c in costs if c.block < 2]  # whole blocks, deepest first
    r0, r1 = naive(costs, "random", fraction=0.5, seed=0), naive(costs, "random", fraction=0.5, seed=1)
    assert r0.fraction == r1.fraction == 0.5 and naive(costs, "random", fraction=0.5, seed=0).sparse == r0.sparse
    s = choose(costs, speedup=1.3).speedup
    assert naive(costs, "first_dense", speedup=s).speedup >= s and naive(costs, "random", speedup=s).speedup >= s
    with pytest.raises(PlanError, match="unknown naive plan 'best'"):
        naive(costs, "best", fraction=0.5)


def test_naive_plans_at_a_speedup_ceiling_fill_at_linear_granularity():
    costs = _costs([[0.1, 0.1, 0.1]] * 4)
    s = choose(costs, fraction=7 / 12).speedup  # 7 of 12 equal linears: not a whole number of blocks
    first = naive(costs, "first_dense", speedup=s, not_above=True)
    assert first.speedup == pytest.approx(s) and len(first.sparse) == 7
    # blocks 3 and 2 whole, then block 1's first linear in model order
    assert first.dense == ["model.layers.0.a", "model.layers.0.b", "model.layers.0.c", "model.layers.1.b",
                           "model.layers.1.c"]
    plans = [naive(costs, "random", speedup=s + 1e-3, not_above=True, seed=seed) for seed in range(5)]
    for p in plans + [naive(costs, "first_dense", speedup=s + 1e-3, not_above=True)]:
        assert p.speedup <= s + 1e-3 and len(p.sparse) == 7  # below the ceiling by less than one more linear
    assert len(naive(costs, "random", speedup=s + 1e-3).sparse) == 8  # a plain target is met, not a ceiling


def test_plan_file_round_trip_and_bad_files(tmp_path):
    plan = choose(_costs([[0.3, 0.1]]), fraction=0.5)
    plan.save(tmp_path / "p.json")
    assert DeploymentPlan.load(tmp_path / "p.json") == plan
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # no temp file left
    for content, message in [("{", "not JSON"), ('{"format": "x"}', "not a sparse_runtime.plan file"),
                             ('{"format": "sparse_runtime.plan", "strategy": "a"}', "missing 'sparse'"),
                             (json.dumps(plan.to_dict() | {"sparse": []}), "'sparse' must be a non-empty list")]:
        (tmp_path / "bad.json").write_text(content)
        with pytest.raises(PlanError, match=message):
            DeploymentPlan.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="plan file .* not found"):
        DeploymentPlan.load(tmp_path / "missing.json")
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(PlanError, match="names 'model.layers.0.b', which is not a linear layer of this model"):
        plan.check_model(model)


def test_plan_cli_then_prune_plan_gives_a_mixed_checkpoint_with_equal_logits(stories_dir, tmp_path, capsys):
    plan_file = tmp_path / "plan.json"
    assert main(["plan", "--model", str(stories_dir), "--device", "cpu", "--calib", STORIES_TEXT, "--nsamples", "4",
                 "--seqlen", "64", "--target-fraction", "0.6", "--depth-weight", "1", "--out", str(plan_file)]) == 0
    printed = capsys.readouterr().out
    assert "predicted decode speedup" in printed and "(* = dense)" in printed
    plan = DeploymentPlan.load(plan_file)
    assert 0.6 <= plan.fraction < 0.8 and plan.dense and len(plan.info["errors"]) == 35
    out = tmp_path / "ckpt"
    assert main(["prune", "--model", str(stories_dir), "--device", "cpu", "--method", "wanda", "--calib",
                 STORIES_TEXT, "--nsamples", "4", "--seqlen", "64", "--plan", str(plan_file), "--out", str(out)]) == 0
    assert read_sparse_config(out)["pruning"]["plan"]["fraction"] == plan.fraction
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    outs = {}
    for backend in ("reference", "decompressed", "triton"):  # triton: the interpreter on the CPU
        model = load_pretrained(out, backend=backend)
        sparse = {n for n, m in model.named_modules() if isinstance(m, SparseLinear)}
        assert {m.active_backend for m in model.modules() if isinstance(m, SparseLinear)} == {backend}
        dense = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
        assert sparse == set(plan.sparse) and dense == set(plan.dense)
        with torch.no_grad():
            outs[backend] = model(ids).logits
    torch.testing.assert_close(outs["reference"], outs["decompressed"], rtol=0, atol=0)
    torch.testing.assert_close(outs["triton"], outs["reference"], rtol=1e-4, atol=1e-4)
    # the same as pruning in Python with the plan's targets
    from sparse_runtime.prune import calibration_windows, prune

    ref, tok = load_model(stories_dir)
    calib = calibration_windows(tok, STORIES_TEXT, 4, 64, 0)
    prune(ref, "wanda", "2:4", calib=calib, targets=plan.sparse, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(outs["reference"], ref(ids).logits)


def test_plan_cli_bad_input(stories_dir, tmp_path, capsys):
    argv = ["--model", str(stories_dir), "--device", "cpu", "--calib", STORIES_TEXT, "--nsamples", "2", "--seqlen",
            "32"]
    assert main(["plan", *argv, "--target-speedup", "9"]) == 2
    assert "target speedup 9.0 is out of reach" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    assert main(["prune", *argv, "--plan", str(bad), "--out", str(tmp_path / "c")]) == 2
    assert "not a sparse_runtime.plan file" in capsys.readouterr().err
    assert main(["prune", *argv, "--plan", str(bad), "--pattern", "4:8", "--out", str(tmp_path / "c")]) == 2
    assert "--plan decides 2:4 or dense per linear" in capsys.readouterr().err


def test_depth_weight_search_keeps_the_best_validation_plan_and_leaves_the_model_dense(stories_dir):
    from sparse_runtime.data.perplexity import perplexity

    model, tok = load_model(stories_dir)
    used = set()
    calib = calibration_windows(tok, TEXT / "c4_validation_2k.jsonl", 4, 64, seed=0, used=used)
    val = validation_windows(tok, TEXT / "c4_validation_2k.jsonl", 4, 64, exclude=used)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    errors = prune(load_model(stories_dir)[0], "wanda", "2:4", calib=calib, record_errors=True, progress=False).errors
    costs, other = linear_costs(model, errors)
    lines = []
    plan = search_depth_weight(model, costs, calib, val, fraction=0.6, other=other, weights=(0.0, 8.0, 400.0),
                               log=lines.append)
    trials = plan.info["search"]["trials"]
    assert [t["depth_weight"] for t in trials] == [0.0, 8.0, 400.0] and len(lines) == 3
    assert plan.info["depth_weight"] == min(trials, key=lambda t: t["validation_ppl"])["depth_weight"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    deep = choose(costs, fraction=0.6, other=other, depth_weight=400.0)  # rescored independently, from scratch
    fresh = load_model(stories_dir)[0]
    config = PruneConfig("wanda", "2:4", targets=deep.sparse, progress=False)
    prune_from_statistics(fresh, config, collect_statistics(fresh, calib, config))
    assert perplexity(fresh, val.reshape(-1), seqlen=64, progress=False).ppl == pytest.approx(
        trials[2]["validation_ppl"], rel=1e-4)
    # a huge weight keeps the first blocks dense: 40% of the weights are the first two of five blocks
    assert {c.block for c in costs if c.name in deep.dense} == {0, 1}
    assert all(c.name in deep.dense for c in costs if c.block == 0)


def test_plan_cli_searches_the_depth_weight_on_held_out_c4_by_default(stories_dir, tmp_path, capsys):
    plan_file = tmp_path / "plan.json"
    assert main(["plan", "--model", str(stories_dir), "--device", "cpu", "--nsamples", "4", "--seqlen", "64",
                 "--val-windows", "2", "--target-speedup", "1.3", "--out", str(plan_file)]) == 0
    err = capsys.readouterr().err
    assert err.count("plan depth weight") == 9
    search = DeploymentPlan.load(plan_file).info["search"]
    assert search["validation_windows"] == [2, 64] and len(search["trials"]) == 9
