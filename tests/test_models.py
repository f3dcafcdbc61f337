"""The model loader, and the embedded default SmolLM2-135M end to end (slow: ~1 minute)."""
import json
import os

import pytest
import torch

from helpers import tiny_model, write_stories_gguf
from sparse_runtime import SparseLinear, load_pretrained, save_pretrained, sparsify
from sparse_runtime.errors import CheckpointError
from sparse_runtime.serving.generate import stream_generate
from sparse_runtime.models.sources import load_model, named_gguf, resolve


def test_load_folder(stories_dir):
    model, tok = load_model(stories_dir)
    assert model.config.num_hidden_layers == 5 and tok("Once").input_ids


def test_a_checkpoint_lacking_weights_is_an_error_not_random_values(stories_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(stories_dir)
    cfg.tie_word_embeddings = False  # so lm_head.weight must come from the file, which lacks it
    cfg.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(stories_dir).save_pretrained(tmp_path)
    save_file(load_file(stories_dir / "model.safetensors"), tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"randomly initialised: lm_head.weight"):
        load_model(tmp_path)


def test_an_encoder_loads_as_its_config_names_it(stories_dir, tmp_path):
    from transformers import AutoTokenizer, BertModel

    tiny_model("bert").save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(stories_dir).save_pretrained(tmp_path)
    model, _ = load_model(tmp_path)
    assert type(model) is BertModel  # not BertLMHeadModel with a random head
    ref = BertModel.from_pretrained(tmp_path)
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, ref(ids).last_hidden_state)


def test_gguf_cache_is_keyed_on_content_and_replaces_superseded_entries(stories_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPARSE_RUNTIME_CACHE", str(tmp_path / "cache"))
    gguf = write_stories_gguf(stories_dir, tmp_path / "stories.gguf")
    model, tok = load_model(gguf)
    out = capsys.readouterr()
    assert "converting stories.gguf" in out.err and out.out == ""  # stdout is left to the results
    ref, _ = load_model(stories_dir)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    first = resolve(gguf)
    write_stories_gguf(stories_dir, gguf)  # reinstalled: same bytes, new mtime
    os.utime(gguf, (1, 1))
    assert resolve(gguf) == first and "converting" not in capsys.readouterr().err
    write_stories_gguf(stories_dir, gguf, name="stories260K v2")  # same path, new content
    second = resolve(gguf)
    assert second != first and "converting" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [second.name]  # the old entry is gone


def test_a_converted_gguf_is_a_plain_transformers_folder(stories_dir, tmp_path, monkeypatch, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    monkeypatch.setenv("SPARSE_RUNTIME_CACHE", str(tmp_path / "cache"))
    gguf = write_stories_gguf(stories_dir, tmp_path / "stories.gguf")
    folder = resolve(gguf)
    assert getattr(AutoConfig.from_pretrained(folder), "quantization_config", None) is None
    ids = torch.tensor([[1, 403, 407, 261, 378, 10]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(folder)(ids).logits
        assert torch.equal(plain, AutoModelForCausalLM.from_pretrained(stories_dir)(ids).logits)
    # an entry converted before the GGUF quantization_config was dropped is rewritten, not converted again
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"dequantize": False, "gguf_file": gguf.name, "quant_method": "gguf"}
    (folder / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert resolve(gguf) == folder and "converting" not in capsys.readouterr().err
    assert getattr(AutoConfig.from_pretrained(folder), "quantization_config", None) is None


def test_a_gguf_lacking_a_tensor_is_an_error(stories_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_RUNTIME_CACHE", str(tmp_path / "cache"))
    gguf = write_stories_gguf(stories_dir, tmp_path / "broken.gguf", drop=("blk.0.attn_q.weight",))
    with pytest.raises(CheckpointError, match=r"layers.0.self_attn.q_proj.weight"):
        load_model(gguf)
    assert not any((tmp_path / "cache").glob("broken-*"))  # nothing cached


def test_bad_specs(tmp_path):
    with pytest.raises(FileNotFoundError, match="known name"):
        resolve("no-such-model")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve(tmp_path / "x.gguf")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
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
