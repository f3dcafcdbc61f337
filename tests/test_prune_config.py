"""PruneConfig: one object for a prune, every bad value refused when it is built, with a clear error."""
import pytest
import torch

from sparse_runtime.prune import METHODS, PruneConfig, RotateOptions, prune
from sparse_runtime.prune.allocation import Allocation, AllocationError
from sparse_runtime.prune.config import as_config
from sparse_runtime.prune.methods import NEEDS_CALIBRATION

from helpers import tiny_model

UNSTRUCTURED_ATP = Allocation("atp", 0.5, [0.4, 0.6])


@pytest.mark.parametrize("fields,message", [
    (dict(method="obs"), "unknown pruning method 'obs'; choose from magnitude, wanda, sparsegpt"),
    (dict(pattern="2-4"), "sparsity pattern must be 'N:M' or 'unstructured', got '2-4'"),
    (dict(pattern="4:2"), "pattern '4:2' needs 0 < N < M <= 256"),
    (dict(pattern="unstructured", sparsity=1.0), r"sparsity must be in \(0, 1\), got 1.0"),
    (dict(sparsity="half"), r"sparsity must be in \(0, 1\), got half"),
    (dict(targets="q_proj"), "targets takes a list of linear names or globs, not 'q_proj'"),
    (dict(ignore=["lm_head", 3]), r"ignore takes a list of linear names or globs, not \['lm_head', 3\]"),
    (dict(device="tpu9"), "device 'tpu9': "),
    (dict(offload="yes"), "offload must be True or False, got 'yes'"),
    (dict(record_errors=1), "record_errors must be True or False, got 1"),
    (dict(progress=None), "progress must be True or False, got None"),
    (dict(true_sequential="on"), "true_sequential must be True, False or None, got 'on'"),
    (dict(damp=-0.1), "damp must be a number >= 0, got -0.1"),
    (dict(refit=-1), "refit takes a number of conjugate-gradient steps >= 0, not -1"),
    (dict(refit=2.5), "refit takes a number of conjugate-gradient steps >= 0, not 2.5"),
    (dict(refit=True), "refit takes a number of conjugate-gradient steps >= 0, not True"),
    (dict(method="wanda", refit=5), "refit re-solves SparseGPT's kept weights: wanda does not take it"),
    (dict(blocksize=0), "blocksize takes a number of columns >= 1, not 0"),
    (dict(blocksize=6), "blocksize 6 must be a multiple of the group size 4"),
    (dict(method="magnitude", per="col"), "per must be 'row' or 'matrix', got 'col'"),
    (dict(rotate="variance"), "unknown rotation objective 'variance'; choose from entropy, nm"),
    (dict(rotate=3), "rotate takes 'none', 'entropy', 'nm' or a RotateOptions, not 3"),
    (dict(rotate="nm", rotate_steps=-1), "need rotate steps >= 0 and blocks >= 1, got -1 and 1"),
    (dict(rotate="nm", rotate_blocks=0), "need rotate steps >= 0 and blocks >= 1, got 100 and 0"),
    (dict(rotate="nm", rotate_importance="obs"), "unknown rotation importance 'obs'"),
    (dict(method="magnitude", rotate="nm", rotate_importance="wanda"),
     "rotate importance 'wanda' needs calibration statistics, which magnitude pruning does not collect"),
    (dict(allocation="atp"), "allocation takes an Allocation"),
    (dict(pattern="2:4", allocation=UNSTRUCTURED_ATP),
     "the allocation is for pattern 'unstructured', the prune for '2:4'"),
])
def test_bad_values_are_refused_when_the_config_is_built(fields, message):
    with pytest.raises(ValueError, match=message):
        PruneConfig(**fields)


def test_defaults_replace_and_the_method_names():
    config = PruneConfig()
    assert (config.method, config.pattern, config.sparsity, config.rotate) == ("sparsegpt", "2:4", 0.5, None)
    # true-sequential by default for SparseGPT and for rotated prunes, not for Wanda (as their papers)
    assert config.sequential and not PruneConfig("wanda").sequential
    assert PruneConfig("wanda", rotate="nm").sequential and not PruneConfig("wanda", true_sequential=False,
                                                                             rotate="nm").sequential
    rotated = PruneConfig("wanda", rotate="entropy", rotate_steps=7, rotate_blocks=2, damp=0.05)
    assert rotated.rotate == RotateOptions("entropy", 7, 2, damp=0.05)
    assert PruneConfig(rotate="none").rotate is None
    assert PruneConfig("magnitude", blocksize=6).blocksize == 6  # only SparseGPT has column blocks
    with pytest.raises(ValueError, match="unknown pruning method"):  # a copy is validated again
        config.replace(method="obs")
    assert config.replace(sparsity=0.7).sparsity == 0.7 and config.sparsity == 0.5
    assert list(METHODS) == ["magnitude", "wanda", "sparsegpt"] and NEEDS_CALIBRATION == {"wanda", "sparsegpt"}


def test_prune_builds_or_takes_a_config():
    assert as_config("wanda", "4:8").pattern == "4:8"
    given = PruneConfig("wanda", "unstructured", 0.6)
    assert as_config(given) is given and as_config(given, sparsity=0.7) == given.replace(sparsity=0.7)
    with pytest.raises(ValueError, match="give a PruneConfig or a method name"):
        as_config(3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'blocksise'"):
        prune(tiny_model("llama"), "sparsegpt", calib=torch.randint(0, 128, (1, 8)), blocksise=64)
    model, calib = tiny_model("llama"), torch.randint(0, 128, (2, 8))
    res = prune(model, PruneConfig("wanda", "unstructured", 0.6, progress=False), calib=calib, sparsity=0.7)
    assert res.method == "wanda" and res.sparsity == 0.7


def test_an_allocation_for_another_model_is_refused_before_any_weight_changes():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    alloc = Allocation("atp", 0.5, [0.4, 0.5, 0.6] + [0.5] * 7)
    for method in METHODS:
        with pytest.raises(AllocationError, match="the allocation has 10 block rates, the model 2 blocks"):
            prune(model, method, "unstructured", 0.5, calib=torch.randint(0, 128, (1, 8)), allocation=alloc,
                  progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
