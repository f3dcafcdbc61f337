"""Incremental detokenization: the text each new token adds to a sequence, in context.

Decoding tokens one by one loses what a token's text depends on its neighbours for: SentencePiece drops the
leading space of a sequence's first token, and byte-level tokens can hold part of a UTF-8 character. So each
token's text is the decode of a short window that ends with it minus the decode of the window without it, and
text that ends in an incomplete character is held back until a later token completes it (or ``flush``). The
pieces concatenate to ``tokenizer.decode`` of the whole sequence (special tokens skipped)."""
from __future__ import annotations

from typing import Sequence

CONTEXT = 5  # prompt tokens kept as context for the first generated token (its leading space, merges)


class Detokenizer:
    def __init__(self, tokenizer, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(context[-CONTEXT:])  # the window: its first ``read`` tokens' text is out already
        self.read = len(self.ids)

    def _text(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def peek(self, token: int) -> str:
        """The text ``token`` would add next (with any held-back partial character), not committed."""
        return self._text(self.ids + [token])[len(self._text(self.ids[:self.read])):]

    def add(self, token: int) -> str:
        """Commit ``token``; returns the text that became complete ("" while a character is incomplete)."""
        self.ids.append(token)
        done, text = self._text(self.ids[:self.read]), self._text(self.ids)
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self.ids = self.ids[self.read:]  # the tokens just emitted are the next window's context
        self.read = len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """The held-back text as ``decode`` shows it (an incomplete character becomes U+FFFD)."""
        rest = self._text(self.ids)[len(self._text(self.ids[:self.read])):]
        self.read = len(self.ids)
        return rest


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's text in context; they join to ``tokenizer.decode(ids, skip_special_tokens=True)``."""
    d = Detokenizer(tokenizer)
    texts = [d.add(t) for t in ids]
    if texts:
        texts[-1] += d.flush()
    return texts
