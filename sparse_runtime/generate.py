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


@torch.inference_mode()
def stream_generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    chat: bool = False) -> Iterator[Token]:
    """Yield generated tokens one at a time, stopping at EOS or ``max_new_tokens``."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    ids = encode_prompt(tokenizer, prompt, chat)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    ctx = getattr(model.config, "max_position_embeddings", None)
    if ctx and len(ids) + max_new_tokens > ctx:
        raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of {ctx}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    eos = set(_as_list(getattr(model.generation_config, "eos_token_id", None)) + _as_list(tokenizer.eos_token_id))
    x = torch.tensor([ids], device=device)
    past, out, shown = None, [], ""
    for _ in range(max_new_tokens):
        step = model(input_ids=x, past_key_values=past, use_cache=True)
        past = step.past_key_values
        nxt = sample(step.logits[0, -1], temperature, top_k, top_p, gen)
        if nxt in eos:
            return
        out.append(nxt)
        text = tokenizer.decode(out, skip_special_tokens=True)
        # Hold back a trailing partial UTF-8 character until the next token completes it.
        printable = text[:-1] if text.endswith("\ufffd") else text
        delta = printable[len(shown):] if printable.startswith(shown) else ""
        shown = printable if printable.startswith(shown) else shown
        yield Token(nxt, delta)
        x = torch.tensor([[nxt]], device=device)


def _as_list(v) -> list:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]
