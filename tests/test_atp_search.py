"""ATP's beta search on stories260K: scored on held-out windows, picks the lowest, leaves the model pruned with
it, and its shared first-block inputs change nothing against a fresh prune."""
import pytest
import torch

from sparse_runtime.data.perplexity import perplexity
from sparse_runtime.models.sources import load_model
from sparse_runtime.prune import (PruneConfig, calibration_windows, collect_statistics, find_decoder_layers, prune,
                                  prune_from_statistics)
from sparse_runtime.prune.allocation import allocate
from sparse_runtime.prune.atp_search import REUSED, search_beta
from sparse_runtime.data.calibration import validation_windows
from sparse_runtime.prune.statistics import capture_inputs

from conftest import TEXT

pytestmark = pytest.mark.usefixtures("one_thread")
C4 = TEXT / "c4_validation_2k.jsonl"
WANDA_70 = PruneConfig("wanda", "unstructured", 0.7, progress=False)


@pytest.fixture(scope="module")
def data(stories_dir):
    _, tok = load_model(stories_dir)
    used = set()
    calib = calibration_windows(tok, C4, nsamples=4, seqlen=64, seed=0, used=used)
    val = validation_windows(tok, C4, 4, 64, exclude=used)
    return tok, calib, val


@pytest.mark.parametrize("statistics", ["dense", "sequential"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_search_keeps_the_best_validation_beta_and_the_model_pruned_with_it(stories_dir, data, method, statistics):
    _, calib, val = data
    model = load_model(stories_dir)[0]
    lines = []
    search = search_beta(model, PruneConfig(method, "unstructured", 0.7, progress=False), calib, val,
                         betas=[0.02, 0.06, 0.1], log=lines.append, statistics=statistics)
    ppls = [t["validation_ppl"] for t in search.trials]
    assert [t["beta"] for t in search.trials] == [0.02, 0.06, 0.1] and len(lines) == 3
    best = search.trials[ppls.index(min(ppls))]["beta"]
    assert search.allocation.params["beta"] == best
    assert search.allocation.params["search"]["statistics"] == statistics
    assert search.allocation.params["search"]["reused"][:len(REUSED)] == list(REUSED)
    got = perplexity(model, val.reshape(-1), seqlen=64, progress=False).ppl
    if statistics == "sequential":  # the trial was the final prune; with dense statistics it was a proxy
        assert got == pytest.approx(min(ppls), rel=1e-4)
    fresh = load_model(stories_dir)[0]  # the same beta pruned from scratch, inputs captured anew
    prune(fresh, method, "unstructured", 0.7, calib=calib, allocation=allocate(fresh, "atp", 0.7, beta=best),
          progress=False)
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, msg=n)


def test_patience_stops_early(stories_dir, data):
    _, calib, val = data
    model = load_model(stories_dir)[0]
    search = search_beta(model, WANDA_70, calib, val, betas=[0.1, 0.02, 0.04, 0.06], patience=1)
    ppl = [t["validation_ppl"] for t in search.trials]
    for j in range(1, len(ppl) - 1):  # every trial but the last improved on the best so far
        assert ppl[j] < min(ppl[:j])
    if len(ppl) < 4:  # and it stopped at the first one that did not
        assert ppl[-1] >= min(ppl[:-1])


def test_reused_inputs_equal_fresh_ones(stories_dir, data):
    _, calib, _ = data
    a, b = load_model(stories_dir)[0], load_model(stories_dir)[0]
    layers, path = find_decoder_layers(a)
    inputs = capture_inputs(a, layers, path, calib, torch.device("cpu"), torch.device("cpu"))
    alloc = allocate(a, "atp", 0.6, beta=0.05)
    ra = prune(a, "wanda", "unstructured", 0.6, calib=calib, allocation=alloc, inputs=inputs, progress=False)
    rb = prune(b, "wanda", "unstructured", 0.6, calib=calib, allocation=alloc, progress=False)
    assert all(torch.equal(ra.masks[n], rb.masks[n]) for n in ra.masks)



def test_dense_statistics_trials_match_a_prune_from_dense_statistics(stories_dir, data):
    """Each dense-statistics trial scores exactly the model a dense-statistics prune at its beta gives."""
    _, calib, val = data
    model = load_model(stories_dir)[0]
    search = search_beta(model, WANDA_70, calib, val, betas=[0.04, 0.08])
    for trial in search.trials:
        fresh = load_model(stories_dir)[0]
        config = WANDA_70.replace(allocation=allocate(fresh, "atp", 0.7, beta=trial["beta"]))
        prune_from_statistics(fresh, config, collect_statistics(fresh, calib, config))
        got = perplexity(fresh, val.reshape(-1), seqlen=64, progress=False).ppl
        assert got == pytest.approx(trial["validation_ppl"], rel=1e-4)
    with pytest.raises(ValueError, match="statistics must be one of"):
        search_beta(model, WANDA_70, calib, val, betas=[0.04], statistics="cached")
