"""The layer-by-layer driver across model families, its bad-input errors, and quality orderings on stories260K."""
import copy

import pytest
import torch
import transformers
from torch import nn

from sparse_runtime import sparsify
from sparse_runtime.errors import ShapeError
from sparse_runtime.data.perplexity import perplexity
from sparse_runtime.format.masks import validate_nm
from sparse_runtime.models.sources import load_model
from sparse_runtime.prune import METHODS, UnsupportedModel, find_decoder_layers, prune
from sparse_runtime.prune.statistics import capture_inputs, run_collecting, run_layer

from conftest import TEXT
from helpers import tiny_model

FAMILIES = ["llama", "qwen2", "mistral", "gemma"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_inputs_replay_the_model(family):
    """Layer 0's captured inputs and kwargs, run through the layers one by one, give the model's hidden states."""
    model = tiny_model(family)
    ids = torch.randint(0, 128, (3, 12))
    layers, path = find_decoder_layers(model)
    inps, kwargs = capture_inputs(model, layers, path, ids, "cpu", "cpu")
    assert len(kwargs) == len(layers) and {"attention_mask", "position_embeddings"} <= set(kwargs[0])
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
        for i, layer in enumerate(layers[:-1]):
            inps = run_layer(layer, inps, kwargs[i], "cpu", "cpu")
            torch.testing.assert_close(torch.cat(inps), ref[i + 1], rtol=1e-5, atol=1e-5)


def test_statistics_forward_stops_once_every_tapped_linear_is_reached():
    """Without outputs wanted, the statistics pass stops at the last tapped linear: the same sums as hooks on a
    whole forward, and nothing after the tap runs (down_proj never, o_proj only when tapped)."""
    from sparse_runtime.prune import Hessian

    model = tiny_model("llama")
    layers, path = find_decoder_layers(model)
    inps, kwargs = capture_inputs(model, layers, path, torch.randint(0, 128, (3, 12)), "cpu", "cpu")
    layer = layers[0]
    calls = []
    spy = [m.register_forward_pre_hook(lambda mod, a, n=n: calls.append(n))
           for n, m in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj))]
    for taps, ran in (((layer.self_attn.q_proj,), set()), ((layer.self_attn.o_proj, layer.mlp.gate_proj), {"o"})):
        calls.clear()
        early = {m: Hessian(m.in_features, "cpu") for m in taps}
        full = {m: Hessian(m.in_features, "cpu") for m in taps}
        with torch.no_grad():
            assert run_collecting(layer, early, inps, kwargs[0], "cpu") == []
            assert set(calls) == ran
            outs = run_collecting(layer, full, inps, kwargs[0], "cpu", "cpu")
        assert len(outs) == len(inps) and "down" in calls
        for m in taps:
            assert early[m].n == full[m].n == 36
            torch.testing.assert_close(early[m].H, full[m].H, rtol=0, atol=0)
    for h in spy:
        h.remove()


def test_per_layer_kwargs_for_sliding_window_layers():
    """Layers of different attention types get different masks; each layer must get its own."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, use_sliding_window=True, sliding_window=4,
                                   max_window_layers=1)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 12))
    layers, path = find_decoder_layers(model)
    inps, kwargs = capture_inputs(model, layers, path, ids, "cpu", "cpu")
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
        for i, layer in enumerate(layers[:-1]):
            inps = run_layer(layer, inps, kwargs[i], "cpu", "cpu")
            torch.testing.assert_close(torch.cat(inps), ref[i + 1])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_families_prune_every_decoder_linear(family, method):
    model = tiny_model(family)
    calib = torch.randint(0, 128, (4, 16))
    extra = {"blocksize": 32} if method == "sparsegpt" else {}
    res = prune(model, method, "2:4", calib=calib, progress=False, record_errors=True, **extra)
    decoder = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    assert set(res.masks) == decoder and set(res.errors) == decoder
    for name, mask in res.masks.items():
        validate_nm(mask, 2, 4, name=name)
        assert not model.get_submodule(name).weight[~mask].any()
        assert 0 < res.errors[name] < 1
    sparse = copy.deepcopy(model)
    sparsify(sparse, masks=res.masks, pattern="2:4")
    with torch.no_grad():
        torch.testing.assert_close(sparse(calib).logits, model(calib).logits, rtol=1e-4, atol=1e-4)


def test_unsupported_model_names_what_is_missing():
    with pytest.raises(UnsupportedModel, match=r"BertModel: no decoder layers found .*model\.layers"):
        prune(tiny_model("bert"), "wanda", calib=torch.randint(0, 128, (1, 8)))
    with pytest.raises(UnsupportedModel, match="Sequential"):
        prune(nn.Sequential(nn.Linear(8, 8)), "magnitude")


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, -0.1])
def test_sparsity_outside_open_unit_interval(pattern, bad):
    for method in METHODS:
        with pytest.raises(ValueError, match="sparsity must be in \\(0, 1\\)"):
            prune(tiny_model("llama"), method, pattern, bad, calib=torch.randint(0, 128, (1, 8)))


def test_unknown_method_and_missing_calibration():
    with pytest.raises(ValueError, match="unknown pruning method 'obs'"):
        prune(tiny_model("llama"), "obs")
    with pytest.raises(ValueError, match="sparsegpt needs calibration"):
        prune(tiny_model("llama"), "sparsegpt")


@pytest.fixture(scope="module")
def stories(stories_dir):
    model, tok = load_model(stories_dir)
    ids = tok((TEXT / "tinystories_valid_head.txt").read_text(), return_tensors="pt").input_ids[0]
    return model, ids[:2048].view(16, 128), ids[4096:]  # calibration and held-out evaluation tokens


def test_stories_4_8_skips_172_wide_layers_by_default_and_errors_when_named(stories):
    model, calib, _ = stories
    for method in METHODS:
        res = prune(copy.deepcopy(model), method, "4:8", calib=calib[:2], progress=False)
        assert len(res.masks) == 30 and len(res.skipped) == 5
        assert all("down_proj" in n and "in_features=172 is not divisible by 8" in why for n, why in res.skipped)
        with pytest.raises(ShapeError, match=r"model.layers.0.mlp.down_proj: in_features=172"):
            prune(copy.deepcopy(model), method, "4:8", calib=calib[:2], targets=["down_proj"], progress=False)


def test_stories_quality_orderings(stories):
    """SparseGPT <= Wanda < magnitude at 2:4; 4:8 beats 2:4; 50% unstructured beats 4:8 (same layers:
    the 172-wide down_proj cannot take 4:8, so it stays dense everywhere)."""
    model, calib, held_out = stories
    dense = perplexity(model, held_out, seqlen=128, progress=False).ppl
    ppl = {}
    for pattern in ["2:4", "4:8", "unstructured"]:
        for method in METHODS:
            m = copy.deepcopy(model)
            prune(m, method, pattern, calib=calib, ignore=("lm_head", "down_proj"), progress=False)
            ppl[method, pattern] = perplexity(m, held_out, seqlen=128, progress=False).ppl
    assert dense < ppl["sparsegpt", "2:4"] <= ppl["wanda", "2:4"] < ppl["magnitude", "2:4"], ppl
    assert ppl["wanda", "2:4"] < 0.8 * ppl["magnitude", "2:4"], ppl
    for method in METHODS:
        assert ppl[method, "unstructured"] < ppl[method, "4:8"] < ppl[method, "2:4"], (method, ppl)


def test_sparsegpt_refit_through_prune_lowers_the_errors_and_the_held_out_perplexity(stories):
    model, calib, held_out = stories
    runs = {}
    for refit in (0, 25):
        m = copy.deepcopy(model)
        res = prune(m, "sparsegpt", "2:4", calib=calib, ignore=("lm_head", "down_proj"), progress=False,
                    record_errors=True, refit=refit)
        runs[refit] = res, perplexity(m, held_out, seqlen=128, progress=False).ppl
    (plain, ppl0), (refit, ppl1) = runs[0], runs[25]
    for name, mask in refit.masks.items():
        validate_nm(mask, 2, 4, name=name)
    mean = lambda r: sum(r.errors.values()) / len(r.errors)  # noqa: E731
    assert mean(refit) < 0.95 * mean(plain), (mean(plain), mean(refit))
    assert ppl1 < ppl0, (ppl0, ppl1)


def test_a_bad_refit_is_refused_before_any_weight_changes(stories):
    model, calib, _ = stories
    m = copy.deepcopy(model)
    with pytest.raises(ValueError, match="refit takes a number of conjugate-gradient steps >= 0, not -1"):
        prune(m, "sparsegpt", "2:4", calib=calib, refit=-1, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m.state_dict().values()))


def test_true_sequential_and_offload_options(stories):
    model, calib, _ = stories
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = prune(a, "sparsegpt", "2:4", calib=calib[:4], progress=False)
    rb = prune(b, "sparsegpt", "2:4", calib=calib[:4], progress=False, true_sequential=False, offload=True)
    # layer 0's q/k/v see the same inputs either way; later groups see pruned inputs only when true-sequential
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(ra.masks[name], rb.masks[name])
    assert not torch.equal(a.model.layers[0].mlp.down_proj.weight, b.model.layers[0].mlp.down_proj.weight)
    assert ra.to_dict()["achieved_sparsity"] == 0.5 and ra.nsamples == 4 and ra.seqlen == 128


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_dense_statistics_prune_from_the_dense_models_statistics(stories, method):
    """The statistics collected in one pass are the unpruned model's (checked against hooks on one plain forward
    of the dense model); pruning from them needs no forward and gives the same weights on a fresh copy."""
    from sparse_runtime.prune import (Hessian, InputNorms, PruneConfig, collect_statistics, prune_from_statistics,
                                      sparsegpt_prune, wanda_mask)

    model, calib, _ = stories
    calib = calib[:3]
    ref = copy.deepcopy(model)
    linears = {n: m for n, m in ref.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    stats = {n: (InputNorms if method == "wanda" else Hessian)(m.in_features, "cpu") for n, m in linears.items()}
    hooks = [m.register_forward_hook(lambda mod, a, out, s=stats[n]: s.add(a[0].reshape(-1, a[0].shape[-1])))
             for n, m in linears.items()]
    with torch.no_grad():
        for j in range(calib.shape[0]):
            ref(input_ids=calib[j:j + 1], use_cache=False)
    for h in hooks:
        h.remove()
    config = PruneConfig(method, "unstructured", 0.6, progress=False)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    filled = collect_statistics(a, calib, config)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), model.state_dict().values()))
    ra = prune_from_statistics(a, config, filled)
    assert set(filled.stats) == set(linears) and set(ra.masks) == set(linears)
    assert (filled.nsamples, filled.seqlen) == (ra.nsamples, ra.seqlen) == (3, 128)
    for n, m in linears.items():
        if method == "wanda":
            want = m.weight * wanda_mask(m.weight, stats[n].sq, "unstructured", 0.6)
        else:
            want = sparsegpt_prune(m.weight, stats[n].H, "unstructured", 0.6)[0]
        torch.testing.assert_close(a.get_submodule(n).weight, want, rtol=1e-4, atol=1e-5, msg=n)

    def no_forward(*args, **kw):
        raise AssertionError("pruning from collected statistics must not run the model")

    for layer in find_decoder_layers(b)[0]:
        layer.forward = no_forward
    rb = prune_from_statistics(b, config, filled)
    for layer in find_decoder_layers(b)[0]:
        del layer.forward
    assert all(torch.equal(ra.masks[n], rb.masks[n]) for n in ra.masks)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    sequential = copy.deepcopy(model)  # and it is not what a sequential prune does after the first block
    prune(sequential, config, calib=calib)
    assert not torch.equal(sequential.model.layers[3].mlp.up_proj.weight, a.model.layers[3].mlp.up_proj.weight)
    for bad in (config.replace(record_errors=True), config.replace(rotate="nm")):
        with pytest.raises(ValueError, match="cannot be combined"):
            collect_statistics(copy.deepcopy(model), calib, bad)
        with pytest.raises(ValueError, match="cannot be combined"):
            prune_from_statistics(copy.deepcopy(model), bad, filled)
    partial = copy.copy(filled)  # statistics of another model's linears
    partial.stats = {n: st for n, st in filled.stats.items() if "layers.0." in n}
    with pytest.raises(ValueError, match="the dense statistics have none for model.layers.1"):
        prune_from_statistics(copy.deepcopy(model), config, partial)
    other = "sparsegpt" if method == "wanda" else "wanda"
    with pytest.raises(ValueError, match=f"{other} prunes from its own calibration statistics"):
        prune_from_statistics(copy.deepcopy(model), config.replace(method=other), filled)
    with pytest.raises(ValueError, match="magnitude prunes from the weights alone: it has no statistics"):
        collect_statistics(copy.deepcopy(model), calib, config.replace(method="magnitude"))


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("offload", [False, True])
def test_gpu_peak_memory_is_one_layer_not_the_model(method, offload):
    # 12 layers of ~13M parameters stay on the CPU; only one visits the GPU at a time.
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                                   num_attention_heads=8, num_key_value_heads=8, vocab_size=256,
                                   max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg).eval()
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    model_bytes = layer_bytes * cfg.num_hidden_layers
    calib = torch.randint(0, cfg.vocab_size, (8, 256))
    act_bytes = 2 * calib.numel() * cfg.hidden_size * 4  # inputs + outputs of a layer, fp32
    hessian_bytes = cfg.intermediate_size ** 2 * 4
    torch.cuda.reset_peak_memory_stats()
    res = prune(model, method, "2:4", calib=calib, device="cuda", offload=offload, progress=False)
    assert all(p.device.type == "cpu" for p in model.parameters())  # every layer went back
    budget = 2 * layer_bytes + (0 if offload else act_bytes) + 2 * hessian_bytes + (64 << 20)
    assert res.peak_device_bytes < min(budget, model_bytes / 2), (res.peak_device_bytes, budget, model_bytes)
    for name, mask in res.masks.items():
        validate_nm(mask, 2, 4, name)
