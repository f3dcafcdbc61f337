"""Token-by-token generation with a KV cache, streamed as it goes (the CLI and the server share it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass
class Token:
    id: int
    text: str  # the newly printable text this token adds (may be "" mid-character)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> int:
    """Pick the next token from ``[vocab]`` logits: greedy at temperature 0."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float()
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


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
    from .engine import Engine, Request, SamplingParams

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = encode_prompt(tokenizer, prompt, chat)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    ctx = getattr(model.config, "max_position_embeddings", None)
    if ctx and len(ids) + max_new_tokens > ctx:
        raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of {ctx}")
    engine = Engine(model, tokenizer, max_batch=1, max_seq_len=len(ids) + max_new_tokens)
    req = Request(ids, SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                      top_p=top_p, seed=seed, stop=tuple(stop)))
    engine.add(req)
    while not req.done:
        n = len(req.output_ids)
        engine.step()
        delta = req.take_delta()
        if len(req.output_ids) > n:
            yield Token(req.output_ids[-1], delta)
        elif delta:  # the final flush (a held-back stop-string prefix that turned out not to be one)
            yield Token(-1, delta)
