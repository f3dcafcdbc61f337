"""compressed-tensors 0.14 (the independent reference), from the folder the Makefile installs it into."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

CT_DIR = Path(__file__).resolve().parents[1] / ".venv" / "ct014"


def import_ct():
    """The compressed_tensors package, or a skip saying how to install it (``make setup`` does)."""
    if not (CT_DIR / "compressed_tensors").is_dir():
        pytest.skip(f"compressed-tensors 0.14.0.1 not installed in {CT_DIR} (make setup installs it)")
    if str(CT_DIR) not in sys.path:
        sys.path.append(str(CT_DIR))
    import compressed_tensors

    assert compressed_tensors.__version__ == "0.14.0.1", compressed_tensors.__version__
    return compressed_tensors


def write_ct_checkpoint(model, out: Path, tokenizer=None, shards: int = 1) -> Path:
    """compressed-tensors' own ModelCompressor compresses ``model`` (already 2:4-pruned, dense linears) into
    ``out``: one model.safetensors, or ``shards`` files with an index."""
    import_ct()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import Sparse24BitMaskConfig

    cfg = Sparse24BitMaskConfig(targets=["Linear"], ignore=["lm_head"], sparsity_structure="2:4")
    compressor = ModelCompressor.from_pretrained_model(model, sparsity_config_or_format=cfg)
    state = compressor.compress(model)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = {k: v.contiguous() for k, v in state.items()}
    out.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        keys, weight_map = sorted(state), {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = keys[i::shards]
            save_file({k: state[k] for k in part}, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model.config.save_pretrained(out)
    compressor.update_config(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


@torch.no_grad()
def prune_24_dense(model):
    """Zero the smallest 2 of every 4 weights of each linear but lm_head, keeping nn.Linear layers."""
    from sparse_runtime.format.masks import nm_mask

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            mod.weight.mul_(nm_mask(mod.weight.abs(), 2, 4))
    return model
