"""Token-by-token generation with a KV cache, streamed as it goes (the CLI and the server share it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .engine import Engine, Request, SamplingParams


@dataclass
class Token:
    id: int
    text: str  # the newly printable text this token adds (may be "" mid-character)


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids


def stream_generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    chat: bool = False, stop: tuple[str, ...] = ()) -> Iterator[Token]:
    """Yield generated tokens one at a time, stopping at EOS, a stop string or ``max_new_tokens``."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = encode_prompt(tokenizer, prompt, chat)
    # The engine's cache holds just this request; it refuses a prompt that does not fit the model's context.
    engine = Engine(model, tokenizer, max_batch=1, max_seq_len=len(ids) + max_new_tokens)
    req = Request(ids, SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                      top_p=top_p, seed=seed, stop=tuple(stop)))
    engine.add(req)
    while not req.done:
        n = len(req.output_ids)
        engine.step()
        delta = req.take_delta()
        if len(req.output_ids) > n and req.output_ids[-1] not in engine.eos:  # the EOS ends it, printing nothing
            yield Token(req.output_ids[-1], delta)
        elif delta:  # the final flush (a held-back stop-string prefix that was none, a partial character)
            yield Token(-1, delta)
