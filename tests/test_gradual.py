"""Gradual pruning with recovery on stories260K: every step prunes a superset of the last, the intermediate N:M steps
never take more than M - N of a group, the last step is exactly the target pattern (2:4, unstructured 50%), the
recovery budget is shared out over the steps, the command line end to end, and bad input is a clear error."""
import json
from types import SimpleNamespace

import pytest
import torch

from sparse_runtime import SparseLinear, load_pretrained
from sparse_runtime.cli import main
from sparse_runtime.data.calibration import DEFAULT_CALIB, calibration_windows
from sparse_runtime.errors import MaskError
from sparse_runtime.format.masks import pattern_mask, validate_nm
from sparse_runtime.format.quant import fake_quantize
from sparse_runtime.gradual import phase_steps, prune_gradually, run, sparsities, step_configs
from sparse_runtime.models.checkpoint import read_sparse_config
from sparse_runtime.models.sources import load_model
from sparse_runtime.prune import PruneConfig
from sparse_runtime.prune.methods import METHODS
from sparse_runtime.prune.magnitude import magnitude_mask
from sparse_runtime.prune.sparsegpt import sparsegpt_prune
from sparse_runtime.prune.wanda import wanda_mask
from sparse_runtime.recover import RecoverConfig, recovery_windows

RECOVERY = RecoverConfig(tokens=3 * 2 * 64, seqlen=64, batch=2, lr=2e-3, eval_windows=2, progress=False,
                         device="cpu")


def groups_keep(mask, m=4):
    return mask.view(mask.shape[0], -1, m).sum(-1)


def test_the_schedule_is_cubic_and_ends_at_the_target():
    s = sparsities(0.5, 4)
    assert s[-1] == 0.5 and all(a < b for a, b in zip([0.0, *s], s))
    assert s[0] == pytest.approx(0.5 * (1 - 0.75 ** 3))
    assert sparsities(0.7, 1) == [0.7]
    configs = step_configs(PruneConfig("wanda", "2:4"), 3)
    assert [(c.pattern, c.toward) for c in configs] == [("unstructured", "2:4")] * 2 + [("2:4", None)]
    assert [c.sparsity for c in configs[:2]] == sparsities(0.5, 3)[:2]
    configs = step_configs(PruneConfig("magnitude", "unstructured", 0.6), 2)
    assert [(c.pattern, c.toward) for c in configs] == [("unstructured", None)] * 2
    assert [c.sparsity for c in configs] == [pytest.approx(0.6 * 7 / 8), 0.6]
    assert phase_steps(RECOVERY.replace(tokens=7 * 128), 3) == [3, 2, 2]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_each_method_prunes_a_superset_that_can_still_become_n_m(method):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(256, 64, generator=g) * torch.rand(64, generator=g)
    h, sq = 2 * x.T @ x / len(x), x.pow(2).sum(0)

    def step(weight, pattern, sparsity, prior, toward):
        if method == "magnitude":
            return weight * (mask := magnitude_mask(weight, pattern, sparsity, "row", prior, toward)), mask
        if method == "wanda":
            return weight * (mask := wanda_mask(weight, sq, pattern, sparsity, prior, toward)), mask
        return sparsegpt_prune(weight, h, pattern, sparsity, blocksize=16, prior=prior, toward=toward)

    masks = []
    for s in sparsities(0.5, 3)[:2]:
        w, mask = step(w, "unstructured", s, masks[-1] if masks else None, "2:4")
        assert (groups_keep(mask) >= 2).all() and not (w[~mask]).any()
        masks.append(mask)
    w, mask = step(w, "2:4", 0.5, masks[-1], None)
    validate_nm(mask)
    masks.append(mask)
    for before, after in zip(masks, masks[1:]):
        assert not (after & ~before).any() and after.sum() < before.sum()
    # without the protection toward 2:4 some group loses three, and the 2:4 step cannot keep what was pruned
    loose = step(torch.randn(16, 64, generator=g), "unstructured", 0.45, None, None)[1]
    assert (groups_keep(loose) < 2).any()
    with pytest.raises(MaskError, match="would come back"):
        step(torch.randn(16, 64, generator=g), "2:4", 0.5, loose, None)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_a_prior_holds_when_the_prune_also_quantizes(method):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(256, 64, generator=g) * torch.rand(64, generator=g)
    stats = SimpleNamespace(H=2 * x.T @ x / len(x), sq=x.pow(2).sum(0))
    prior = magnitude_mask(w, "unstructured", 0.3, "row", None, "2:4")
    config = PruneConfig(method, "2:4", quantize="int4", group_size=16, blocksize=16)
    linear = torch.nn.Linear(64, 16, bias=False).requires_grad_(False)
    linear.weight.copy_(w * prior)
    keep, scales = METHODS[method].prune_linear(linear, stats, "2:4", 0.5, config, prior)
    validate_nm(keep)
    assert not (keep & ~prior).any()
    assert torch.equal(fake_quantize(linear.weight, config.quant, scales, keep), linear.weight)
    loose = magnitude_mask(torch.randn(16, 64, generator=g), "unstructured", 0.45)
    with pytest.raises(MaskError, match="would come back"):
        METHODS[method].prune_linear(linear, stats, "2:4", 0.5, config, loose)


def test_a_step_below_the_last_sparsity_is_refused():
    first = pattern_mask(torch.rand(8, 16), "unstructured", 0.5)
    with pytest.raises(MaskError, match="would come back"):
        pattern_mask(torch.rand(8, 16), "unstructured", 0.25, prior=first)


@pytest.fixture(scope="module")
def stories(stories_dir, one_thread):
    _, tok = load_model(stories_dir)
    calib = calibration_windows(tok, DEFAULT_CALIB, 4, 64)
    windows = recovery_windows(tok, DEFAULT_CALIB, RECOVERY.steps * RECOVERY.batch, 64, 2)
    return stories_dir, calib, windows


@pytest.mark.parametrize("method,pattern,sparsity", [("wanda", "2:4", 0.5), ("sparsegpt", "2:4", 0.5),
                                                     ("magnitude", "unstructured", 0.5)])
def test_gradual_masks_only_grow_and_end_at_the_target(stories, monkeypatch, method, pattern, sparsity):
    path, calib, windows = stories
    steps = []
    real = run.prune

    def recording(model, config, calib=None):
        result = real(model, config, calib=calib)
        steps.append((config, {n: result.masks[n] for n in result.masks}))
        return result

    monkeypatch.setattr(run, "prune", recording)
    model, teacher = load_model(path)[0], load_model(path)[0]
    result = prune_gradually(model, teacher, PruneConfig(method, pattern, sparsity, device="cpu", progress=False),
                             RECOVERY, windows, 3, calib=None if method == "magnitude" else calib)
    assert [c.sparsity for c, _ in steps] == sparsities(0.5, 3)
    assert [c.pattern for c, _ in steps] == (["unstructured"] * 3 if pattern == "unstructured" else
                                             ["unstructured", "unstructured", "2:4"])
    names = steps[0][1].keys()
    assert len(names) == 35 and all(m.keys() == names for _, m in steps)
    for (_, before), (_, after) in zip(steps, steps[1:]):
        for n in names:
            assert not (after[n] & ~before[n]).any(), f"{n}: a pruned weight came back"
    final = steps[-1][1]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert layers.keys() == names
    for n, layer in layers.items():
        assert layer.pattern == pattern and torch.equal(layer.sparse_weight.mask(), final[n])
        if pattern == "2:4":
            validate_nm(final[n])
            assert (groups_keep(steps[0][1][n]) >= 2).all()
        else:  # magnitude per matrix: exactly half of each matrix
            assert int((~final[n]).sum()) == final[n].numel() // 2
        assert not layer.dense_weight()[~steps[0][1][n]].any()
    # the budget is shared out, and each phase is measured after its prune and after its recovery
    assert result.tokens == RECOVERY.tokens and [s["recovery"].steps for s in result.steps] == [1, 1, 1]
    assert [(e["prune_step"], e["tokens"]) for e in result.curve()] == [(1, 0), (1, 128), (2, 128), (2, 256),
                                                                         (3, 256), (3, 384)]
    assert result.prune.pattern == pattern and result.summary()["schedule"]["steps"] == 3


def test_the_teacher_must_be_another_model(stories):
    path, calib, windows = stories
    model = load_model(path)[0]
    with pytest.raises(ValueError, match="separate copy"):
        prune_gradually(model, model, PruneConfig("magnitude", "2:4"), RECOVERY, windows, 2)
    for config, message in [(PruneConfig("magnitude", "2:4", rotate="nm"), "no rotation"),
                            (PruneConfig("magnitude", "unstructured", 0.5, toward="2:4"), "sets prior and toward"),
                            (PruneConfig("wanda", "2:4", quantize="int8"), "off a quantization grid")]:
        with pytest.raises(ValueError, match=message):
            step_configs(config, 2)
    for recovery, message in [(RECOVERY.replace(tokens=128), "need at least one each"),
                              (RECOVERY.replace(loss="block"), "block reconstruction"),
                              (RECOVERY.replace(state="s", stop_after=1), "one session")]:
        with pytest.raises(ValueError, match=message):
            phase_steps(recovery, 2)
    for fields, message in [({"pattern": "2:4", "toward": "2:4"}, "toward takes an N:M pattern beside"),
                            ({"pattern": "unstructured", "sparsity": 0.6, "toward": "2:4"}, "at most 1 - N/M"),
                            ({"prior": [1]}, "prior takes a mapping"),
                            ({"method": "gptq", "quantize": "int8", "prior": {}}, "gptq prunes nothing")]:
        with pytest.raises(ValueError, match=message):
            PruneConfig(**{"method": "magnitude", **fields})
    with pytest.raises(ValueError, match="number of pruning steps >= 1"):
        sparsities(0.5, 0)


@pytest.mark.parametrize("schedule", ["gradual", "oneshot"])
def test_prune_and_recover_from_the_command_line(stories_dir, tmp_path, capsys, one_thread, schedule):
    out = tmp_path / schedule
    argv = ["prune", "--model", str(stories_dir), "--device", "cpu", "--method", "wanda", "--nsamples", "4",
            "--seqlen", "64", "--recover-tokens", "256", "--recover-seqlen", "64", "--recover-batch", "2",
            "--recover-lr", "2e-3", "--out", str(out)]
    argv += ["--schedule", "gradual", "--steps", "2", "--json"] if schedule == "gradual" else []
    assert main(argv) == 0
    config = read_sparse_config(out)
    assert config["recovery"]["tokens"] == 256 and config["recovery"]["lr"] == 2e-3
    if schedule == "gradual":
        report = json.loads(capsys.readouterr().out)
        assert report["achieved_sparsity"] == 0.5 and report["recovery"]["tokens"] == 256
        assert report["recovery"]["schedule"]["patterns"] == ["unstructured", "2:4"]
        assert config["pruning"]["schedule"] == {"kind": "gradual", **report["recovery"]["schedule"]}
    else:
        err = capsys.readouterr().err
        assert "oneshot in 1 step(s), 256 recovery tokens" in err, err
        assert config["pruning"]["schedule"] == {"kind": "oneshot", "steps": 1, "sparsities": [0.5],
                                                 "patterns": ["2:4"]}
    model = load_pretrained(out, backend="reference")
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 35
    for layer in layers:
        assert layer.pattern == "2:4"
        validate_nm(layer.sparse_weight.mask())


@pytest.mark.parametrize("extra,message", [
    (["--schedule", "gradual", "--steps", "0", "--recover-tokens", "256"], "--steps takes a number"),
    (["--schedule", "gradual", "--steps", "2"], "needs --recover-tokens"),
    (["--schedule", "gradual", "--recover-tokens", "256"], "needs --steps K"),
    (["--steps", "2", "--recover-tokens", "256"], "--steps belongs to --schedule gradual"),
    (["--teacher", "X"], "give --recover-tokens"),
    (["--recover-lr", "1e-3"], "give --recover-tokens"),
    (["--recover-tokens", "0"], "tokens must be a positive integer"),
    (["--schedule", "gradual", "--steps", "4", "--recover-tokens", "512"], "need at least one each"),
    (["--recover-tokens", "256", "--rotate", "nm"], "no --rotate"),
    (["--recover-tokens", "256", "--quantize", "int8"], "prune with --quantize, then `sparse-runtime recover`"),
])
def test_bad_schedules_are_refused_before_any_work(stories_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    argv = ["prune", "--model", str(stories_dir), "--device", "cpu", "--method", "magnitude", "--out", str(out)]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert "sparse-runtime prune: error:" in err and message in err, err
    assert not out.exists()
