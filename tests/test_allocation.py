"""Layer-wise allocation: hand-checked formulas, the exact parameter-weighted mean on stories260K's real weights
and activations, clear errors, and the per-block rates reaching the pruned masks."""
import math

import pytest
import torch

from sparse_runtime.format.masks import validate_nm
from sparse_runtime.models.sources import load_model
from sparse_runtime.prune import calibration_windows, prune
from sparse_runtime.prune.allocation import (STRATEGIES, Allocation, AllocationError, allocate, alphapruning_rates,
                                             atp_beta_max, atp_betas, atp_rates, block_linears, hill_alpha,
                                             outlier_ratio, owl_rates, plot_rates, round_keep, weighted_mean)

from conftest import TEXT

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stories(stories_dir):
    model, tok = load_model(stories_dir)
    calib = calibration_windows(tok, TEXT / "c4_validation_2k.jsonl", nsamples=4, seqlen=64, seed=0)
    return model, tok, calib


def test_atp_is_the_papers_arithmetic_progression():
    # s_i = S - beta (L-1)/2 + beta (i-1), i = 1..5: 0.7 - 0.1 + 0.05 (i-1)
    assert atp_rates(0.7, 5, 0.05) == pytest.approx([0.6, 0.65, 0.7, 0.75, 0.8])
    assert atp_beta_max(0.7, 5) == pytest.approx(0.15)  # min(1.4, 0.6) / 4
    assert atp_beta_max(0.3, 5) == pytest.approx(0.15)  # min(0.6, 1.4) / 4
    assert atp_rates(0.3, 5, 0.15)[0] == pytest.approx(0.0)  # the lower bound reaches exactly 0


def test_atp_grid_is_the_papers_and_stops_before_a_full_block():
    # SmolLM2 (30 blocks) at 70%: limit 0.6 / 29 = 0.02069 -> 0.002 ... 0.020, ten trials
    betas = atp_betas(0.7, 30)
    assert betas == pytest.approx([0.002 * k for k in range(1, 11)])
    # stories260K at 70%: limit 0.15, and at 0.15 the deepest block would be pruned 100%
    assert atp_betas(0.7, 5, 0.05) == pytest.approx([0.05, 0.1])


@pytest.mark.parametrize("beta,message", [
    (0.16, "illegal ATP beta 0.16: need 0 < beta <= min(2S/(L-1), 2(1-S)/(L-1)) = 0.150000 for S=0.7, L=5"),
    (0.0, "illegal ATP beta 0.0"),
    (-0.01, "illegal ATP beta -0.01"),
    (0.15, "block 4 gets sparsity 1.0000, outside [0, 1)"),
])
def test_illegal_beta_names_the_limit(beta, message):
    with pytest.raises(AllocationError) as e:
        atp_rates(0.7, 5, beta)
    assert message in str(e.value)


def test_owl_outlier_ratio_on_a_constructed_tensor():
    # 95 ones and 5 hundreds: mean 5.95, so M=5 puts the threshold at 29.75 and exactly the 5 hundreds above it
    a = torch.cat([torch.ones(95), torch.full((5,), 100.0)])
    assert outlier_ratio(a, 5) == pytest.approx(5.0)
    assert outlier_ratio(a, 20) == 0.0  # threshold 119: none
    assert outlier_ratio(torch.ones(10), 0.5) == 100.0


def test_owl_rates_hand_checked():
    # keep = (LOD - min)/(max - min) 2 lambda = [0, .08, .16], minus its mean .08, plus 1 - S
    assert owl_rates([0.0, 5.0, 10.0], 0.7, 0.08) == pytest.approx([0.78, 0.70, 0.62])
    assert owl_rates([3.0, 3.0], 0.6) == [0.6, 0.6]  # no spread: uniform
    with pytest.raises(AllocationError, match=r"block 0 gets sparsity 1.0\d*, outside \[0, 1\)"):
        owl_rates([0.0, 10.0], 0.9, 0.1)


def test_alphapruning_rates_hand_checked():
    # r = [0.8, 1.0, 1.2] (eps 0.2); equal sizes: scale S
    assert alphapruning_rates([2.0, 3.0, 4.0], 0.7, 0.2) == pytest.approx([0.56, 0.70, 0.84])
    rates = alphapruning_rates([2.0, 3.0, 4.0], 0.7, 0.2, sizes=[1, 2, 5])
    assert weighted_mean(rates, [1, 2, 5]) == pytest.approx(0.7, abs=1e-12)
    assert rates[0] < rates[1] < rates[2]  # heavier tail (smaller alpha) pruned less


def test_hill_alpha_recovers_a_power_law_spectrum():
    """Eigenvalues drawn from a Pareto law p(x) ~ x^-3 inside a random orthogonal frame: the fit finds ~3."""
    g = torch.Generator().manual_seed(0)
    n = 400
    u = torch.rand(n, generator=g, dtype=torch.float64)
    eig = u.pow(-1 / (3 - 1))  # x_min 1, alpha 3
    q1 = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    q2 = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    w = q1 @ torch.diag(eig.sqrt()) @ q2
    assert hill_alpha(w) == pytest.approx(3.0, abs=0.4)
    heavier = q1 @ torch.diag(u.pow(-1 / (2 - 1)).sqrt()) @ q2  # alpha 2
    assert hill_alpha(heavier) < hill_alpha(w)


def test_round_keep_hands_whole_n_to_the_largest_remainders():
    assert round_keep([1.5, 2.0, 2.5], [1, 1, 1], 4) == [2, 2, 2]  # 6 kept of 12: the mean stays 2:4
    assert round_keep([1.2, 1.7, 3.1], [1, 1, 1], 4) == [1, 2, 3]
    assert round_keep([0.2, 3.9], [1, 1], 4) == [1, 3]  # N stays in [1, M - 1]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_every_strategy_keeps_the_parameter_weighted_mean_exactly(stories, strategy, sparsity):
    model, _, calib = stories
    alloc = allocate(model, strategy, sparsity, calib=calib, beta=0.04)
    sizes = [sum(m.weight.numel() for m in b.values()) for b in block_linears(model)]
    assert alloc.sizes == sizes and len(alloc.rates) == 5
    assert weighted_mean(alloc.rates, sizes) == pytest.approx(sparsity, abs=1e-12)
    assert alloc.mean() == pytest.approx(sparsity, abs=1e-12)
    assert all(0 <= r < 1 for r in alloc.rates)
    if strategy != "uniform":
        assert max(alloc.rates) - min(alloc.rates) > 0.01  # the real statistics spread the rates


def test_unequal_block_sizes_keep_the_weighted_mean(stories):
    """Skipping a linear (targets) makes one block smaller: the ATP progression is shifted, not broken."""
    model, _, calib = stories
    targets = [f"model.layers.{i}.{p}" for i in range(5) for p in ("self_attn.q_proj", "mlp.up_proj")
               if not (i == 0 and p == "mlp.up_proj")]
    for strategy in ("atp", "owl", "alphapruning"):
        alloc = allocate(model, strategy, 0.6, calib=calib, beta=0.05, targets=targets)
        assert len(set(alloc.sizes)) == 2 and alloc.mean() == pytest.approx(0.6, abs=1e-12)
    alloc = allocate(model, "atp", 0.6, beta=0.05, targets=targets)
    assert [b - a for a, b in zip(alloc.rates, alloc.rates[1:])] == pytest.approx([0.05] * 4)


def test_owl_prunes_blocks_with_more_outliers_less(stories):
    model, _, calib = stories
    alloc = allocate(model, "owl", 0.7, calib=calib)
    lods = alloc.params["outlier_ratio"]
    order = sorted(range(5), key=lambda i: lods[i])
    assert [alloc.rates[i] for i in order] == sorted(alloc.rates, reverse=True)
    assert max(alloc.rates) - min(alloc.rates) == pytest.approx(2 * 0.08)  # the rates span 2 lambda


def test_nm_allocation_is_a_per_block_n_of_m(stories):
    model, _, calib = stories
    alloc = allocate(model, "atp", 0.5, pattern="2:4", beta=0.1)
    # rates .3 .4 .5 .6 .7 -> keep 2.8 2.4 2.0 1.6 1.2 of 4 -> floors 2 2 2 1 1, the two largest remainders +1
    assert alloc.patterns == ["3:4", "2:4", "2:4", "2:4", "1:4"]
    assert alloc.mean() == pytest.approx(0.5)
    assert Allocation("atp", 0.5, [0.5] * 2, "unstructured").patterns == ["unstructured"] * 2


def test_bad_allocation_input_is_a_clear_error(stories):
    model, _, calib = stories
    cases = [(dict(strategy="best"), "unknown allocation 'best'; choose from uniform, atp, owl, alphapruning"),
             (dict(strategy="atp"), "atp needs a beta"),
             (dict(strategy="owl"), "owl needs calibration token ids"),
             (dict(strategy="uniform", sparsity=1.0), "target sparsity must be in (0, 1), got 1.0"),
             (dict(strategy="owl", calib=calib, lam=1.5), "OWL lambda must be in [0, 1), got 1.5"),
             (dict(strategy="alphapruning", eps=-0.1), "AlphaPruning eps must be in [0, 1), got -0.1"),
             (dict(strategy="alphapruning", sparsity=0.9, eps=0.5), "outside [0, 1)")]
    for kw, message in cases:
        kw = {"sparsity": 0.7} | kw
        with pytest.raises(AllocationError) as e:
            allocate(model, kw.pop("strategy"), kw.pop("sparsity"), **kw)
        assert message in str(e.value), (kw, str(e.value))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_block_rates_reach_the_masks(stories_dir, stories, method):
    model, _, calib = load_model(stories_dir)[0], None, stories[2]
    alloc = allocate(model, "atp", 0.6, beta=0.1)
    res = prune(model, method, "unstructured", 0.6, calib=calib, allocation=alloc, progress=False)
    assert res.allocation["rates"] == pytest.approx(alloc.rates, abs=1e-6)
    for name, mask in res.masks.items():
        block = int(name.split(".")[2])
        assert 1 - mask.float().mean().item() == pytest.approx(alloc.rates[block], abs=0.02), name
    total = sum(m.numel() for m in res.masks.values())
    assert res.to_dict()["achieved_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert total == sum(alloc.sizes)


def test_mixed_nm_masks_follow_each_blocks_pattern(stories_dir, stories):
    model = load_model(stories_dir)[0]
    alloc = allocate(model, "atp", 0.5, pattern="2:4", beta=0.1)
    res = prune(model, "wanda", "2:4", calib=stories[2], allocation=alloc, progress=False)
    for name, mask in res.masks.items():
        n, m = map(int, res.patterns[name].split(":"))
        assert res.patterns[name] == alloc.patterns[int(name.split(".")[2])]
        validate_nm(mask, n, m, name)


def test_a_block_at_zero_stays_dense(stories_dir, stories):
    model = load_model(stories_dir)[0]
    alloc = allocate(model, "atp", 0.3, beta=0.15)  # rates 0, .15, .3, .45, .6
    assert alloc.rates[0] == pytest.approx(0.0, abs=1e-12)
    alloc.rates[0] = 0.0
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    res = prune(model, "wanda", "unstructured", 0.3, calib=stories[2], allocation=alloc, progress=False)
    assert not any(n.startswith("model.layers.0.") for n in res.masks)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before)


def test_table_and_plot(stories, tmp_path):
    model, _, calib = stories
    allocs = [allocate(model, "atp", 0.7, beta=0.05), allocate(model, "uniform", 0.7)]
    table = allocs[0].table()
    assert "beta 0.0500" in table and "parameter-weighted mean 0.7000 (target 0.7)" in table
    assert len(table.splitlines()) == 7 and math.isclose(float(table.splitlines()[1].split()[-1]), 0.6)
    plot_rates(allocs, tmp_path / "rates.png")
    assert (tmp_path / "rates.png").read_bytes()[:4] == b"\x89PNG"
