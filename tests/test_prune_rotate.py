"""Learning DenoiseRotator rotations: importance in rotated coordinates, the objectives, the optimiser, and pruning
with rotations end to end on stories260K."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TEXT
from sparse_runtime.format.masks import pattern_mask
from sparse_runtime.prune import RotateOptions, calibration_windows, prune
from sparse_runtime.prune import Hessian, InputNorms, magnitude_mask, wanda_mask
from sparse_runtime.prune.rotate import (LayerInputs, _diag_blocks, _dropped, _Importance, _inverse, _Objective,
                                         _rotated_diag, _saliency_diag, learn_rotation, learning_dtype)
from sparse_runtime.prune.sparsegpt import damped_inverse, saliency, sparsegpt_prune
from sparse_runtime.prune.wanda import scores as wanda_scores
from sparse_runtime.models.residual_rotation import BUFFER, UnsupportedArchitecture, fold_norms, head_geometry


def orth(*shape, seed=0):
    return torch.linalg.qr(torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))[0]


def spd(n, seed=0):
    x = torch.randn(4 * n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.T @ x / n


@pytest.mark.parametrize("k", [1, 3])
def test_rotated_diagonal_matches_the_dense_product(k):
    a, q = spd(24), orth(k, 24 // k, 24 // k, seed=1)
    dense = torch.block_diag(*q.unbind(0))
    torch.testing.assert_close(_rotated_diag(_diag_blocks(a, k), q), torch.diag(dense.T @ a @ dense))


@pytest.mark.parametrize("k", [1, 3])
def test_sparsegpt_saliency_is_the_cost_of_pruning_a_column_with_only_later_columns_updated(k):
    a, q = spd(24), orth(k, 24 // k, 24 // k, seed=1)
    r = torch.block_diag(*q.unbind(0))
    rotated = r.T @ a @ r
    later_only = torch.stack([torch.linalg.inv(rotated[j:, j:])[0, 0] for j in range(24)])
    torch.testing.assert_close(_saliency_diag(torch.linalg.inv(a), q), later_only)


def test_sparsegpt_saliency_ranks_as_sparsegpt_prunes():
    # the first group of four is chosen before any update: its two lowest w^2 / U_jj^2 are what SparseGPT drops
    h = spd(16, seed=2).float()
    w = torch.randn(32, 16, generator=torch.Generator().manual_seed(3))
    _, keep = sparsegpt_prune(w, h, "2:4", damp=0.01)
    score = saliency(w, _saliency_diag(_inverse(h, 0.01), None))
    torch.testing.assert_close(~keep[:, :4], ~pattern_mask(score[:, :4], "2:4", per="row"), rtol=0, atol=0)


def test_nm_objective_is_the_importance_the_mask_drops():
    s = torch.rand(6, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for pattern, sparsity in (("2:4", 0.5), ("4:8", 0.5), ("unstructured", 0.25)):
        keep = pattern_mask(s, pattern, sparsity, per="row")
        dropped = (s * ~keep).sum(1)
        obj = _Objective("nm", pattern, sparsity)
        unit = s.sum() / s.shape[0]
        torch.testing.assert_close(obj("q", s), dropped.sum() / unit)
        # the unit is fixed at the first call: doubling every score doubles the objective (a fraction would not)
        torch.testing.assert_close(obj("q", 2 * s), 2 * dropped.sum() / unit)
        torch.testing.assert_close(obj("down", 3 * s), 3 * dropped.sum() / (3 * unit))
    torch.testing.assert_close(_dropped(s, 2, 4), _dropped(s, 2, 4).new_tensor(
        [g.reshape(-1, 4).sort(-1).values[:, :2].sum().item() for g in s]))


def test_entropy_is_smallest_when_importance_is_concentrated():
    flat, peaked = torch.ones(3, 8), torch.eye(8)[:3] + 1e-9
    obj = _Objective("entropy", "2:4", 0.5)
    assert obj("q", flat) == pytest.approx(3 * torch.log(torch.tensor(8.0)).item(), rel=1e-6)
    assert obj("q", peaked) < 1e-6 < obj("q", flat)


@pytest.fixture()
def layer(stories_dir):
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    layer = model.model.layers[1]
    fold_norms(layer)
    return layer


def layer_inputs(layer, seed=0):
    d, inner = layer.mlp.gate_proj.in_features, layer.mlp.down_proj.in_features
    return LayerInputs(spd(d, seed).float(), spd(d, seed + 1).float(), spd(d, seed + 2).float(),
                       spd(inner, seed + 3).float())


@pytest.mark.parametrize("method,objective,blocks", [("magnitude", "nm", 1), ("wanda", "entropy", 2),
                                                     ("sparsegpt", "nm", 4), ("wanda", "nm", 1)])
def test_learned_rotations_are_orthogonal_and_lower_the_objective(layer, method, objective, blocks):
    inputs = None if method == "magnitude" else layer_inputs(layer)
    q1, r2, record = learn_rotation(layer, inputs, method, "2:4", 0.5, RotateOptions(objective, 15, blocks),
                                    progress=False)
    d, hd = layer.mlp.gate_proj.in_features, layer.self_attn.head_dim
    assert q1.shape == ((d, d) if blocks == 1 else (blocks, d // blocks, d // blocks))
    assert r2.shape == (layer.self_attn.v_proj.out_features // hd, hd, hd)
    for q in (q1, r2):
        eye = torch.eye(q.shape[-1]).expand_as(q)
        torch.testing.assert_close(q.transpose(-1, -2) @ q, eye, atol=1e-5, rtol=0)
    assert len(record["history"]) == 16 and record["best"] == min(record["history"])
    assert record["best"] < 0.95 * record["initial"]


@pytest.mark.parametrize("avx512_bf16,amx,expected", [(False, False, torch.float32), (True, False, torch.bfloat16),
                                                      (False, True, torch.bfloat16)])
def test_rotations_learn_in_bf16_only_where_the_cpu_multiplies_it_natively(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert learning_dtype("cpu") == expected
    assert learning_dtype("cuda") == torch.bfloat16
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # a torch without the private probes: fp32
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert learning_dtype("cpu") == torch.float32


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16])
def test_the_learning_dtype_is_the_one_asked_for_and_recorded(layer, dtype):
    record = learn_rotation(layer, None, "magnitude", "2:4", 0.5, RotateOptions("nm", 2, dtype=dtype),
                            progress=False)[2]
    assert record["dtype"] == str(dtype or learning_dtype("cpu")).removeprefix("torch.")


def test_bad_rotate_options_are_clear_errors(layer):
    with pytest.raises(ValueError, match="unknown rotation objective"):
        RotateOptions("variance")
    with pytest.raises(ValueError, match="steps >= 0"):
        RotateOptions("nm", steps=-1)
    with pytest.raises(ValueError, match="do not divide the hidden size"):
        learn_rotation(layer, None, "magnitude", "2:4", 0.5, RotateOptions("nm", 1, blocks=3), progress=False)
    with pytest.raises(ValueError, match="needs the layer's input statistics"):
        learn_rotation(layer, None, "wanda", "2:4", 0.5, RotateOptions("nm", 1), progress=False)
    with pytest.raises(ValueError, match="unknown rotation importance 'obs'"):
        RotateOptions("nm", importance="obs")
    with pytest.raises(ValueError, match="needs the layer's input statistics"):  # magnitude has no statistics
        learn_rotation(layer, None, "magnitude", "2:4", 0.5, RotateOptions("nm", 1, importance="wanda"),
                       progress=False)


def test_magnitude_with_a_calibrated_rotation_importance_is_refused_untouched(stories_dir):
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="rotate importance 'wanda' needs calibration statistics"):
        prune(model, "magnitude", "2:4", rotate="nm", rotate_steps=1, rotate_importance="wanda", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_the_rotation_importance_at_identity_is_the_methods_own_score(layer, method):
    """Unrotated (Q = I), the importance a rotation is learned on is the square of the method's score from its own
    statistics, so it ranks weights as the method prunes them (for SparseGPT: its first group, before any update)."""
    d, inner = layer.mlp.gate_proj.in_features, layer.mlp.down_proj.in_features
    x = torch.randn(300, d, generator=torch.Generator().manual_seed(5)) * torch.linspace(0.1, 3, d)
    norms, hessian = InputNorms(d, "cpu"), Hessian(d, "cpu")
    norms.add(x)
    hessian.add(x)
    inputs = LayerInputs(hessian.H, spd(d).float(), hessian.H, spd(inner).float())
    n_heads, _, hd = head_geometry(layer)
    importance = _Importance(method, None if method == "magnitude" else inputs, 1, n_heads, hd, 0.01)
    scales = importance.scales(torch.eye(d)[None], torch.eye(hd).repeat(n_heads, 1, 1)) or {}
    w = layer.mlp.gate_proj.weight.detach().float()  # reads the MLP input
    got = importance.score(w, scales.get("mlp"))
    if method == "magnitude":
        torch.testing.assert_close(got, w.abs().pow(2))
        assert torch.equal(pattern_mask(got, "2:4"), magnitude_mask(w, "2:4"))
    elif method == "wanda":  # H = (2/n) X^T X: its diagonal is 2/n times Wanda's squared input norms
        torch.testing.assert_close(got, wanda_scores(w, norms.sq).pow(2) * 2 / 300)
        assert torch.equal(pattern_mask(got, "2:4", per="row"), wanda_mask(w, norms.sq, "2:4"))
    else:
        u = damped_inverse(hessian.H, 0.01, upper=True).inverse
        torch.testing.assert_close(got, w.pow(2) / u.diagonal().pow(2), rtol=1e-4, atol=0)
        keep = sparsegpt_prune(w, hessian.H, "2:4", damp=0.01)[1]
        assert torch.equal(pattern_mask(got[:, :4], "2:4", per="row"), keep[:, :4])


def test_rotation_importance_can_be_another_methods(layer):
    """SparseGPT pruning with rotations learned on Wanda's scores: the objective is Wanda's, not SparseGPT's."""
    inputs = layer_inputs(layer)
    run = lambda method, importance=None: learn_rotation(layer, inputs, method, "2:4", 0.5,
                                                         RotateOptions("nm", 3, importance=importance),
                                                         progress=False)[2]["history"]
    assert run("sparsegpt", "wanda") == run("wanda")
    assert run("sparsegpt", "wanda") != run("sparsegpt")


@pytest.fixture(scope="module")
def stories(stories_dir):
    tok = AutoTokenizer.from_pretrained(stories_dir)
    text = TEXT / "tinystories_valid_head.txt"
    return stories_dir, calibration_windows(tok, text, 8, 128), calibration_windows(tok, text, 8, 128, seed=1)


def perplexity_on(model, ids):
    with torch.no_grad():
        return model(ids, labels=ids).loss.exp().item()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_rotation_lowers_the_perplexity_of_2of4_pruning(stories, method):
    path, calib, held_out = stories
    ppl = {}
    for rotate in (None, "nm"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        result = prune(model, method, "2:4", calib=calib, device="cpu", progress=False, rotate=rotate,
                       rotate_steps=30)
        for name, mask in result.masks.items():  # the rotated weights are pruned exactly 2:4
            w = model.get_submodule(name).weight
            assert mask.reshape(-1, 4).sum(-1).eq(2).all() and torch.equal(w != 0, mask & (w != 0))
        ppl[rotate] = perplexity_on(model, held_out)
        if rotate:
            layers = result.rotation["layers"]
            assert len(layers) == 5 and all(r["best"] < r["initial"] for r in layers)
            if method != "magnitude":
                assert all(r["function_error"] < 1e-4 for r in layers)
            assert getattr(model.model.layers[0], BUFFER, None) is None
            assert all(getattr(layer, BUFFER) is not None for layer in model.model.layers[1:])
    assert ppl["nm"] < 0.8 * ppl[None]


def test_a_rotation_that_changes_the_function_is_refused(stories, monkeypatch):
    from sparse_runtime.prune import sequential

    path, calib, _ = stories
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    monkeypatch.setattr(sequential, "rotate_layer", lambda layer, q1, r2: None)  # forget to rotate the weights
    with pytest.raises(UnsupportedArchitecture, match="changed its output"):
        prune(model, "wanda", "2:4", calib=calib, device="cpu", progress=False, rotate="entropy", rotate_steps=2)


def test_unsupported_architectures_are_refused_before_any_work(stories):
    from helpers import tiny_model

    _, calib, _ = stories
    model = tiny_model("gemma")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedArchitecture):
        prune(model, "wanda", "2:4", calib=calib[:, :16] % 128, device="cpu", progress=False, rotate="nm")
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
