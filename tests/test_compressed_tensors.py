"""compressed-tensors 2:4 import/export (sparse-24-bitmask, its fp8 float-quantized variant, marlin-24), against
compressed-tensors 0.14.0.1 itself: its own quantizer and compressors write the checkpoints we load, and its
decompressor (or, for marlin-24, which has none, its compressor) checks what we write."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparse_runtime import SparseLinear, load_model, load_pretrained, save_pretrained, sparsify
from sparse_runtime.cli import main
from sparse_runtime.models.compressed_tensors import export_compressed_tensors, load_compressed_tensors
from sparse_runtime.errors import CheckpointError
from sparse_runtime.format.quant import QuantScheme

from ct_helpers import ct_quantize, import_ct, prune_24_dense, small_llama, weight_only, write_ct_checkpoint

IDS = torch.tensor([[1, 403, 407, 261, 378, 10, 300, 95, 5, 42]])


@pytest.fixture(scope="module")
def pruned(stories_dir):
    """stories260K with every linear but lm_head magnitude-pruned to 2:4, as dense nn.Linear layers."""
    return prune_24_dense(AutoModelForCausalLM.from_pretrained(stories_dir).eval())


@pytest.fixture(scope="module")
def ct_ckpt(pruned, stories_dir, tmp_path_factory):
    return write_ct_checkpoint(pruned, tmp_path_factory.mktemp("ct") / "ckpt",
                               tokenizer=AutoTokenizer.from_pretrained(stories_dir))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("shards", [1, 3])
def test_ct_written_checkpoint_loads_with_identical_logits(pruned, ct_ckpt, tmp_path, shards):
    path = ct_ckpt if shards == 1 else write_ct_checkpoint(pruned, tmp_path / "sharded", shards=shards)
    assert shards == 1 or (path / "model.safetensors.index.json").exists()
    model = load_pretrained(path, backend="reference")
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 35 and all(m.pattern == "2:4" for m in layers)
    assert torch.equal(_logits(model), _logits(pruned))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(model.config, "quantization_config", None) is None  # now a sparse_runtime model


def test_load_model_and_auto_backend(pruned, ct_ckpt):
    model, tok = load_model(ct_ckpt)  # auto: the cpu kernels where built (fp32 sums in another order), else decompressed
    torch.testing.assert_close(_logits(model), _logits(pruned), rtol=1e-5, atol=1e-5)
    exact, _ = load_model(ct_ckpt, backend="decompressed")  # the dense weight itself: the same numbers, bit for bit
    assert torch.equal(_logits(exact), _logits(pruned))
    assert tok("Once upon").input_ids


def test_export_is_read_back_bit_exactly_by_compressed_tensors(stories_dir, tmp_path):
    import_ct()
    from compressed_tensors.compressors import ModelCompressor

    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    sparsify(model, backend="reference")  # compared bit for bit with compressed-tensors' dense decompression
    out = export_compressed_tensors(model, tmp_path / "export")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["sparsity_config"]["format"] == "sparse-24-bitmask"
    compressor = ModelCompressor.from_pretrained(str(out))
    dense = dict(compressor.sparsity_compressor.decompress(str(out)))
    sparse = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert len(sparse) == 35
    for name, mod in sparse.items():
        assert torch.equal(dense[f"{name}.weight"], mod.dense_weight()), name
    assert torch.equal(dense["model.norm.weight"], model.model.norm.weight)
    # compressed-tensors' full model decompression gives the same logits as the sparse model
    target = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    compressor.decompress(str(out), target)
    assert torch.equal(_logits(target), _logits(model))
    # and the export loads back here
    assert torch.equal(_logits(load_pretrained(out, backend="reference")), _logits(model))


def test_cli_export(stories_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    sparsify(model)
    ckpt = save_pretrained(model, tmp_path / "ckpt")
    assert main(["export", "--format", "compressed-tensors", "--model", str(ckpt), "--out",
                 str(tmp_path / "ct")]) == 0
    assert torch.equal(_logits(load_pretrained(tmp_path / "ct")), _logits(model))
    assert (tmp_path / "ct" / "tokenizer.json").exists()


def test_export_refuses_non_24_and_rotation(tmp_path):
    from helpers import tiny_model

    model = tiny_model("llama")
    sparsify(model, targets=["q_proj"], pattern="4:8")
    with pytest.raises(CheckpointError, match=r"q_proj: pattern 4:8"):
        export_compressed_tensors(model, tmp_path / "a")
    model = tiny_model("llama")
    sparsify(model)
    q, _ = torch.linalg.qr(torch.randn(64, 64))
    model.model.layers[0].mlp.up_proj.set_rotation(q)
    with pytest.raises(CheckpointError, match=r"up_proj: has a rotation"):
        export_compressed_tensors(model, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    model = tiny_model("llama")
    sparsify(model, quant=QuantScheme.parse("int4", 32))
    with pytest.raises(CheckpointError, match=r"q_proj: int4 values with group_size=32 have no compressed-tensors "
                                              r"format: marlin-24 takes int4/int8 in groups of 128 or per row"):
        export_compressed_tensors(model, tmp_path / "c")
    model = tiny_model("llama")
    sparsify(model, quant=QuantScheme("int4"))  # per row: fits every K, but k_proj has 32 outputs
    with pytest.raises(CheckpointError, match=r"layers.0.self_attn.k_proj: out_features=32 is not a multiple of 64"):
        export_compressed_tensors(model, tmp_path / "d")
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def _rewrite(src, dst, edit_tensors=None, edit_qc=None):
    """A copy of a compressed-tensors folder with its tensors and/or quantization_config edited."""
    import shutil

    shutil.copytree(src, dst)
    if edit_tensors:
        t = load_file(dst / "model.safetensors")
        edit_tensors(t)
        save_file({k: v.contiguous() for k, v in t.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if edit_qc:
        cfg = json.loads((dst / "config.json").read_text())
        edit_qc(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_non_24_mask_loads_on_reference_with_a_warning(pruned, ct_ckpt, stories_dir, tmp_path):
    from sparse_runtime.format.codec import pack_bits

    name = "model.layers.1.mlp.down_proj"
    w = AutoModelForCausalLM.from_pretrained(stories_dir).get_submodule(name).weight.detach()
    mask = torch.zeros_like(w, dtype=torch.bool)
    order = w.abs().argsort(dim=1, descending=True)
    mask.scatter_(1, order[:, : w.shape[1] // 2], True)  # 50% per row, not 2:4
    assert not (mask.view(w.shape[0], -1, 4).sum(-1) == 2).all()

    def edit(t):
        t[f"{name}.compressed"] = w[mask].reshape(w.shape[0], -1).contiguous()
        t[f"{name}.bitmask"] = pack_bits(mask)

    path = _rewrite(ct_ckpt, tmp_path / "non24", edit)
    with pytest.warns(UserWarning, match=rf"not 2:4 load as unstructured on the reference backend: {name}$"):
        model = load_pretrained(path)
    layer = model.get_submodule(name)
    assert layer.pattern == "unstructured" and layer.active_backend == "reference"
    assert model.get_submodule("model.layers.0.mlp.down_proj").pattern == "2:4"
    import copy

    ref = copy.deepcopy(pruned)
    ref.get_submodule(name).weight.data = w * mask
    # the 2:4 layers run on auto (the cpu kernels where built: fp32 sums in another order than the dense GEMM)
    torch.testing.assert_close(_logits(model), _logits(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("edit_qc, match", [
    (lambda qc: qc.update(format="pack-quantized", config_groups={"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "group_size": 128}}}),
     r"config group 'group_0': format pack-quantized is not supported"),
    (lambda qc: qc.update(format="float-quantized", config_groups={"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float"}, "format": "float-quantized"}}),
     r"config group 'group_0' quantizes model.layers.0.mlp.down_proj, but model.layers.0.mlp.down_proj.weight_"
     r"scale is missing"),
    (lambda qc: qc["sparsity_config"].update(format="sparse-bitmask"), r"sparsity format 'sparse-bitmask' is not"),
])
def test_unsupported_variants_are_refused_by_name(ct_ckpt, tmp_path, edit_qc, match):
    path = _rewrite(ct_ckpt, tmp_path / "q", edit_qc=edit_qc)
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(path)


def test_fp8_values_are_refused_by_name(ct_ckpt, tmp_path):
    name = "model.layers.0.self_attn.q_proj"

    def edit(t):
        t[f"{name}.compressed"] = t[f"{name}.compressed"].to(torch.float8_e4m3fn)

    path = _rewrite(ct_ckpt, tmp_path / "fp8", edit)
    with pytest.raises(CheckpointError, match=rf"{name}.compressed: float8_e4m3fn values without {name}.weight_scale "
                                              "are not supported"):
        load_compressed_tensors(path)


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop("model.layers.0.mlp.up_proj.bitmask"), r"up_proj lacks model.layers.0.mlp.up_proj.bitmask"),
    (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.shape", torch.tensor([[64], [172]])),
     r"tensor model.layers.0.mlp.up_proj.shape: says \[64, 172\]"),
    (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.bitmask", t["model.layers.0.mlp.up_proj.bitmask"][:, :4]),
     r"up_proj.bitmask: torch.uint8 \(172, 4\), expected uint8 \(172, 8\)"),
    (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.compressed", t["model.layers.0.mlp.up_proj.compressed"][:, 1:]),
     r"up_proj.bitmask: keeps 5504 entries but model.layers.0.mlp.up_proj.compressed holds 5332"),
    (lambda t: t.pop("model.norm.weight"), r"missing from the checkpoint: \['model.norm.weight'\]"),
    (lambda t: t.__setitem__("model.extra.weight", torch.zeros(2)), r"model.safetensors: tensor model.extra.weight: unexpected"),
    (lambda t: t.__setitem__("model.norm.weight", torch.full((64,), float("nan"))), r"model.safetensors: tensor model.norm.weight: NaN"),
])
def test_corrupt_checkpoints_name_the_tensor(ct_ckpt, tmp_path, edit, match):
    path = _rewrite(ct_ckpt, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(path)


def test_missing_shard_is_named(pruned, tmp_path):
    path = write_ct_checkpoint(pruned, tmp_path / "sharded", shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"index.json: shards it lists are missing: \['model-00002-of-00002"):
        load_pretrained(path)


# -- quantized: fp8 over sparse-24-bitmask (float-quantized) and marlin-24 ------------------------------------
FP8_DYNAMIC = dict(weights={"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
                   input_activations={"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True})
FP8_TENSOR = dict(weights={"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True})


def _int_weights(bits, group_size):
    return {"num_bits": bits, "type": "int", "symmetric": True, "group_size": group_size,
            "strategy": "group" if group_size else "channel"}


def _ct_logits(model, ids=IDS):
    """compressed-tensors' fake-quantized forward, weights only (what sparse_runtime computes)."""
    with weight_only(model):
        return _logits(model, ids)


@pytest.mark.parametrize("scheme", [FP8_DYNAMIC, FP8_TENSOR], ids=["fp8-dynamic", "fp8-tensor"])
def test_fp8_sparse24_loads_with_compressed_tensors_fake_quantized_logits(stories_dir, tmp_path, scheme):
    ct_model = ct_quantize(prune_24_dense(AutoModelForCausalLM.from_pretrained(stories_dir).eval()), **scheme)
    want = _ct_logits(ct_model)
    path = write_ct_checkpoint(ct_model, tmp_path / "ct")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    fmt = "float-quantized" if "input_activations" in scheme else "naive-quantized"  # its name for weight-only fp8
    assert qc["format"] == fmt and qc["sparsity_config"]["format"] == "sparse-24-bitmask"
    if "input_activations" in scheme:
        with pytest.warns(UserWarning, match=r"quantizes its input activations dynamically \(float 8-bit, per "
                                             r"token\); sparse_runtime runs weight-only and does not apply it"):
            model = load_pretrained(path, backend="reference")
    else:
        model = load_pretrained(path, backend="reference")
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 35 and all(m.quant == QuantScheme("fp8") and m.dtype == torch.float32 for m in layers)
    assert torch.equal(_logits(model), want)  # the same weights, bit for bit (the target: 1e-5 relative)


MARLIN_CASES = {  # (model, CT weights, targets): stories260K has only 64x64 projections that fit marlin-24's tiles
    "stories-int4-channel": ("stories", _int_weights(4, None), ("re:.*q_proj$", "re:.*o_proj$")),
    "llama-int4-g128": ("llama", _int_weights(4, 128), ("Linear",)),
    "llama-int8-channel": ("llama", _int_weights(8, None), ("Linear",)),
    "llama-int8-g128": ("llama", _int_weights(8, 128), ("Linear",)),
}


def _pruned(which, stories_dir):
    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval() if which == "stories" else small_llama()
    return prune_24_dense(model)


@pytest.mark.parametrize("case", sorted(MARLIN_CASES))
def test_marlin24_loads_with_compressed_tensors_fake_quantized_logits(stories_dir, tmp_path, case):
    which, weights, targets = MARLIN_CASES[case]
    ct_model = ct_quantize(_pruned(which, stories_dir), weights, targets, float16_scales=True)
    want = _ct_logits(ct_model)
    with pytest.warns(DeprecationWarning, match="marlin24 format is deprecated"):
        path = write_ct_checkpoint(ct_model, tmp_path / "ct")
    stored = load_file(path / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight_packed" in stored
    model = load_pretrained(path, backend="reference")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    marlin = {n for n, m in layers.items() if m.quant is not None}
    scheme = QuantScheme(f"int{weights['num_bits']}", weights["group_size"])
    assert marlin == {n[: -len(".weight_packed")] for n in stored if n.endswith(".weight_packed")}
    assert all(layers[n].quant == scheme for n in marlin)
    if which == "stories":  # the other projections are unquantized sparse-24-bitmask layers of the same folder
        assert len(marlin) == 10 and len(layers) == 35
    codes = torch.cat([q_codes(layers[n]).flatten() for n in marlin])
    assert codes.min() == -(1 << (weights["num_bits"] - 1))  # compressed-tensors' quantizer uses -8 / -128
    assert torch.equal(_logits(model), want)  # the same weights, bit for bit (the target: 1e-5 relative)


def q_codes(layer):
    from sparse_runtime.format.quant import stored_codes

    return stored_codes(layer.weight_values, layer.quant)


def test_fp8_export_is_decompressed_by_compressed_tensors(stories_dir, tmp_path):
    """In float16: compressed-tensors 0.14 sizes the scales it decompresses fp8 with from the fp8 weight, as
    float16, so an fp32 model's scales would round there (its own fp32 checkpoints too)."""
    import_ct()
    from compressed_tensors.compressors import ModelCompressor

    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float16).eval()
    sparsify(model, backend="reference", quant=QuantScheme.parse("fp8"))
    out = export_compressed_tensors(model, tmp_path / "export")
    compressor = ModelCompressor.from_pretrained(str(out))
    target = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float16).eval()
    compressor.decompress(str(out), target)  # its sparse decompression, then its fp8 dequantization
    sparse = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert len(sparse) == 35
    for name, mod in sparse.items():
        assert torch.equal(target.get_submodule(name).weight, mod.dense_weight()), name
    with weight_only(target):  # its own fake-quantized forward over the decompressed weights
        assert torch.equal(_logits(target), _logits(model))
    back = load_pretrained(out, backend="reference").state_dict()  # and it loads back, every tensor bit for bit
    for k, t in model.state_dict().items():
        assert back[k].dtype == t.dtype and torch.equal(back[k].view(torch.uint8), t.view(torch.uint8)), k


def test_marlin24_export_equals_compressed_tensors_compressor_bit_for_bit(tmp_path):
    """marlin-24 has no decompressor in compressed-tensors: its compressor, fed our codes times our (float16)
    scales, must write exactly our tensors. One export mixes int4 g128, int8 per row, fp8 and unquantized layers."""
    import_ct()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.sparse_quantized_compressors.marlin_24 import Marlin24Compressor
    from compressed_tensors.quantization import QuantizationScheme

    model = small_llama()
    sparsify(model, targets=["q_proj", "k_proj", "gate_proj"], backend="reference", quant=QuantScheme.parse("int4"))
    sparsify(model, targets=["o_proj", "down_proj"], backend="reference", quant=QuantScheme.parse("int8"))
    sparsify(model, targets=["v_proj"], backend="reference", quant=QuantScheme.parse("fp8"))
    sparsify(model, targets=["up_proj"], backend="reference")
    with pytest.warns(UserWarning, match=r"marlin-24 stores float16 scales: rounding the scales of "
                                         r"model.layers.0.self_attn.q_proj"):
        out = export_compressed_tensors(model, tmp_path / "export")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision" and len(qc["config_groups"]) == 3
    schemes = {n: QuantizationScheme.model_validate(g) for g in qc["config_groups"].values() for n in g["targets"]}
    assert ModelCompressor.from_pretrained(str(out)) is not None  # its parser takes the config
    stored = load_file(out / "model.safetensors")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    marlin = [n for n, m in layers.items() if m.quant is not None and m.quant.name != "fp8"]
    assert len(marlin) == 10
    for name in marlin:
        layer = layers[name]
        scales = layer.weight_scales.half().float()
        codes = layer.sparse_weight
        dense_codes = type(codes)(codes.pattern, codes.shape, q_codes(layer).float(), codes.meta).to_dense()
        weight = (dense_codes.reshape(layer.out_features, scales.shape[1], -1) * scales.unsqueeze(-1)).flatten(1)
        with pytest.warns(DeprecationWarning):
            theirs = Marlin24Compressor(config=None).compress(
                {f"{name}.weight": weight, f"{name}.weight_scale": scales}, names_to_scheme=schemes)
        for p in ("weight_packed", "meta", "scale_packed"):
            assert stored[f"{name}.{p}"].dtype == theirs[f"{name}.{p}"].dtype, (name, p)
            assert torch.equal(stored[f"{name}.{p}"], theirs[f"{name}.{p}"]), (name, p)
    back = load_pretrained(out, backend="reference")  # and it loads back: the same weights, scales rounded to fp16
    for name, layer in layers.items():
        got, sw = back.get_submodule(name), layer.sparse_weight
        assert got.quant == layer.quant, name
        if name in marlin:  # a kept code 0 may now sit where CUTLASS's encoder put it: compare the dense weights
            sw = type(sw)(sw.pattern, sw.shape, sw.values, sw.meta, sw.scales.half().float(), sw.quant)
        assert torch.equal(got.dense_weight(), sw.to_dense()), name


# -- bad quantized inputs: each a clear error -----------------------------------------------------------------
@pytest.fixture(scope="module")
def ct_fp8(stories_dir, tmp_path_factory):
    model = ct_quantize(prune_24_dense(AutoModelForCausalLM.from_pretrained(stories_dir).eval()), **FP8_DYNAMIC)
    return write_ct_checkpoint(model, tmp_path_factory.mktemp("fp8") / "ckpt")


@pytest.fixture(scope="module")
def ct_marlin(stories_dir, tmp_path_factory):
    which, weights, targets = MARLIN_CASES["stories-int4-channel"]
    model = ct_quantize(_pruned(which, stories_dir), weights, targets, float16_scales=True)
    with pytest.warns(DeprecationWarning):
        return write_ct_checkpoint(model, tmp_path_factory.mktemp("marlin") / "ckpt")


def _weights(change):
    return lambda qc: qc["config_groups"]["group_0"]["weights"].update(change)


def _group(change):
    return lambda qc: qc["config_groups"]["group_0"].update(change)


G = r"compressed-tensors config group 'group_0'"
Q0, O0, D0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize("ckpt, edit_qc, match", [
    ("ct_marlin", _weights({"symmetric": False}), rf"{G}: asymmetric weights \(symmetric=false\) are not supported"),
    ("ct_marlin", _weights({"actorder": "group", "strategy": "group", "group_size": 128}),
     rf"{G}: actorder='group' \(activation-ordered groups, g_idx\) is not supported"),
    ("ct_marlin", _weights({"num_bits": 2}), rf"{G}: int 2-bit channel weights are not supported in marlin-24; "
     r"supported: int 4-bit group 128; int 4-bit channel; int 8-bit group 128; int 8-bit channel"),
    ("ct_marlin", _weights({"strategy": "group", "group_size": 64}),
     rf"{G}: int 4-bit group group_size=64 weights are not supported in marlin-24"),
    ("ct_marlin", _weights({"strategy": "tensor"}), rf"{G}: int 4-bit tensor weights are not supported"),
    ("ct_marlin", _weights({"dynamic": True}), rf"{G}: dynamic weight quantization is not supported"),
    ("ct_marlin", _group({"weights": None}), rf"{G} quantizes no weights"),
    ("ct_marlin", lambda qc: qc.update(config_groups={"W4A16": ["Linear"]}), r"group 'W4A16' names a preset"),
    ("ct_marlin", lambda qc: qc["config_groups"].update(group_1=qc["config_groups"]["group_0"]),
     rf"layer {O0} is targeted by several config groups \(group_0, group_1\)"),
    ("ct_marlin", _group({"targets": ["re:.*q_proj$"]}), rf"tensor {O0}.weight_packed: no marlin-24 config group "
     f"quantizes {O0}"),
    ("ct_marlin", lambda qc: (_group({"targets": ["Linear"]})(qc), qc.update(ignore=["lm_head"])),
     rf"tensor {D0}.compressed: config group 'group_0' stores "
     rf"{D0} as marlin-24, but the folder holds sparse-24-bitmask tensors"),
    ("ct_fp8", _weights({"strategy": "group", "group_size": 64}),
     rf"{G}: float 8-bit group group_size=64 weights are not supported in float-quantized"),
    ("ct_fp8", _group({"input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor"}}),
     rf"{G}: static input activation quantization \(input_scale\) is not supported"),
    ("ct_fp8", _group({"output_activations": {"num_bits": 8, "type": "float", "strategy": "tensor"}}),
     rf"{G}: output activation quantization is not supported"),
    ("ct_fp8", lambda qc: qc.update(kv_cache_scheme={"num_bits": 8, "type": "float"}), r"kv_cache_scheme is not"),
    ("ct_fp8", lambda qc: qc.update(transform_config={"config_groups": {"u": {}}}), r"transforms .* not supported"),
    ("ct_fp8", lambda qc: qc.pop("config_groups"), rf"tensor {D0}.weight_scale: no config group quantizes {D0}"),
])
def test_unsupported_quantization_configs_are_refused(request, tmp_path, ckpt, edit_qc, match):
    path = _rewrite(request.getfixturevalue(ckpt), tmp_path / "q", edit_qc=edit_qc)
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(path)


def _set(key, fn):
    return lambda t: t.__setitem__(key, fn(t[key]))


@pytest.mark.parametrize("ckpt, edit, match", [
    ("ct_marlin", _set(f"{Q0}.weight_packed", lambda w: w[:1]),
     rf"tensor {Q0}.weight_packed: int32 \[1, 128\], expected int32 \[2, 128\] for 4-bit \[64, 64\]"),
    ("ct_marlin", _set(f"{Q0}.scale_packed", lambda s: s.float()),
     rf"tensor {Q0}.scale_packed: float32 \[1, 64\], expected float16 \[1, 64\]"),
    ("ct_marlin", _set(f"{Q0}.meta", torch.zeros_like),
     rf"tensor {Q0}.meta: row 0, group 0 has indices \[0, 0\]; 2:4 metadata names two columns in order"),
    ("ct_marlin", lambda t: t.pop(f"{Q0}.meta"), rf"{Q0} lacks {Q0}.meta"),
    ("ct_marlin", _set(f"{Q0}.scale_packed", lambda s: s.index_fill(1, torch.tensor([3]), 0.0)),
     rf"{Q0}.scales: row 3, group 0 has scale 0.0; scales must be > 0"),
    ("ct_fp8", lambda t: t.pop(f"{D0}.weight_scale"),
     rf"config group 'group_0' quantizes {D0}, but {D0}.weight_scale is missing"),
    ("ct_fp8", _set(f"{D0}.weight_scale", lambda s: s.expand(64, 2).contiguous()),
     rf"tensor {D0}.weight_scale: torch.float32 \[64, 2\], expected floating \[64, 1\]"),
    ("ct_fp8", _set(f"{D0}.compressed", lambda v: v.float()),
     rf"tensor {D0}.compressed: float32 values, expected float8_e4m3fn codes for config group 'group_0'"),
    ("ct_fp8", _set(f"{D0}.weight_scale", lambda s: s.index_fill(0, torch.tensor([2]), float("nan"))),
     rf"tensor {D0}.weight_scale: NaN"),
    ("ct_fp8", lambda t: t.__setitem__("model.norm.weight_scale", torch.ones(1)),
     r"tensor model.norm.weight_scale: a quantized layer without 2:4 tensors; dense quantized layers are not"),
])
def test_corrupt_quantized_checkpoints_name_the_tensor(request, tmp_path, ckpt, edit, match):
    path = _rewrite(request.getfixturevalue(ckpt), tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(path)


def test_quantized_bitmask_must_be_24(ct_fp8, tmp_path):
    from sparse_runtime.format.codec import pack_bits, unpack_bits

    def edit(t):
        mask = unpack_bits(t[f"{D0}.bitmask"], 172)
        flat = mask.reshape(64, -1, 4)
        flat[0, 0] = torch.tensor([True, True, True, False])  # 3 of 4 in one group, 1 in the next
        flat[0, 1] = torch.tensor([True, False, False, False])
        t[f"{D0}.bitmask"] = pack_bits(mask)

    path = _rewrite(ct_fp8, tmp_path / "non24", edit)
    with pytest.raises(CheckpointError, match=rf"tensor {D0}.bitmask: not 2:4; quantized values need a 2:4 mask"):
        load_pretrained(path)

