"""Quality checks: perplexity over non-overlapping windows, and per-linear reconstruction error."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class Perplexity:
    ppl: float
    seqlen: int
    tokens: int  # tokens scored (windows * (seqlen - 1))
    windows: int

    def __str__(self) -> str:
        return f"perplexity {self.ppl:.2f} (seqlen {self.seqlen}, {self.windows} windows, {self.tokens} tokens scored)"

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of ``text``; with ``max_tokens``, tokenize a prefix first (the full WikiText takes seconds)."""
    if max_tokens:
        for chars in (max_tokens * 8, None):
            ids = tokenizer(text[:chars], return_tensors="pt").input_ids[0]
            if chars is None or len(ids) > max_tokens:
                return ids[:max_tokens]
    return tokenizer(text, return_tensors="pt").input_ids[0]


@torch.no_grad()
def perplexity(model, tokenizer_or_ids, text: str | Path | None = None, seqlen: int = 2048,
               stride: int | None = None, max_tokens: int | None = None, device=None,
               progress: bool = True) -> Perplexity:
    """exp(mean next-token NLL) over windows of ``seqlen`` tokens taken every ``stride`` (default: ``seqlen``,
    i.e. non-overlapping; a trailing partial window is dropped). With a smaller stride only the last
    ``stride`` tokens of each window are scored, the rest is context. ``text`` may be a string or a path."""
    if isinstance(text, Path):
        text = text.read_text(encoding="utf-8")
    if torch.is_tensor(tokenizer_or_ids):
        ids = tokenizer_or_ids.reshape(-1)[:max_tokens]
    else:
        if text is None:
            raise ValueError("perplexity needs text when given a tokenizer")
        ids = tokenize(tokenizer_or_ids, text, max_tokens)
    stride = stride or seqlen
    if not 0 < stride <= seqlen:
        raise ValueError(f"need 0 < stride <= seqlen, got stride={stride}, seqlen={seqlen}")
    if len(ids) < seqlen:
        raise ValueError(f"{len(ids)} tokens are fewer than one window of {seqlen}")
    device = device or next(model.parameters()).device
    starts = range(0, len(ids) - seqlen + 1, stride)
    nll, count = 0.0, 0
    for s in tqdm(starts, desc=f"perplexity@{seqlen}", unit="win", disable=not progress, leave=False):
        window = ids[s:s + seqlen].to(device).unsqueeze(0)
        logits = model(input_ids=window, use_cache=False).logits[0, :-1].float()
        targets = window[0, 1:]
        skip = 0 if s == 0 else max(0, seqlen - stride - 1)  # overlapping context is not scored twice
        nll += F.cross_entropy(logits[skip:], targets[skip:], reduction="sum").item()
        count += len(targets) - skip
    return Perplexity(math.exp(nll / count), seqlen, count, len(starts))


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    """||W X - W_hat X||_F / ||W X||_F for inputs ``x`` [tokens, in_features]."""
    x = x.reshape(-1, x.shape[-1]).float()
    ref = x @ weight.float().T
    return ((ref - x @ pruned.float().T).norm() / ref.norm()).item()
