"""Per-matrix checks of the three methods on real activations (stories260K, layer inputs from TinyStories)."""
import pytest
import torch
from torch import nn

from sparse_runtime.errors import ShapeError
from sparse_runtime.format.masks import sparsity, validate_nm
from sparse_runtime.models.sources import load_model
from sparse_runtime.prune import Hessian, InputNorms, magnitude_mask, sparsegpt_prune, wanda_mask
from sparse_runtime.prune.sparsegpt import refit_masked

from conftest import TEXT
from helpers import reconstruction_error


@pytest.fixture(scope="module")
def linear_inputs(stories_dir):
    """{linear name: (weight, inputs [tokens, in])} for every linear of the dense stories260K."""
    model, tok = load_model(stories_dir)
    ids = tok((TEXT / "tinystories_valid_head.txt").read_text(), return_tensors="pt").input_ids[0][:1024]
    acts = {}
    linears = {n: m for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: acts.update({n: a[0].reshape(-1, a[0].shape[-1])}))
             for n, m in linears.items()]
    with torch.no_grad():
        model(input_ids=ids.view(8, 128))
    for h in hooks:
        h.remove()
    return {n: (m.weight.detach().clone(), acts[n]) for n, m in linears.items()}


def _stats(cls, x):
    s = cls(x.shape[1], "cpu")
    for chunk in x.split(256):
        s.add(chunk)
    return s


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "unstructured"])
def test_reconstruction_error_sparsegpt_below_wanda_below_magnitude(linear_inputs, pattern):
    checked = 0
    for name, (w, x) in linear_inputs.items():
        if pattern == "4:8" and w.shape[1] % 8:
            continue
        norms, hess = _stats(InputNorms, x), _stats(Hessian, x)
        m_mag = magnitude_mask(w, pattern, per="row")
        m_wanda = wanda_mask(w, norms.sq, pattern)
        w_sgpt, m_sgpt = sparsegpt_prune(w, hess.H, pattern)
        for m in (m_mag, m_wanda, m_sgpt):
            if pattern == "unstructured":
                assert abs(sparsity(m) - 0.5) < 0.01
            else:
                validate_nm(m, *map(int, pattern.split(":")), name=name)
        assert torch.equal(w_sgpt != 0, m_sgpt & (w_sgpt != 0)) and not w_sgpt[~m_sgpt].any()
        e = [reconstruction_error(w, w * m_mag, x), reconstruction_error(w, w * m_wanda, x),
             reconstruction_error(w, w_sgpt, x)]
        assert e[2] < e[1] < e[0], (name, pattern, e)
        checked += 1
    assert checked >= 10


def test_hessian_is_two_over_n_sum_xxT():
    x = torch.randn(50, 6)
    h = _stats(Hessian, x)
    assert h.n == 50 and torch.allclose(h.H, 2 / 50 * x.T @ x, atol=1e-5)
    assert torch.allclose(_stats(InputNorms, x).sq, x.pow(2).sum(0))


def test_hessian_weighs_each_windows_first_token_by_first_weight():
    """Windows [b, t, in]: the first token of each counts first_weight times (float64 reference, two adds of
    different sizes); with weight 1 every token counts once; flat tokens have no first token to weigh."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 7, 5, generator=g), torch.randn(2, 7, 5, generator=g)]
    h = Hessian(5, "cpu", first_weight=4.0)
    c = torch.ones(7, dtype=torch.float64)
    c[0] = 4
    ref = sum(torch.einsum("bt,bti,btj->ij", c.expand(x.shape[:2]), x.double(), x.double()) for x in xs)
    for x in xs:
        h.add(x)
    assert h.n == 5 * (6 + 4) and torch.allclose(h.H.double(), 2 * ref / h.n, rtol=1e-5, atol=1e-6)
    plain = Hessian(5, "cpu")
    for x in xs:
        plain.add(x)
    assert torch.allclose(plain.H, _stats(Hessian, torch.cat(xs).reshape(-1, 5)).H)
    with pytest.raises(ShapeError, match=r"needs inputs as windows \[windows, tokens, in\], got \(21, 5\)"):
        h.add(xs[0].reshape(-1, 5))
    norms = InputNorms(5, "cpu")
    norms.add(xs[0])
    assert torch.allclose(norms.sq, xs[0].pow(2).sum((0, 1)))


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_sparsegpt_with_identity_hessian_is_magnitude(pattern):
    # H = I: no correlations, so no compensating updates; the choice reduces to |w|
    w = torch.randn(16, 64)
    w_hat, mask = sparsegpt_prune(w, torch.eye(64), pattern, blocksize=32)
    assert torch.equal(mask, magnitude_mask(w, pattern))
    assert torch.allclose(w_hat, w * mask)


def test_sparsegpt_dead_inputs_and_options():
    w, x = torch.randn(8, 16), torch.randn(40, 16)
    x[:, 3] = 0  # an input that is never active
    w_hat, mask = sparsegpt_prune(w, _stats(Hessian, x).H, "2:4")
    assert not w_hat[:, 3].any()
    validate_nm(mask, 2, 4)
    w_bf16, _ = sparsegpt_prune(w.bfloat16(), _stats(Hessian, x).H, "2:4")
    assert w_bf16.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="blocksize 6 must be a multiple of the group size 4"):
        sparsegpt_prune(w, torch.eye(16), "2:4", blocksize=6)
    _, m = sparsegpt_prune(w, _stats(Hessian, x).H, "unstructured", sparsity=0.75, blocksize=8)
    assert sparsity(m) == 0.75


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_sparsegpt_refit_keeps_the_mask_and_lowers_every_reconstruction_error(linear_inputs, pattern):
    for name, (w, x) in linear_inputs.items():
        H = _stats(Hessian, x).H
        w0, m0 = sparsegpt_prune(w, H, pattern)
        w1, m1 = sparsegpt_prune(w, H, pattern, refit=20)
        assert torch.equal(m0, m1) and not w1[~m1].any(), name
        e0, e1 = reconstruction_error(w, w0, x), reconstruction_error(w, w1, x)
        assert e1 < 0.99 * e0, (name, e0, e1)


@pytest.mark.parametrize("refit", [-1, 2.5, True])
def test_a_bad_refit_is_a_clear_error(refit):
    with pytest.raises(ValueError, match="refit takes a number of conjugate-gradient steps >= 0"):
        sparsegpt_prune(torch.randn(4, 8), torch.eye(8), "2:4", refit=refit)


def test_refit_reaches_the_least_squares_optimum_on_the_mask():
    torch.manual_seed(0)
    x = torch.randn(300, 24) @ torch.randn(24, 24)  # correlated inputs: SparseGPT's frozen columns are not optimal
    H = 2 / 300 * x.T @ x + 0.01 * torch.eye(24)
    w = torch.randn(5, 24)
    w_hat, keep = sparsegpt_prune(w, H, "2:4", damp=0)
    refit = refit_masked(w, H, keep, w_hat, steps=24)  # CG is exact after as many steps as unknowns
    for r in range(5):  # the optimum of (v - w) H (v - w)^T over v supported on the row's kept entries
        k = keep[r]
        Hd = H.double()
        best = torch.linalg.solve(Hd[k][:, k], (w[r].double() @ Hd)[k])
        assert torch.allclose(refit[r, k].double(), best, rtol=1e-3, atol=1e-4)
        assert not refit[r, ~k].any()
    # a start that is already optimal stays put (no row gets worse)
    again = refit_masked(w, H, keep, refit, steps=5)
    err = lambda v: (((v - w) @ H) * (v - w)).sum(1)  # noqa: E731
    assert (err(again) <= err(refit) * (1 + 1e-5)).all()


def test_wanda_with_equal_norms_is_per_row_magnitude():
    w = torch.randn(8, 32)
    assert torch.equal(wanda_mask(w, torch.ones(32), "unstructured", 0.5), magnitude_mask(w, "unstructured", per="row"))
    assert torch.equal(wanda_mask(w, torch.full((32,), 3.0), "2:4"), magnitude_mask(w, "2:4"))
