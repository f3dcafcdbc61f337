"""Quality checks: perplexity over non-overlapping windows."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .calibration import BOS_LABELS, bos_mode, encode


@dataclass
class Perplexity:
    ppl: float
    seqlen: int
    tokens: int  # tokens scored
    windows: int
    bos: str = "as given"  # what leads each window: see prune.calibration.bos_mode

    def __str__(self) -> str:
        return (f"perplexity {self.ppl:.2f} (seqlen {self.seqlen}, {self.windows} windows, {self.tokens} tokens "
                f"scored, {BOS_LABELS.get(self.bos, 'token ids as given')})")

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize(tokenizer, text: str, max_tokens: int | None = None, mode: str = "document") -> torch.Tensor:
    """Token ids of ``text`` (see :func:`~sparse_runtime.data.calibration.encode` for ``mode``); with
    ``max_tokens``, tokenize a prefix first (the full WikiText takes seconds)."""
    if max_tokens:
        for chars in (max_tokens * 8, None):
            ids = encode(tokenizer, text[:chars], mode)
            if chars is None or len(ids) > max_tokens:
                return torch.tensor(ids[:max_tokens], dtype=torch.long)
    return torch.tensor(encode(tokenizer, text, mode), dtype=torch.long)


@torch.no_grad()
def perplexity(model, tokenizer_or_ids, text: str | Path | None = None, seqlen: int = 2048,
               stride: int | None = None, max_tokens: int | None = None, device=None,
               progress: bool = True, bos: str = "auto") -> Perplexity:
    """exp(mean next-token NLL) over windows of ``seqlen`` tokens taken every ``stride`` (default: the window's
    text length, i.e. non-overlapping; a trailing partial window is dropped). With a smaller stride only the
    last ``stride`` tokens of each window are scored, the rest is context. ``text`` may be a string or a path.

    ``bos`` (see :func:`~sparse_runtime.data.calibration.bos_mode`): ``"auto"``/``"window"`` put the
    tokenizer's BOS in front of every window (then ``seqlen - 1`` text tokens, all scored); ``"document"`` is
    the reference protocol (the text tokenized once, BOS only before the first window, whose first token is
    context). Given token ids instead of a tokenizer, the windows are cut from them as they are."""
    if isinstance(text, Path):
        text = text.read_text(encoding="utf-8")
    if torch.is_tensor(tokenizer_or_ids):
        ids, mode, lead = tokenizer_or_ids.reshape(-1)[:max_tokens], "as given", []
    else:
        if text is None:
            raise ValueError("perplexity needs text when given a tokenizer")
        mode = bos_mode(tokenizer_or_ids, bos)
        lead = [tokenizer_or_ids.bos_token_id] if mode == "window" else []
        ids = tokenize(tokenizer_or_ids, text, max_tokens, mode)
    span = seqlen - len(lead)  # text tokens per window
    stride = stride or span
    if not 0 < stride <= span:
        raise ValueError(f"need 0 < stride <= {span} (seqlen{' - 1 for the BOS' if lead else ''}), "
                         f"got stride={stride}, seqlen={seqlen}")
    if len(ids) < span:
        raise ValueError(f"{len(ids)} tokens are fewer than one window of {span}")
    device = device or next(model.parameters()).device
    lead = torch.tensor(lead, dtype=ids.dtype)
    starts = range(0, len(ids) - span + 1, stride)
    nll, count = 0.0, 0
    for s in tqdm(starts, desc=f"perplexity@{seqlen}", unit="win", disable=not progress, leave=False):
        window = torch.cat([lead, ids[s:s + span]]).to(device).unsqueeze(0)
        out = model(input_ids=window, use_cache=False)
        if getattr(out, "logits", None) is None:
            raise ValueError(f"perplexity needs a language model with logits; {type(model).__name__} returns none")
        logits = out.logits[0, :-1].float()
        targets = window[0, 1:]
        skip = 0 if s == 0 else max(0, len(targets) - stride)  # overlapping context is not scored twice
        nll += F.cross_entropy(logits[skip:], targets[skip:], reduction="sum").item()
        count += len(targets) - skip
    return Perplexity(math.exp(nll / count), seqlen, count, len(starts), mode)
