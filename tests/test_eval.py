import math

import pytest
import torch
from torch import nn

from sparse_runtime.data.perplexity import perplexity
from sparse_runtime.models.sources import load_model

from conftest import TEXT
from helpers import reconstruction_error


class _Uniform(nn.Module):
    """Predicts every token with equal probability: perplexity == vocab size."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.p = vocab, nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, input_ids, use_cache=False):
        self.seen.append(input_ids.shape[1])
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


def test_uniform_model_windows_and_token_counts():
    m = _Uniform(50)
    ids = torch.arange(100) % 50
    r = perplexity(m, ids, seqlen=32, progress=False)
    assert math.isclose(r.ppl, 50, rel_tol=1e-5)
    assert (r.windows, r.tokens, r.seqlen) == (3, 3 * 31, 32)  # non-overlapping, partial tail dropped
    r = perplexity(m, ids, seqlen=32, stride=8, progress=False)
    assert r.tokens == 100 - 1 - 4  # overlapping windows score each token once; the last 4 tail tokens are dropped
    assert "seqlen 32" in str(r)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(m, ids, seqlen=200, progress=False)


def test_stories_perplexity_matches_direct_loss_in_both_bos_modes(stories_dir):
    model, tok = load_model(stories_dir)
    text = (TEXT / "tinystories_valid_head.txt").read_text()
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    # reference protocol: the text tokenized once (one BOS in front), cut into windows of 64
    r = perplexity(model, tok, text, seqlen=64, max_tokens=256, bos="document", progress=False)
    doc = torch.cat([torch.tensor([tok.bos_token_id]), ids])[:256].view(4, 64)
    # BOS per window: BOS + 63 text tokens, all 63 scored
    w = perplexity(model, tok, text, seqlen=64, max_tokens=256, progress=False)
    win = torch.cat([torch.full((4, 1), tok.bos_token_id), ids[:4 * 63].view(4, 63)], dim=1)
    with torch.no_grad():
        doc_loss = model(input_ids=doc, labels=doc).loss  # mean over 4 * 63 predicted tokens
        win_loss = model(input_ids=win, labels=win).loss
    assert (r.bos, w.bos) == ("document", "window") and "BOS per window" in str(w)
    assert r.tokens == w.tokens == 4 * 63 and r.windows == w.windows == 4
    assert math.isclose(r.ppl, doc_loss.exp().item(), rel_tol=1e-4)
    assert math.isclose(w.ppl, win_loss.exp().item(), rel_tol=1e-4)
    assert w.ppl != r.ppl and 2 < w.ppl < 20  # a trained model on in-domain text


def test_bos_window_stride_scores_each_token_once(stories_dir):
    _, tok = load_model(stories_dir)
    m = _Uniform(tok.vocab_size)
    text = (TEXT / "tinystories_valid_head.txt").read_text()
    r = perplexity(m, tok, text, seqlen=33, stride=8, max_tokens=200, progress=False)
    assert m.seen[0] == 33 and r.tokens == 32 + 8 * ((200 - 32) // 8)
    with pytest.raises(ValueError, match="stride <= 32"):
        perplexity(m, tok, text, seqlen=33, stride=33, max_tokens=200, progress=False)


def test_a_tokenizer_without_bos_gets_none(stories_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories_dir, add_bos_token=False)  # as SmolLM2's: a bos_token, never added
    m = _Uniform(tok.vocab_size)
    text = (TEXT / "tinystories_valid_head.txt").read_text()
    r = perplexity(m, tok, text, seqlen=32, max_tokens=96, bos="window", progress=False)
    assert r.bos == "none" and r.tokens == 3 * 31 and "no BOS" in str(r)
    with pytest.raises(ValueError, match="bos must be one of"):
        perplexity(m, tok, text, seqlen=32, bos="first", progress=False)


def test_an_encoder_without_logits_is_a_clear_error():
    from helpers import tiny_model

    with pytest.raises(ValueError, match="needs a language model with logits; BertModel returns none"):
        perplexity(tiny_model("bert"), torch.arange(64) % 100, seqlen=32, progress=False)


def test_reconstruction_error():
    w, x = torch.randn(8, 16), torch.randn(100, 16)
    assert reconstruction_error(w, w, x) == 0
    assert math.isclose(reconstruction_error(w, torch.zeros_like(w), x), 1.0, rel_tol=1e-6)
