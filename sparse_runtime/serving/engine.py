"""Generation engine: a static KV cache, batched prefill and decode, continuous batching.

The engine runs the model's own decoder (``model.get_decoder()``, so any residual-stream rotation or
family-specific scaling inside the HF modules applies unchanged) with a preallocated cache of
``max_batch`` slots. Running requests always occupy slots ``0..n-1``: decode reads the cache as a
view, and a finished request's slot is filled by moving the last one into it. New requests join at
step boundaries (prefilled together, right-padded), finished or aborted ones leave.
"""
from __future__ import annotations

import inspect
import itertools
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..data.calibration import context_length
from ..errors import SparseRuntimeError
from ..models.architecture import find_decoder_layers
from ..nn.fused_projections import fuse_projections
from .detokenize import Detokenizer


class ContextLengthError(SparseRuntimeError, ValueError):
    """A prompt and its max_tokens do not fit the context; ``param`` names the request field to shorten."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context: int):
        super().__init__(f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                         f"{context} tokens")
        self.param = "prompt" if prompt_tokens >= context else "max_tokens"


def check_context(prompt_tokens: int, max_tokens: int, context: int) -> None:
    """The one context-length rule: the prompt plus at least one generated token must fit."""
    if prompt_tokens + max(max_tokens, 1) > context:
        raise ContextLengthError(prompt_tokens, max_tokens, context)


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

@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None        # top-n logprobs per generated token, plus the chosen one's
    prompt_logprobs: bool = False      # also score the prompt (completions' echo + logprobs)
    ignore_eos: bool = False

    def check(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")


@dataclass
class TokenLogprob:
    token: int
    logprob: float | None              # None: the prompt's first token (nothing predicts it)
    top: list[tuple[int, float, str]]  # (token, logprob, text): the top n, then the chosen one if not among them
    text: str = ""                     # the text this token adds in context (see detokenize)


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    # Called from the engine's thread after every step that changed the request (new text or finished).
    on_update: Callable[["Request"], None] | None = None
    id: int = field(default_factory=itertools.count().__next__)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    text: str = ""                      # text so far, in the prompt's context (stop strings cut off)
    emitted: int = 0                    # characters of ``text`` already handed out by ``take_delta``
    finish_reason: str | None = None    # "stop", "length", "abort", or "error: ..."
    aborted: bool = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def take_delta(self) -> str:
        """The text that became final since the last call (held back: a tail that may start a stop string)."""
        safe = self._safe  # read before text: the engine writes text first (another thread may read)
        delta = self.text[self.emitted:safe]
        self.emitted = max(self.emitted, safe)
        return delta

    _safe: int = 0
    _gen: torch.Generator | None = None
    _detok: Detokenizer | None = None   # None once a stop string cut the text (nothing held back is wanted)


class LayerCache:
    """One layer's K/V in a :class:`StaticCache`, written where the cache says (its rows and positions).

    The regionally compiled decoder layer gets its own ``LayerCache`` in place of the cache, so nothing the traced
    layer reads depends on which layer it is (HF passes ``layer_idx``, unused here) and one graph serves every layer."""

    def __init__(self, cache: "StaticCache", k: torch.Tensor, v: torch.Tensor):
        self.cache, self.k, self.v = cache, k, v

    def update(self, key, value, *args, **kwargs):
        c, k, v = self.cache, self.k, self.v
        if c._pos is None:
            length = key.shape[2]
            k[c._rows, :, :length] = key
            v[c._rows, :, :length] = value
            return k[c._rows, :, :length], v[c._rows, :, :length]
        n = key.shape[0]  # decode's rows are 0..n-1: a size, not the slice's constant, so one graph serves every n
        rows = torch.arange(n, device=key.device)
        k[rows, :, c._pos] = key[:, :, 0]
        v[rows, :, c._pos] = value[:, :, 0]
        return k[:n, :, :c._kv_len], v[:n, :, :c._kv_len]

    def get_seq_length(self, *args) -> int:
        return self.cache.get_seq_length()


class StaticCache:
    """Preallocated K/V ``[slots, kv_heads, max_len, head_dim]`` per layer, written where the engine says.

    It implements the one method the HF attention modules call (``update``); the engine sets the rows
    and positions before each forward."""

    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (slots, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.layers = [LayerCache(self, k, v) for k, v in zip(self.k, self.v)]
        self.max_len = max_len
        self._rows: slice = slice(0, 0)
        self._pos: torch.Tensor | None = None  # decode: one position per row; prefill: None (write 0..L-1)
        self._kv_len = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def prefill_at(self, rows: slice) -> None:
        self._rows, self._pos = rows, None

    def decode_at(self, n: int, pos: torch.Tensor, kv_len: int) -> None:
        self._rows, self._pos, self._kv_len = slice(0, n), pos, kv_len

    def update(self, key, value, layer_idx, *args, **kwargs):
        return self.layers[layer_idx].update(key, value)

    def move(self, src: int, dst: int, length: int) -> None:
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def get_seq_length(self, layer_idx: int = 0) -> int:  # asked by some HF code paths; positions are explicit
        return 0


# Inductor settings of the compiled CPU decode step, per ``Engine(compile=...)`` mode.
# True: regional: the decoder layer is compiled once and that graph runs for every layer (dynamo traces one layer,
#   not all of them, and inductor generates one layer's code), the lm_head compiled as a region of its own, the
#   embedding and final norm eager around them. Every weight is read where the model holds it (one copy: the sparse kernel's compressed layout for 2:4
#   layers, the parameter for dense ones), and the compiled layer is cached across processes by inductor's FX graph
#   cache, so a warm start skips code generation.
# "max-autotune": the whole step as one graph (freezing makes each layer's weights constants of its own graph, so one
#   layer's graph cannot serve another), weights prepacked for inductor's C++ GEMM template, which streams dense
#   weights faster at decode's few rows, at the cost of a prepacked copy of every dense weight beside the model's and
#   no cross-process cache (mkldnn-packed constants cannot be pickled): every new process compiles and autotunes
#   again, for minutes.
# Both: no size asserts: the generated wrapper would recheck every graph input's and every fallback op's output size and
#   stride in Python on each call (dynamo's guards already check the inputs), about 1 us each, hundreds per SmolLM2
#   decode step, most of them around custom ops like the 2:4 kernel's (4 inputs and an output each).
_NO_ASSERTS = {"size_asserts": False}
CPU_COMPILE = {True: _NO_ASSERTS, "max-autotune": {**_NO_ASSERTS, "freezing": True, "max_autotune": True,
                                                   "max_autotune_gemm_backends": "CPP,ATEN"}}
CPU_REGIONAL = (True,)
COMPILE_MODES = (False, True, "max-autotune")


class Engine:
    """Continuous-batching generation over one model.

    ``add`` queues a request (thread-safe); ``step`` admits queued requests into free slots, prefills
    them, decodes one token for every running request and retires finished ones. ``generate`` runs a
    list of requests to completion; ``start`` runs ``step`` in a background thread (the server).

    The engine fuses each decoder layer's q/k/v and gate/up SparseLinears into one call each
    (:func:`~sparse_runtime.nn.fused_projections.fuse_projections`: the model's outputs and state dict are
    unchanged)."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_seq_len: int | None = None,
                 compile: bool | str = False, static: bool = False):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
        fuse_projections(model)
        cfg = model.config
        self.max_seq_len = min(context_length(model) or 2048, max_seq_len or 2048)
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.decoder, self.lm_head = model.get_decoder(), model.get_output_embeddings()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.cache = StaticCache(cfg.num_hidden_layers, max_batch, kv_heads, self.max_seq_len, head_dim,
                                 self.dtype, self.device)
        params = inspect.signature(self.decoder.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.eos = set(_as_list(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
                       + _as_list(tokenizer.eos_token_id))
        self.running: list[Request] = []
        self.lengths: list[int] = []           # tokens in the cache per running slot
        self.waiting: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._waiting_n = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        # compile: on CUDA the decode step is captured as CUDA graphs, which need one shape, so decode always
        # runs max_batch rows over the whole cache (static). On the CPU, dynamic shapes and CPU_COMPILE[compile].
        self._static = static or (compile and self.device.type == "cuda")
        self._decode_logits = self._logits_eager
        if compile and self.device.type == "cuda":
            self._decode_logits = torch.compile(self._logits_eager, mode="reduce-overhead", dynamic=False)
        elif compile in CPU_REGIONAL:
            # the lm_head is a region too: int8 heads become one fused pass over their codes
            self._regions = [*find_decoder_layers(model)[0], self.lm_head]
            self._region_forwards = _compiled_forwards(self._regions, self.cache)
            self._decode_logits = self._logits_regional
        elif compile:
            compiled = torch.compile(self._logits_eager, dynamic=True)

            settings = CPU_COMPILE[compile]

            def decode_logits(*args):  # any call may recompile; torch.compile(options=) does not reach freezing
                with torch._inductor.config.patch(settings):
                    return compiled(*args)
            self._decode_logits = decode_logits

    # ---- public API -------------------------------------------------------------------------
    def check(self, req: Request) -> None:
        req.params.check()
        if not req.prompt_ids:
            raise ValueError("the prompt encodes to no tokens")
        check_context(len(req.prompt_ids), req.params.max_tokens, self.max_seq_len)

    def add(self, req: Request) -> Request:
        self.check(req)
        if req.params.seed is not None:
            req._gen = torch.Generator().manual_seed(req.params.seed)
        req._detok = Detokenizer(self.tokenizer, req.prompt_ids)
        with self._lock:
            self._waiting_n += 1
        self.waiting.put(req)
        self._wake.set()
        return req

    @property
    def num_waiting(self) -> int:
        return self._waiting_n

    @property
    def num_running(self) -> int:
        return len(self.running)

    def abort(self, req: Request) -> None:
        req.aborted = True  # retired at the next step boundary
        self._wake.set()

    def generate(self, requests: list[Request]) -> list[Request]:
        """Run ``requests`` to completion in this thread (not with ``start``)."""
        for r in requests:
            self.add(r)
        while any(not r.done for r in requests):
            self.step()
        return requests

    def stream(self, req: Request) -> Iterator[str]:
        """Run one request in this thread, yielding its text as it becomes final."""
        self.add(req)
        while not req.done:
            self.step()
            delta = req.take_delta()
            if delta:
                yield delta
        delta = req.take_delta()
        if delta:
            yield delta

    def start(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="sparse-runtime-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = None) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- one scheduling step ----------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        self._retire(lambda r: r.aborted, "abort")
        new = []
        while len(self.running) + len(new) < self.max_batch:
            try:
                req = self.waiting.get_nowait()
            except queue.Empty:
                break
            with self._lock:
                self._waiting_n -= 1
            if not req.aborted:
                new.append(req)
            else:
                self._finish(req, "abort")
        decoding = len(self.running)
        if decoding:
            self._decode()
        if new:
            self._prefill(new)
        self._retire(lambda r: r.done, None)

    def _loop(self) -> None:
        while not self._stop:
            if not self.running and self.waiting.empty():
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as e:  # fail the requests in flight, keep serving
                for r in self.running:
                    self._finish(r, f"error: {e}")
                self._retire(lambda r: r.done, None)
        for r in self.running:
            self._finish(r, "abort")
        self.running, self.lengths = [], []
        while not self.waiting.empty():
            self._finish(self.waiting.get_nowait(), "abort")

    # ---- model calls ------------------------------------------------------------------------
    def _forward_eager(self, ids, pos, mask):
        h = self.decoder(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True,
                         **{self._cache_kw: self.cache}).last_hidden_state
        return h

    def _logits_eager(self, ids, pos, mask):
        # the class's forward, not an instance's relayed one (tensor_parallel.lead relays this call whole)
        return self.lm_head(Engine._forward_eager(self, ids, pos, mask)[:, -1]).float()

    def _logits_regional(self, ids, pos, mask):
        # The compiled layers run only inside the decode step: prefill, and other engines on this model, stay eager.
        held = [region.__dict__.get("forward") for region in self._regions]
        for region, forward in zip(self._regions, self._region_forwards):
            region.forward = forward
        try:
            return self._logits_eager(ids, pos, mask)
        finally:
            for layer, forward in zip(self._regions, held):
                del layer.forward
                if forward is not None:
                    layer.forward = forward

    def _prefill(self, new: list[Request]) -> None:
        s0 = len(self.running)
        lens = [len(r.prompt_ids) for r in new]
        L = max(lens)
        ids = torch.zeros(len(new), L, dtype=torch.long)
        for i, r in enumerate(new):
            ids[i, :lens[i]] = torch.tensor(r.prompt_ids)
        ids = ids.to(self.device)
        pos = torch.arange(L, device=self.device).expand(len(new), L)
        lens_t = torch.tensor(lens, device=self.device)
        keys = torch.arange(L, device=self.device)
        allowed = (keys[None, :] <= keys[:, None])[None] & (keys[None, None, :] < lens_t[:, None, None])
        self.cache.prefill_at(slice(s0, s0 + len(new)))
        h = self._forward_eager(ids, pos, self._additive(allowed[:, None]))
        last = h[torch.arange(len(new), device=self.device), lens_t - 1]
        logits = self.lm_head(last).float()
        for i, r in enumerate(new):
            if r.params.prompt_logprobs:
                r.prompt_logprobs = self._prompt_logprobs(h[i, :lens[i]], r.prompt_ids, r.params.logprobs or 0)
        self.running.extend(new)
        self.lengths.extend(lens)
        for i, r in enumerate(new):
            if r.params.max_tokens == 0:
                self._finish(r, "length")
            else:
                self._accept(r, logits[i])

    def _decode(self) -> None:
        n = len(self.running)
        ids = torch.tensor([r.output_ids[-1] for r in self.running], device=self.device)[:, None]
        pos = torch.tensor(self.lengths, device=self.device)
        kv_len = self.cache.max_len if self._static else max(self.lengths) + 1
        if self._static:  # pad to the full batch so every step has one shape (CUDA graphs)
            pad = self.max_batch - n
            ids = torch.cat([ids, ids.new_zeros(pad, 1)])
            pos = torch.cat([pos, pos.new_zeros(pad)])
        keys = torch.arange(kv_len, device=self.device)
        mask = self._additive((keys[None, :] <= pos[:, None])[:, None, None, :])
        self.cache.decode_at(ids.shape[0], pos, kv_len)
        logits = self._decode_logits(ids, pos[:, None], mask)[:n]
        for i, r in enumerate(self.running):
            self.lengths[i] += 1
            self._accept(r, logits[i])

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        return mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)

    def _prompt_logprobs(self, h, ids, top_n) -> list[TokenLogprob]:
        lp = self.lm_head(h[:-1]).float().log_softmax(-1)
        d = Detokenizer(self.tokenizer)
        out = []
        for t, tok in enumerate(ids):
            e = _token_logprob(lp[t - 1], tok, top_n, d) if t else TokenLogprob(tok, None, [])
            e.text = d.add(tok)
            out.append(e)
        out[-1].text += d.flush()
        return out

    # ---- per-request bookkeeping ------------------------------------------------------------
    def _accept(self, r: Request, logits: torch.Tensor) -> None:
        p = r.params
        tok = sample(logits, p.temperature, p.top_k or None, p.top_p, r._gen)
        eos = tok in self.eos and not p.ignore_eos
        # The alternatives' texts are peeked before the token is committed to the detokenizer.
        e = None if p.logprobs is None else _token_logprob(logits.log_softmax(-1), tok, p.logprobs, r._detok)
        # An EOS is an output token with its logprob (as OpenAI and vLLM return it), but adds no text.
        delta = "" if eos else r._detok.add(tok)
        r.output_ids.append(tok)
        if e is not None:  # complete before it is appended: the server's thread reads the list
            e.text = delta
            r.logprobs.append(e)
        if eos:
            self._finish(r, "stop")
            return
        self._add_text(r, delta)
        if r.done:
            return
        if len(r.output_ids) >= p.max_tokens:
            self._finish(r, "length")
        elif r.on_update is not None:
            r.on_update(r)

    def _add_text(self, r: Request, delta: str) -> None:
        text = r.text + delta
        for s in r.params.stop:
            at = text.find(s, max(0, len(r.text) - len(s) + 1))
            if s and at >= 0:
                r.text, r._detok = text[:at], None
                self._finish(r, "stop")
                return
        # Hold back any tail that could start a stop string (the detokenizer holds back partial characters).
        safe = len(text)
        for s in r.params.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        r.text, r._safe = text, max(r._safe, safe)

    def _finish(self, r: Request, reason: str) -> None:
        if r.done:
            return
        rest = r._detok.flush() if r._detok is not None else ""
        if rest:  # a partial character at the end shows as decode shows it
            if r.logprobs:
                r.logprobs[-1].text += rest
            r.text += rest
        r._safe = len(r.text)
        r.finish_reason = reason  # last: a reader that sees done also sees the final text
        if r.on_update is not None:
            r.on_update(r)

    def _retire(self, gone: Callable[[Request], bool], reason: str | None) -> None:
        i = 0
        while i < len(self.running):
            r = self.running[i]
            if not gone(r):
                i += 1
                continue
            if reason:
                self._finish(r, reason)
            last = len(self.running) - 1
            if i != last:  # keep running slots contiguous: move the last one into the hole
                self.cache.move(last, i, self.lengths[last])
                self.running[i], self.lengths[i] = self.running[last], self.lengths[last]
            self.running.pop()
            self.lengths.pop()


def _compiled_forwards(modules, cache: StaticCache) -> list[Callable]:
    """Each module's forward, run through one ``torch.compile`` of its class's forward (dynamo's cache is per code
    object: the first decoder layer compiles, the others hit its graph); the decoder layers come first, each with its
    own :class:`LayerCache` in place of ``cache``, then modules that take no cache. Hooks on a module still run,
    eagerly, around it."""
    compiled: dict[type, Callable] = {}
    for t in cache.k + cache.v:  # the cache's sizes are the engine's constants: no symbols, no duck-sizing guards
        torch._dynamo.mark_static(t)

    def forward_of(layer, view):
        if type(layer) not in compiled:
            compiled[type(layer)] = torch.compile(type(layer).forward, dynamic=True, options=CPU_COMPILE[True])
        fn = compiled[type(layer)]

        def forward(*args, **kwargs):
            args = tuple(view if a is cache else a for a in args)
            return fn(layer, *args, **{k: view if v is cache else v for k, v in kwargs.items()})
        return forward
    return [forward_of(module, view) for module, view in itertools.zip_longest(modules, cache.layers)]


def _token_logprob(lp: torch.Tensor, tok: int, top_n: int, detok: Detokenizer) -> TokenLogprob:
    """``tok``'s logprob and the top ``top_n`` alternatives, each with the text it would add after ``detok``'s
    sequence; the chosen token is always among them (OpenAI: up to logprobs + 1 entries)."""
    v, i = lp.topk(top_n) if top_n else (lp[:0], lp[:0].long())
    ids = i.tolist()
    if tok not in ids:
        ids.append(tok)
    return TokenLogprob(tok, float(lp[tok]), [(t, float(lp[t]), detok.peek(t)) for t in ids])


def _as_list(v) -> list:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]
