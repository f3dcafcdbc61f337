import math

import pytest
import torch
from torch import nn

from sparse_runtime.eval import perplexity, reconstruction_error
from sparse_runtime.models import load_model

from conftest import TEXT


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


def test_stories_perplexity_matches_direct_loss(stories_dir):
    model, tok = load_model(stories_dir)
    text = (TEXT / "tinystories_valid_head.txt").read_text()
    r = perplexity(model, tok, text, seqlen=64, max_tokens=256, progress=False)
    ids = tok(text, return_tensors="pt").input_ids[0][:256].view(4, 64)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss  # mean over 4 * 63 predicted tokens
    assert r.tokens == 4 * 63 and math.isclose(r.ppl, loss.exp().item(), rel_tol=1e-4)
    assert 2 < r.ppl < 20  # a trained model on in-domain text


def test_reconstruction_error():
    w, x = torch.randn(8, 16), torch.randn(100, 16)
    assert reconstruction_error(w, w, x) == 0
    assert math.isclose(reconstruction_error(w, torch.zeros_like(w), x), 1.0, rel_tol=1e-6)
