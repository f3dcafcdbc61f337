"""The model loader, and the embedded default SmolLM2-135M end to end (slow: ~1 minute)."""
import pytest
import torch

from sparse_runtime import SparseLinear, load_pretrained, save_pretrained, sparsify
from sparse_runtime.generate import stream_generate
from sparse_runtime.models import load_model, named_gguf, resolve


def test_load_folder(stories_dir):
    model, tok = load_model(stories_dir)
    assert model.config.num_hidden_layers == 5 and tok("Once").input_ids


def test_bad_specs(tmp_path):
    with pytest.raises(FileNotFoundError, match="known name"):
        resolve("no-such-model")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve(tmp_path / "x.gguf")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    import os

    # A fresh cache, so the GGUF conversion itself is tested, not a leftover.
    os.environ["SPARSE_RUNTIME_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        first, tok = load_model("smollm2-135m")
        again, _ = load_model("smollm2-135m")  # from the safetensors cache
    finally:
        del os.environ["SPARSE_RUNTIME_CACHE"]
    return first, again, tok


@pytest.mark.slow
def test_smollm2_loads_from_gguf_and_cache(smollm2):
    first, again, tok = smollm2
    assert named_gguf("smollm2-135m").suffix == ".gguf"
    cfg = first.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(first(ids).logits, again(ids).logits)


@pytest.mark.slow
def test_smollm2_generates_coherent_text(smollm2):
    model, _, tok = smollm2
    text = "".join(t.text for t in stream_generate(model, tok, "What is the capital of France?", 12, chat=True))
    assert "Paris" in text


@pytest.mark.slow
def test_smollm2_24_save_reload_identical_logits(smollm2, tmp_path):
    _, model, tok = smollm2
    report = sparsify(model)
    assert len(report.replaced) == 210  # 30 layers x 7 linears
    path = save_pretrained(model, tmp_path / "smol24", tokenizer=tok)
    loaded, tok2 = load_model(path)
    assert sum(isinstance(m, SparseLinear) for m in loaded.modules()) == 210
    ids = tok("Sparse models run fast because", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert tok2("hello").input_ids == tok("hello").input_ids
    assert load_pretrained(path).config.num_hidden_layers == 30
