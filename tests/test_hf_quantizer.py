"""Plain transformers ``AutoModelForCausalLM.from_pretrained`` on sparse checkpoints (registered on import)."""
import json
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.quantizers.auto import AutoQuantizationConfig

import sparse_runtime  # noqa: F401  (registers the quantizer)
from sparse_runtime import SparseLinear, save_pretrained, sparsify
from sparse_runtime.errors import CheckpointError
from sparse_runtime.models.hf_quantizer import SparseRuntimeQuantConfig

from ct_helpers import import_ct, prune_24_dense, write_ct_checkpoint

IDS = torch.tensor([[1, 403, 407, 261, 378, 10, 300, 95, 5, 42]])


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _check(loaded, source):
    layers = [m for m in loaded.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 35
    assert torch.equal(_logits(loaded), _logits(source))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_project_checkpoint(stories_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    sparsify(model)
    path = save_pretrained(model, tmp_path / "ckpt")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "sparse_runtime", "format_version": 1}
    _check(AutoModelForCausalLM.from_pretrained(path), model)


def test_compressed_tensors_checkpoint(stories_dir, tmp_path):
    pruned = prune_24_dense(AutoModelForCausalLM.from_pretrained(stories_dir).eval())
    path = write_ct_checkpoint(pruned, tmp_path / "ct", shards=2)
    _check(AutoModelForCausalLM.from_pretrained(path), pruned)


def test_corrupt_checkpoint_raises_instead_of_random_weights(stories_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    sparsify(model)
    path = save_pretrained(model, tmp_path / "ckpt")
    sc = json.loads((path / "sparse_config.json").read_text())
    sc["layers"]["model.layers.0.mlp.up_proj"]["in_features"] = 32
    (path / "sparse_config.json").write_text(json.dumps(sc))
    with pytest.raises(CheckpointError, match="up_proj: checkpoint says 172x32"):
        AutoModelForCausalLM.from_pretrained(path)


def test_quantized_compressed_tensors_24_is_refused(stories_dir, tmp_path):
    pruned = prune_24_dense(AutoModelForCausalLM.from_pretrained(stories_dir).eval())
    path = write_ct_checkpoint(pruned, tmp_path / "ct")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["format"] = "marlin-24"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="format marlin-24 is not supported"):
        AutoModelForCausalLM.from_pretrained(path)


def test_other_compressed_tensors_configs_stay_with_transformers():
    import_ct()
    sparse = {"quant_method": "compressed-tensors", "sparsity_config": {"format": "sparse-24-bitmask"}}
    assert isinstance(AutoQuantizationConfig.from_dict(sparse), SparseRuntimeQuantConfig)
    fp8 = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"}}}}
    # transformers' own CompressedTensorsConfig takes it (and wants compressed-tensors >= 0.15, not 0.14)
    with pytest.raises(ImportError, match=r"compressed-tensors>=0.15.0 is required"):
        AutoQuantizationConfig.from_dict(fp8)


def test_register_is_idempotent():
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    before = dict(AUTO_QUANTIZER_MAPPING)
    sparse_runtime.models.hf_quantizer.register()
    assert AUTO_QUANTIZER_MAPPING == before
