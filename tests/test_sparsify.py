import copy

import pytest
import torch
from torch import nn

from sparse_runtime import SparseLinear, sparsify
from sparse_runtime.errors import ShapeError
from sparse_runtime.format.masks import nm_mask
from sparse_runtime.format.quant import QuantScheme, absmax_scales, fake_quantize

from helpers import masked_dense_copy, tiny_model


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma", "bert"])
def test_sparsify_families_match_masked_dense(family):
    model = tiny_model(family)
    original = copy.deepcopy(model)
    report = sparsify(model, backend="reference")  # the format is exact: logits bit for bit
    assert report.replaced and all(isinstance(model.get_submodule(r.name), SparseLinear) for r in report.replaced)
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if "lm_head" not in n)
    assert report.sparse_bytes < report.dense_bytes and report.saved_bytes > 0
    dense = masked_dense_copy(original, model)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        out, ref = model(ids), dense(ids)
    key = "logits" if hasattr(out, "logits") else "last_hidden_state"
    assert torch.equal(out[key], ref[key])


def test_lm_head_ignored_by_default_and_report_text():
    model = tiny_model("llama")
    report = sparsify(model)
    assert isinstance(model.lm_head, nn.Linear)
    assert ("lm_head", "ignored") in report.skipped
    assert "replaced 14 linear layers" in str(report)
    assert report.to_dict()["saved_bytes"] == report.saved_bytes


def test_targets_and_masks():
    model = tiny_model("llama")
    report = sparsify(model, targets=["q_proj", "model.layers.1.mlp.*"])
    assert sorted(r.name for r in report.replaced) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj"]
    model = tiny_model("llama")
    w = model.model.layers[0].self_attn.k_proj.weight
    mask = nm_mask(torch.randn_like(w))
    report = sparsify(model, masks={"model.layers.0.self_attn.k_proj": mask})
    assert [r.name for r in report.replaced] == ["model.layers.0.self_attn.k_proj"]
    assert torch.equal(model.model.layers[0].self_attn.k_proj.dense_weight(), w * mask)


def test_bad_masks_and_names():
    model = tiny_model("llama")
    with pytest.raises(KeyError, match="not a module"):
        sparsify(model, masks={"model.nope": torch.ones(2, 4)})
    with pytest.raises(TypeError, match="not an nn.Linear"):
        sparsify(model, masks={"model.norm": torch.ones(2, 4)})


def test_indivisible_in_features_skipped_by_default_raised_when_explicit(stories_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_dir)
    report = sparsify(model, pattern="4:8")  # down_proj has in_features 172 = 8*21 + 4
    skipped = dict(report.skipped)
    assert "in_features=172" in skipped["model.layers.0.mlp.down_proj"]
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    with pytest.raises(ShapeError, match="in_features=172"):
        sparsify(model, targets=["down_proj"], pattern="4:8")


def test_sparsifying_tied_lm_head_unties_config():
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    sparsify(model, targets=["lm_head"], ignore=())
    assert model.config.tie_word_embeddings is False
    assert isinstance(model.lm_head, SparseLinear)


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_quantized_sparsify_keeps_front_end_fake_quantized_weights_exactly(scheme):
    """The front-end fake-quantizes each pruned weight under its scales and hands both over: the stored layer
    dequantizes to exactly that weight. Layers without scales get absmax scales."""
    quant = QuantScheme.parse(scheme, 32 if scheme == "int4" else None)
    model = tiny_model("llama")
    layers = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "up_proj"))}
    masks, scales, want = {}, {}, {}
    for name, lin in layers.items():
        w = lin.weight.detach() * 1.5  # not absmax-scaled: scales from elsewhere must be honoured
        masks[name] = nm_mask(w.abs())
        scales[name] = absmax_scales(w, quant, masks[name])
        lin.weight.data = want[name] = fake_quantize(w, quant, scales[name], masks[name])
    gate_w, gate_mask = model.model.layers[0].mlp.gate_proj.weight.detach().clone(), nm_mask(torch.rand(128, 64))
    report = sparsify(model, {**masks, "model.layers.0.mlp.gate_proj": gate_mask}, quant=quant, scales=scales)
    assert {r.quant for r in report.replaced} == {scheme} and len(report.replaced) == len(layers) + 1
    for name in layers:
        layer = model.get_submodule(name)
        assert layer.quant == quant and torch.equal(layer.dense_weight(), want[name])
        assert torch.equal(layer.weight_scales, scales[name])
    gate = model.model.layers[0].mlp.gate_proj
    assert torch.equal(gate.weight_scales, absmax_scales(gate_w, quant, gate_mask))
    assert torch.equal(gate.dense_weight(), fake_quantize(gate_w, quant, mask=gate_mask))


def test_quantized_sparsify_bad_scales():
    model = tiny_model("llama")
    name = "model.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match="scales given without a quantization scheme"):
        sparsify(model, scales={name: torch.ones(64, 1)})
    int8 = QuantScheme.parse("int8")
    with pytest.raises(KeyError, match="scales names 'model.nope'"):
        sparsify(model, quant=int8, scales={"model.nope": torch.ones(64, 1)})
    with pytest.raises(ValueError, match="scales name 'lm_head', which is not among the layers replaced"):
        sparsify(model, quant=int8, scales={"lm_head": torch.ones(128, 1)})
    with pytest.raises(ShapeError, match=r"q_proj.scales: shape \(64, 2\), expected \(64, 1\)"):
        sparsify(model, quant=int8, scales={name: torch.ones(64, 2)})


def test_quantized_sparsify_skips_layers_the_groups_do_not_fit(stories_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_dir)
    report = sparsify(model, quant=QuantScheme.parse("int4", 32))
    assert dict(report.skipped)["model.layers.0.mlp.down_proj"] == \
        "in_features=172 is not divisible by 32 (2:4, int4 groups of 32)"
    with pytest.raises(ShapeError, match="in_features=172 is not divisible by 32"):
        sparsify(model, targets=["down_proj"], quant=QuantScheme.parse("int4", 32))
