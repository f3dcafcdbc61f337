"""Residual-stream rotations keep a model's function: random orthogonal Q1/R2 on real models, refusals, checkpoints."""
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from helpers import random_rotations, tiny_model
from sparse_runtime import SparseLinear, load_pretrained, save_pretrained, sparsify
from sparse_runtime.models.sources import load_model
from sparse_runtime.models.residual_rotation import BUFFER, UnsupportedArchitecture, check_layer, rotate_model


def relative_error(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def check_exact(model, blocks, ids):
    with torch.no_grad():
        ref = model(ids).logits
    q1s, r2s = random_rotations(model, blocks)
    rotate_model(model, q1s, r2s)
    with torch.no_grad():
        out = model(ids).logits
    assert relative_error(out, ref) < 1e-4
    # one rotation per inner boundary; the first folds into the embedding, the last into lm_head
    carried = [getattr(layer, BUFFER, None) for layer in model.model.layers]
    assert carried[0] is None and all(r is not None for r in carried[1:])
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert not model.config.tie_word_embeddings
    # the rotations are far from identities, so the test is not passing on a no-op
    r = model.model.layers[1].residual_rotation
    assert (r - torch.eye(r.shape[-1])).abs().max() > 0.1


@pytest.mark.parametrize("blocks", [1, 4])
def test_rotated_stories260k_keeps_logits(stories_dir, blocks):
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    check_exact(model, blocks, ids)


@pytest.mark.slow
@pytest.mark.parametrize("blocks", [1, 4])
def test_rotated_smollm2_keeps_logits(blocks):
    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    ids = tok("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    check_exact(model, blocks, ids)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_llama_style_families_keep_logits(family):
    model = tiny_model(family).float()
    for layer in model.model.layers:  # random norm weights and biases, so folding them is exercised
        for n in (layer.input_layernorm, layer.post_attention_layernorm):
            n.weight.data.uniform_(0.5, 1.5)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    check_exact(model, 2, ids)


def test_gemma_style_norms_are_refused():
    model = tiny_model("gemma")  # x * (1 + w) norms: they do not fold into the linears as x / rms * w does
    with pytest.raises(UnsupportedArchitecture, match="does not compute x / rms"):
        rotate_model(model, *random_rotations(model, 1))


def test_norm_on_sublayer_output_is_refused():
    import transformers

    cfg = transformers.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128)
    layer = transformers.Gemma3ForCausalLM(cfg).model.layers[0]
    with pytest.raises(UnsupportedArchitecture, match="before the residual add"):
        check_layer(layer)


def test_layernorm_and_missing_projections_are_refused(stories_dir):
    model = AutoModelForCausalLM.from_pretrained(stories_dir)
    layer = model.model.layers[0]
    layer.post_attention_layernorm = nn.LayerNorm(64)
    with pytest.raises(UnsupportedArchitecture, match="not an RMSNorm"):
        check_layer(layer)
    del layer.mlp.gate_proj
    with pytest.raises(UnsupportedArchitecture, match="lacks"):
        check_layer(layer)


def test_wrong_number_of_rotations_is_an_error(stories_dir):
    model = AutoModelForCausalLM.from_pretrained(stories_dir)
    q1s, r2s = random_rotations(model, 1)
    with pytest.raises(ValueError, match="one rotation per decoder layer"):
        rotate_model(model, q1s[:-1], r2s[:-1])


def test_rotated_sparse_checkpoint_reloads_bit_identical(stories_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    rotate_model(model, *random_rotations(model, 2))
    sparsify(model, pattern="2:4", backend="reference", progress=False)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
    save_pretrained(model, tmp_path / "ckpt")
    for backend in ("reference", "decompressed", "auto", "triton"):
        again = load_pretrained(tmp_path / "ckpt", backend=backend)
        assert not again.config.tie_word_embeddings
        for m in model.modules():  # the same backend in memory: bit-identical after the round trip
            if isinstance(m, SparseLinear):
                m.set_backend(backend)
        with torch.no_grad():
            same = model(ids).logits
            assert torch.equal(again(ids).logits, same), backend
        torch.testing.assert_close(same, ref, rtol=1e-4, atol=1e-4)  # and every backend computes the same model


def test_checkpoint_with_a_bad_rotation_entry_is_refused(stories_dir, tmp_path):
    import json

    from sparse_runtime.errors import CheckpointError

    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    rotate_model(model, *random_rotations(model, 1))
    sparsify(model, pattern="2:4", backend="reference", progress=False)
    save_pretrained(model, tmp_path / "ckpt")
    f = tmp_path / "ckpt" / "sparse_config.json"
    sc = json.loads(f.read_text())
    sc["residual_rotation"]["9"] = [64, 64]
    f.write_text(json.dumps(sc))
    with pytest.raises(CheckpointError, match="bad residual_rotation entry"):
        load_pretrained(tmp_path / "ckpt")
    sc["residual_rotation"].pop("9")
    sc["residual_rotation"]["1"] = [32, 32]
    f.write_text(json.dumps(sc))
    with pytest.raises(CheckpointError, match=r"tensor model.layers.1.residual_rotation: shape \[64, 64\], the model "
                                              r"needs \[32, 32\]"):
        load_pretrained(tmp_path / "ckpt")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton", "cusparselt"])
@pytest.mark.parametrize("blocks", [1, 4])
def test_rotated_checkpoint_on_gpu_matches_the_cpu_reference(stories_dir, tmp_path, backend, blocks):
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    rotate_model(model, *random_rotations(model, blocks))
    sparsify(model, pattern="2:4", backend="reference", progress=False)
    save_pretrained(model, tmp_path / "ckpt")
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = load_pretrained(tmp_path / "ckpt", backend="reference").double()(ids).logits
        gpu = load_pretrained(tmp_path / "ckpt", device="cuda", dtype=torch.float16, backend=backend)
        out = gpu(ids.cuda()).logits.double().cpu()
    assert float((out - ref).norm() / ref.norm()) < 4e-3


def test_plain_transformers_loads_a_rotated_checkpoint(stories_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    rotate_model(model, *random_rotations(model, 2))
    sparsify(model, pattern="2:4", backend="reference", progress=False)
    save_pretrained(model, tmp_path / "ckpt")
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(4))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")  # through sparse_runtime's quantizer
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, load_pretrained(tmp_path / "ckpt")(ids).logits)  # both backend auto


def test_compressed_tensors_export_refuses_a_rotated_model(stories_dir, tmp_path):
    from sparse_runtime.models.compressed_tensors import export_compressed_tensors
    from sparse_runtime.errors import CheckpointError

    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    rotate_model(model, *random_rotations(model, 1))
    sparsify(model, pattern="2:4", backend="reference", progress=False)
    with pytest.raises(CheckpointError, match="model.layers.1: carries a residual rotation"):
        export_compressed_tensors(model, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
