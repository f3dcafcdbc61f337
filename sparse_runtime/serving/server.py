"""OpenAI-compatible HTTP server (Starlette + uvicorn) over the generation engine.

Handlers run on the event loop; the engine steps in its own thread and wakes a handler through
``loop.call_soon_threadsafe`` whenever one of its requests has new text or finished."""
from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .engine import ContextLengthError, Engine, Request, SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code, self.headers = (
            status, message, param, type, code, headers)

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


_INT, _NUM, _BOOL, _STR = (int,), (int, float), (bool,), (str,)
# field -> accepted types; shared by both endpoints
_COMMON = {"model": _STR, "max_tokens": _INT, "temperature": _NUM, "top_p": _NUM, "top_k": _INT, "seed": _INT,
           "stop": (str, list), "stream": _BOOL, "stream_options": (dict,), "n": _INT, "user": _STR,
           "presence_penalty": _NUM, "frequency_penalty": _NUM}
COMPLETION_FIELDS = {**_COMMON, "prompt": (str, list), "echo": _BOOL, "logprobs": _INT}
CHAT_FIELDS = {**_COMMON, "messages": (list,), "max_completion_tokens": _INT}


def _validate(body, fields: dict, required: str) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for k, v in body.items():
        if k not in fields:
            raise APIError(400, f"unknown field '{k}'", k)
        if v is None:
            continue
        if isinstance(v, bool) and fields[k] is not _BOOL or not isinstance(v, fields[k]):
            names = " or ".join(t.__name__ for t in fields[k])
            raise APIError(400, f"'{k}' must be {names}, got {type(v).__name__}", k)
    if body.get(required) is None:
        raise APIError(400, f"'{required}' is required", required)
    if body.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", "n")
    for k in ("presence_penalty", "frequency_penalty"):
        if body.get(k):
            raise APIError(400, f"'{k}' is not supported (only 0)", k)
    return {k: v for k, v in body.items() if v is not None}


class Server:
    def __init__(self, engine: Engine, model_name: str, max_queue: int = 64, api_key: str | None = None,
                 request_timeout: float | None = None):
        self.engine, self.tok, self.model_name = engine, engine.tokenizer, model_name
        self.max_queue, self.api_key, self.request_timeout = max_queue, api_key, request_timeout
        self.created = int(time.time())
        self.app = Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ], lifespan=self._lifespan, exception_handlers={
            APIError: lambda req, e: e.response(),
            HTTPException: lambda req, e: APIError(e.status_code, e.detail, type="invalid_request_error").response(),
            Exception: lambda req, e: APIError(500, f"internal error: {e}", type="server_error").response(),
        })
        self.app.add_middleware(_Auth, api_key=api_key)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        if self.engine._thread is None:
            self.engine.start()
        yield
        self.engine.shutdown(5)

    # ---- routes -----------------------------------------------------------------------------
    async def health(self, request):
        return JSONResponse({"status": "ok", "running": self.engine.num_running, "waiting": self.engine.num_waiting})

    async def models(self, request):
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "sparse_runtime"}]})

    async def completions(self, request: HTTPRequest):
        body = _validate(await _json(request), COMPLETION_FIELDS, "prompt")
        prompts = self._prompts(body["prompt"])
        echo, logprobs = body.get("echo", False), body.get("logprobs")
        if logprobs is not None and not 0 <= logprobs <= 5:
            raise APIError(400, f"'logprobs' must be in [0, 5], got {logprobs}", "logprobs")
        params = self._params(body, body.get("max_tokens", 16), logprobs=logprobs,
                              prompt_logprobs=echo and logprobs is not None)
        if body.get("stream"):
            if echo and logprobs is not None:
                raise APIError(400, "echo with logprobs is not supported when streaming", "echo")
            return self._stream(body, prompts, params, "text_completion", echo)
        reqs = await self._run(prompts, params)
        choices = []
        for i, (ids, r) in enumerate(zip(prompts, reqs)):
            prefix = self.tok.decode(ids, skip_special_tokens=True) if echo else ""
            lp = None if logprobs is None else _logprobs((r.prompt_logprobs if echo else []) + r.logprobs)
            choices.append({"index": i, "text": prefix + r.text, "logprobs": lp, "finish_reason": r.finish_reason})
        return JSONResponse(self._envelope("cmpl", "text_completion", choices, reqs))

    async def chat(self, request: HTTPRequest):
        body = _validate(await _json(request), CHAT_FIELDS, "messages")
        ids = self._chat_ids(body["messages"])
        params = self._params(body, body.get("max_completion_tokens", body.get("max_tokens", 256)))
        if body.get("stream"):
            return self._stream(body, [ids], params, "chat.completion.chunk", False)
        (r,) = await self._run([ids], params)
        choice = {"index": 0, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                  "finish_reason": r.finish_reason}
        return JSONResponse(self._envelope("chatcmpl", "chat.completion", [choice], [r]))

    # ---- request building -------------------------------------------------------------------
    def _prompts(self, prompt) -> list[list[int]]:
        def one(p):
            if isinstance(p, str):
                return self.tok(p).input_ids
            if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                if any(not 0 <= t < len(self.tok) for t in p):
                    raise APIError(400, "'prompt' holds a token id outside the vocabulary", "prompt")
                return list(p)
            raise APIError(400, "'prompt' must be a string, a list of strings, or token ids", "prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return [one(prompt)]
        if isinstance(prompt, list):
            if not prompt:
                raise APIError(400, "'prompt' is empty", "prompt")
            return [one(p) for p in prompt]
        return [one(prompt)]

    def _chat_ids(self, messages) -> list[int]:
        if not messages:
            raise APIError(400, "'messages' is empty", "messages")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise APIError(400, "each message needs a string 'role' and 'content'", "messages")
            if m["role"] not in ("system", "user", "assistant"):
                raise APIError(400, f"unknown message role '{m['role']}'", "messages")
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            return self.tok(text, add_special_tokens=False).input_ids
        # No template (base models such as stories260K): the contents, one per line.
        return self.tok("\n".join(m["content"] for m in msgs)).input_ids

    def _params(self, body, max_tokens, logprobs=None, prompt_logprobs=False) -> SamplingParams:
        if body.get("model", self.model_name) != self.model_name:
            raise APIError(400, f"unknown model '{body['model']}' (this server has "
                           f"'{self.model_name}')", "model", code="model_not_found")
        stop = body.get("stop", [])
        stop = [stop] if isinstance(stop, str) else stop
        if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise APIError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
        if "stream_options" in body and not body.get("stream"):
            raise APIError(400, "'stream_options' needs 'stream': true", "stream_options")
        if max_tokens < 0 or (max_tokens == 0 and not prompt_logprobs):
            raise APIError(400, f"'max_tokens' must be >= 1, got {max_tokens}", "max_tokens")
        p = SamplingParams(max_tokens=max_tokens, temperature=float(body.get("temperature", 1.0)),
                           top_p=body.get("top_p"), top_k=body.get("top_k"), seed=body.get("seed"),
                           stop=tuple(stop), logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        for name in ("temperature", "top_p", "top_k"):
            try:
                SamplingParams(**{name: getattr(p, name)}).check()
            except ValueError as e:
                raise APIError(400, str(e), name) from None
        return p

    def _admit(self, prompts, params) -> list[Request]:
        for ids in prompts:  # all checked before any is queued
            try:
                self.engine.check(Request(ids, params))
            except ContextLengthError as e:
                raise APIError(400, str(e), e.param, code="context_length_exceeded") from None
            except ValueError as e:  # the parameters were checked already: what is left is the prompt
                raise APIError(400, str(e), "prompt") from None
        # Called on the event loop with no await in between: the check and the adds are one step.
        if self.engine.num_waiting + len(prompts) > self.max_queue:
            raise APIError(503, "the server is overloaded: the queue is full, retry later", type="server_error",
                           code="overloaded", headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        reqs = []
        for ids in prompts:
            ev = asyncio.Event()
            req = Request(list(ids), params)
            req.on_update = lambda r, ev=ev: loop.call_soon_threadsafe(ev.set)
            req.event = ev
            reqs.append(self.engine.add(req))
        return reqs

    async def _wait(self, req: Request, deadline: float | None) -> None:
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            raise asyncio.TimeoutError
        await asyncio.wait_for(req.event.wait(), timeout)
        req.event.clear()

    async def _run(self, prompts, params) -> list[Request]:
        reqs = self._admit(prompts, params)
        deadline = self._deadline()
        try:
            for r in reqs:
                while not r.done:
                    await self._wait(r, deadline)
        except asyncio.TimeoutError:
            raise APIError(504, f"the request took longer than {self.request_timeout} s", type="timeout",
                           code="timeout") from None
        finally:
            for r in reqs:
                if not r.done:
                    self.engine.abort(r)
        for r in reqs:
            if r.finish_reason.startswith("error"):
                raise APIError(500, r.finish_reason, type="server_error")
        return reqs

    def _deadline(self):
        return None if self.request_timeout is None else time.monotonic() + self.request_timeout

    # ---- responses --------------------------------------------------------------------------
    def _envelope(self, prefix, obj, choices, reqs) -> dict:
        out = {"id": f"{prefix}-{secrets.token_hex(12)}", "object": obj, "created": int(time.time()),
               "model": self.model_name, "choices": choices}
        if reqs is not None:
            prompt = sum(len(r.prompt_ids) for r in reqs)
            gen = sum(len(r.output_ids) for r in reqs)
            out["usage"] = {"prompt_tokens": prompt, "completion_tokens": gen, "total_tokens": prompt + gen}
        return out

    def _stream(self, body, prompts, params, obj, echo) -> StreamingResponse:
        reqs = self._admit(prompts, params)
        usage = (body.get("stream_options") or {}).get("include_usage", False)
        chat = obj == "chat.completion.chunk"
        base = self._envelope("chatcmpl" if chat else "cmpl", obj, [], None)

        def event(choices, **extra) -> str:
            chunk = {**base, "choices": choices, **extra}
            if usage and "usage" not in extra:
                chunk["usage"] = None
            return f"data: {json.dumps(chunk)}\n\n"

        def choice(i, text, finish=None, role=False, logprobs=None):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}

        async def gen():
            deadline = self._deadline()
            try:
                for i, r in enumerate(reqs):
                    if chat:
                        yield event([choice(i, "", role=True)])
                    elif echo:
                        yield event([choice(i, self.tok.decode(r.prompt_ids, skip_special_tokens=True))])
                    sent, offset = 0, 0  # logprob entries sent, and the length of their text
                    while True:
                        done = r.done
                        delta = r.take_delta()
                        new = r.logprobs[sent:]  # sent even without text (the EOS)
                        if delta or new:
                            lp = None if params.logprobs is None else _logprobs(new, offset)
                            sent, offset = sent + len(new), offset + sum(len(e.text) for e in new)
                            yield event([choice(i, delta, logprobs=lp)])
                        if done:
                            break
                        await self._wait(r, deadline)
                    if r.finish_reason.startswith("error"):
                        yield _error_event(r.finish_reason, "server_error")
                        break
                    yield event([choice(i, "", r.finish_reason)])
                if usage:
                    full = self._envelope("", "", [], reqs)["usage"]
                    yield event([], usage=full)
            except asyncio.TimeoutError:
                yield _error_event(f"the request took longer than {self.request_timeout} s", "timeout")
            finally:  # also on a client disconnect (the generator is cancelled): free the batch slots
                for r in reqs:
                    if not r.done:
                        self.engine.abort(r)
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _logprobs(entries, offset: int = 0) -> dict:
    """Completions' ``logprobs`` object; ``offset``: where the first entry's text starts in the choice's text."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.text)
    return {"tokens": [e.text for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [None if e.logprob is None else {text: lp for _, lp, text in e.top} for e in entries],
            "text_offset": offsets}


def _error_event(message: str, type: str) -> str:
    return f"data: {json.dumps({'error': {'message': message, 'type': type, 'param': None, 'code': None}})}\n\n"


async def _json(request: HTTPRequest):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


class _Auth:
    """ASGI middleware: with an API key, /v1/* needs ``Authorization: Bearer <key>`` (else 401)."""

    def __init__(self, app, api_key: str | None):
        self.app, self.key = app, api_key

    async def __call__(self, scope, receive, send):
        if self.key and scope["type"] == "http" and scope["path"].startswith("/v1/"):
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not secrets.compare_digest(auth.encode(), f"Bearer {self.key}".encode()):
                return await APIError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                      type="authentication_error", code="invalid_api_key"
                                      ).response()(scope, receive, send)
        await self.app(scope, receive, send)
