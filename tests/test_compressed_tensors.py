"""compressed-tensors sparse-24-bitmask import/export, against compressed-tensors 0.14.0.1 itself."""
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

from ct_helpers import import_ct, prune_24_dense, write_ct_checkpoint

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
    sparsify(model, quant=QuantScheme.parse("fp8"))
    with pytest.raises(CheckpointError, match=r"q_proj: has fp8 values; sparse-24-bitmask holds full-precision"):
        export_compressed_tensors(model, tmp_path / "c")


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
    (lambda qc: qc.update(format="marlin-24"), r"format marlin-24 is not supported"),
    (lambda qc: qc.update(format="float-quantized", config_groups={"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float"}, "format": "float-quantized"}}),
     r"format float-quantized is not supported"),
    (lambda qc: qc["sparsity_config"].update(format="sparse-bitmask"), r"sparsity format 'sparse-bitmask' is not"),
])
def test_quantized_and_other_variants_are_refused_by_name(ct_ckpt, tmp_path, edit_qc, match):
    path = _rewrite(ct_ckpt, tmp_path / "q", edit_qc=edit_qc)
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(path)


def test_fp8_values_are_refused_by_name(ct_ckpt, tmp_path):
    name = "model.layers.0.self_attn.q_proj"

    def edit(t):
        t[f"{name}.compressed"] = t[f"{name}.compressed"].to(torch.float8_e4m3fn)

    path = _rewrite(ct_ckpt, tmp_path / "fp8", edit)
    with pytest.raises(CheckpointError, match=rf"{name}.compressed: float8_e4m3fn values .* not supported"):
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
