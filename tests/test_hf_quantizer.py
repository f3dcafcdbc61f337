"""Plain transformers ``AutoModelForCausalLM.from_pretrained`` on sparse checkpoints (registered on import)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.quantizers.auto import AutoQuantizationConfig

import sparse_runtime  # noqa: F401  (registers the quantizer)
from sparse_runtime import SparseLinear, load_pretrained, save_pretrained, sparsify
from sparse_runtime.errors import CheckpointError
from sparse_runtime.models.hf_quantizer import SparseRuntimeQuantConfig

from ct_helpers import ct_quantize, import_ct, prune_24_dense, write_ct_checkpoint

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


def test_int8_head_checkpoint(stories_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    sparsify(model, head="int8")
    path = save_pretrained(model, tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert loaded.lm_head.tied is loaded.model.embed_tokens
    assert sum(isinstance(m, SparseLinear) for m in loaded.modules()) == 35
    assert torch.equal(_logits(loaded), _logits(model))


# A process that never imports sparse_runtime: plain from_pretrained must refuse the checkpoint (never random
# linears), and with trust_remote_code=True load it through sparse_runtime.
PLAIN_TRANSFORMERS = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(int(sys.argv[4]))  # the parent's: bit-equal logits need the same reduction order
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1])
    refused = None
except ValueError as e:
    refused = str(e)
imported = "sparse_runtime" in sys.modules
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
with torch.no_grad():
    logits = model(torch.tensor(json.loads(sys.argv[2]))).logits
torch.save({"refused": refused, "imported_first": imported, "logits": logits,
            "sparse": sum(type(m).__name__ == "SparseLinear" for m in model.modules())}, sys.argv[3])
"""


def test_plain_transformers_without_sparse_runtime_refuses_or_loads_through_it(stories_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    sparsify(model)
    path = save_pretrained(model, tmp_path / "ckpt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(path), json.dumps(IDS.tolist()),
                    str(tmp_path / "out.pt"), str(torch.get_num_threads())], env=env, stdin=subprocess.DEVNULL, capture_output=True, check=True)
    got = torch.load(tmp_path / "out.pt")
    assert not got["imported_first"] and "trust_remote_code=True" in got["refused"]
    assert got["sparse"] == 35 and torch.equal(got["logits"], _logits(model))


def test_compressed_tensors_checkpoint(stories_dir, tmp_path):
    pruned = prune_24_dense(AutoModelForCausalLM.from_pretrained(stories_dir).eval())
    path = write_ct_checkpoint(pruned, tmp_path / "ct", shards=2)
    loaded = AutoModelForCausalLM.from_pretrained(path)
    _check(loaded, load_pretrained(path))  # the same model as sparse_runtime's own loader, bit for bit
    # and the pruned dense model's numbers (auto runs the cpu kernels where built: fp32 sums in another order)
    torch.testing.assert_close(_logits(loaded), _logits(pruned), rtol=1e-5, atol=1e-5)


def test_quantized_compressed_tensors_checkpoint(stories_dir, tmp_path):
    """marlin-24 q/o projections beside sparse-24-bitmask ones, in one folder: transformers hands it over whole."""
    pruned = prune_24_dense(AutoModelForCausalLM.from_pretrained(stories_dir).eval())
    weights = {"num_bits": 4, "type": "int", "strategy": "channel", "symmetric": True}
    ct_quantize(pruned, weights, ("re:.*q_proj$", "re:.*o_proj$"), float16_scales=True)
    with pytest.warns(DeprecationWarning):
        path = write_ct_checkpoint(pruned, tmp_path / "ct")
    loaded, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    _check(loaded, load_pretrained(path))
    assert sum(getattr(m, "quant", None) is not None for m in loaded.modules()) == 10
    assert not info["unexpected_keys"] and not info["missing_keys"]  # its load report leaves the 2:4 tensors to us


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
    cfg["quantization_config"].update(format="marlin-24", config_groups={"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "channel", "symmetric": False}}})
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="asymmetric weights .* are not supported"):
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
