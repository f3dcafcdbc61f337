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


@torch.no_grad()
def ct_quantize(model, weights: dict, targets=("Linear",), input_activations: dict | None = None,
                ignore=("lm_head",), float16_scales: bool = False):
    """compressed-tensors' own quantization step on ``model`` (dense nn.Linear layers, 2:4-pruned): one config
    group applied with its ``apply_quantization_config``, each weight's scales from its ``calculate_qparams``
    over the weight's (group's) min and max, as llm-compressor's min-max observer feeds it. The model then runs
    compressed-tensors' fake-quantized forward.

    ``float16_scales`` (marlin-24 stores float16 scales and its compressor re-quantizes the weight in float16):
    the scales are rounded to float16 and each weight replaced by its own fake-quantized value, so the fp32 fake
    quantization and the compressor's float16 one give the same codes (otherwise a quotient within float16's
    rounding of a .5 tie codes differently in the two)."""
    import_ct()
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = QuantizationScheme(targets=list(targets), weights=QuantizationArgs(**weights),
                                input_activations=None if input_activations is None
                                else QuantizationArgs(**input_activations))
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(ignore)))
    for mod in model.modules():
        args = getattr(getattr(mod, "quantization_scheme", None), "weights", None)
        if args is None:
            continue
        w = mod.weight
        if args.strategy == "group":
            g = w.reshape(w.shape[0], -1, args.group_size)
            lo, hi = g.amin(-1), g.amax(-1)
        elif args.strategy == "channel":
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        else:
            lo, hi = w.amin().reshape(1), w.amax().reshape(1)
        scale, zero = calculate_qparams(lo, hi, args)
        if float16_scales:
            scale = scale.half().to(scale.dtype)
            w.copy_(fake_quantize(w, scale, zero, args))
        mod.weight_scale.copy_(scale)
        mod.weight_zero_point.copy_(zero)
    return model


class weight_only:
    """Within it, compressed-tensors' fake-quantized forward quantizes weights only (its input activation
    quantization, dynamic per token for FP8_DYNAMIC, is switched off: sparse_runtime does not apply it)."""

    def __init__(self, model):
        self.schemes = [m.quantization_scheme for m in model.modules() if hasattr(m, "quantization_scheme")]

    def __enter__(self):
        self.saved = [s.input_activations for s in self.schemes]
        for s in self.schemes:
            s.input_activations = None

    def __exit__(self, *exc):
        for s, a in zip(self.schemes, self.saved):
            s.input_activations = a


def small_llama(seed: int = 0):
    """A random 2-layer Llama whose every projection fits marlin-24's tiles (N % 64, K % 32) and groups of 128,
    with one layer (down_proj, K = 512) whose grouped scales marlin-24 permutes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=512, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()
