"""The real server over real HTTP on loopback (ephemeral ports, bounded request loops)."""
import concurrent.futures as cf
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

from sparse_runtime.serving.engine import ContextLengthError, Engine, Request, SamplingParams
from sparse_runtime.serving.server import Server
from test_engine import EOS_PROMPT, eos_model, stories  # noqa: F401  (fixtures: stories260K, EOS after EOS_PROMPT)

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["Once upon a time", "The little dog", "Tom had a red ball.", "Sun"]


@contextlib.contextmanager
def serve(stories, max_batch=4, **kw):
    model, tok = stories
    server = Server(Engine(model, tok, max_batch=max_batch, max_seq_len=256), "stories260K", **kw)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(server.app, log_level="warning"))
    t = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        uv.should_exit = True
        t.join(30)


@pytest.fixture(scope="module")
def url(stories):
    with serve(stories, max_queue=512) as u:
        yield u


def alone(stories, prompt, n):
    model, tok = stories
    r = Request(tok(prompt).input_ids, SamplingParams(max_tokens=n))
    return Engine(model, tok, 1).generate([r])[0]


def sse(response) -> list:
    """Parse a raw SSE body strictly: every event is 'data: <json>' + blank line, the last is [DONE]."""
    raw = response.text
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    return [json.loads(e[6:]) for e in events[:-1]]


def test_health_and_models(url):
    assert httpx.get(f"{url}/health", timeout=60).json()["status"] == "ok"
    models = httpx.get(f"{url}/v1/models", timeout=60).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "stories260K"


def test_completion_matches_engine_alone(url, stories):
    r = httpx.post(f"{url}/v1/completions", json={"model": "stories260K", "prompt": PROMPTS[0], "max_tokens": 12,
                                                 "temperature": 0}).json()
    ref = alone(stories, PROMPTS[0], 12)
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-")
    assert r["choices"][0]["text"] == ref.text and r["choices"][0]["finish_reason"] == "length"
    assert r["usage"] == {"prompt_tokens": len(ref.prompt_ids), "completion_tokens": 12,
                          "total_tokens": len(ref.prompt_ids) + 12}


def test_streaming_completion_format(url):
    body = {"prompt": PROMPTS[1], "max_tokens": 10, "temperature": 0}
    whole = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    r = httpx.post(f"{url}/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}, timeout=60)
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = sse(r)
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == whole["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])


def test_streaming_chat_format_and_openai_client(url):
    messages = [{"role": "user", "content": "Once upon a time"}]
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0,
                                                       "stream": True})
    chunks = sse(r)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert deltas[-1] == {} and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(set(d) == {"content"} and d["content"] for d in deltas[1:-1])
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    whole = client.chat.completions.create(model="stories260K", messages=messages, max_tokens=8, temperature=0)
    assert whole.choices[0].message.content == "".join(d.get("content", "") for d in deltas)
    streamed = client.chat.completions.create(model="stories260K", messages=messages, max_tokens=8, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == whole.choices[0].message.content
    comp = client.completions.create(model="stories260K", prompt="Sun", max_tokens=5, temperature=0, stop=["\n"])
    assert comp.choices[0].finish_reason in ("length", "stop")


def test_echo_logprobs_like_lm_eval(url, stories):
    model, tok = stories
    prompt = "Once upon a time there was a"
    r = httpx.post(f"{url}/v1/completions", json={"model": "stories260K", "prompt": prompt, "max_tokens": 1,
                                                 "logprobs": 1, "echo": True, "temperature": 0, "seed": 1234}).json()
    lp = r["choices"][0]["logprobs"]
    ids = tok(prompt).input_ids
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    assert r["choices"][0]["text"].startswith(tok.decode(ids, skip_special_tokens=True))
    assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    for t in range(1, len(ids)):
        assert lp["token_logprobs"][t] == pytest.approx(float(ref[t - 1, ids[t]]), abs=1e-4)
        top = lp["top_logprobs"][t]  # the top 1, and the prompt's token when it is not that one (OpenAI: n + 1)
        assert max(top.values()) == pytest.approx(float(ref[t - 1].max()), abs=1e-4)
        assert top[lp["tokens"][t]] == lp["token_logprobs"][t] and len(top) == 1 + (ids[t] != ref[t - 1].argmax())
    assert lp["token_logprobs"][-1] == pytest.approx(float(ref[-1].max()), abs=1e-4)
    assert lp["text_offset"] == sorted(lp["text_offset"])
    # lm-eval scoring the continuation after "<s> Once": every prompt token after it, and whether each is greedy
    scored = range(2, len(ids))
    assert lm_eval_score(r, 2) == (pytest.approx(float(sum(ref[t - 1, ids[t]] for t in scored)), abs=1e-3),
                                   all(ids[t] == ref[t - 1].argmax() for t in scored))
    # token-id prompts (lm-eval's tokenized requests) score the same
    r2 = httpx.post(f"{url}/v1/completions", json={"prompt": [ids], "max_tokens": 1, "logprobs": 1, "echo": True,
                                                  "temperature": 0}).json()
    assert r2["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"]


def lm_eval_score(response, ctxlen):
    """lm-evaluation-harness's reading of an echo + logprobs + max_tokens=1 answer (openai_completions.py
    parse_logprobs): the continuation is tokens [ctxlen, -1), the last entry being the generated token."""
    lp = response["choices"][0]["logprobs"]
    scored, tops = lp["token_logprobs"][ctxlen:-1], lp["top_logprobs"][ctxlen:-1]
    return sum(scored), all(t == max(top.values()) for t, top in zip(scored, tops))


def test_eos_is_returned_with_its_logprob(eos_model):
    """The EOS that ends a completion is a token of the answer (as OpenAI and vLLM return it): its logprob is
    there, it counts in completion_tokens, and it adds no text; echo or not, streaming or not."""
    model, tok, ids, ref = eos_model
    eos_lp = pytest.approx(float(ref[-1, tok.eos_token_id]), abs=1e-4)
    prompt_text = tok.decode(ids, skip_special_tokens=True)
    with serve((model, tok)) as u:
        for echo, max_tokens in ((True, 1), (False, 5)):
            r = httpx.post(f"{u}/v1/completions", json={"prompt": EOS_PROMPT, "max_tokens": max_tokens, "logprobs": 1,
                                                       "echo": echo, "temperature": 0}, timeout=60).json()
            choice, lp = r["choices"][0], r["choices"][0]["logprobs"]
            n = len(ids) if echo else 0
            assert choice["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 1
            assert choice["text"] == (prompt_text if echo else "")
            assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == n + 1
            assert lp["tokens"][-1] == "" and lp["token_logprobs"][-1] == eos_lp
            assert lp["top_logprobs"][-1] == {"": eos_lp} and lp["text_offset"][-1] == len(choice["text"])
            for t in range(1, n):
                assert lp["token_logprobs"][t] == pytest.approx(float(ref[t - 1, ids[t]]), abs=1e-4)
            if echo:  # lm-eval now scores the whole prompt continuation, its last token included
                assert lm_eval_score(r, 1)[0] == pytest.approx(float(sum(ref[t - 1, ids[t]] for t in range(1, n))),
                                                               abs=1e-3)
        r = httpx.post(f"{u}/v1/completions", json={"prompt": EOS_PROMPT, "max_tokens": 5, "logprobs": 1,
                                                   "temperature": 0, "stream": True,
                                                   "stream_options": {"include_usage": True}}, timeout=60)
        chunks = sse(r)
        assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["", ""]
        lp = chunks[0]["choices"][0]["logprobs"]
        assert lp["tokens"] == [""] and lp["token_logprobs"] == [eos_lp] and lp["text_offset"] == [0]
        assert chunks[1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["completion_tokens"] == 1


def test_text_tokens_and_offsets_keep_sentencepiece_spaces(url, stories):
    """Text is decoded in context, so SentencePiece's spaces stay ("there was", not "therewas"), the completion
    keeps its leading space, byte-fallback characters are whole, and tokens / text_offset index the text."""
    model, tok = stories
    for prompt in (EOS_PROMPT, "Lily saw a café in 日本. She"):
        ids = tok(prompt).input_ids
        out = alone(stories, prompt, 8).output_ids
        whole = tok.decode(ids + out, skip_special_tokens=True)
        body = {"prompt": prompt, "max_tokens": 8, "logprobs": 2, "temperature": 0}
        echoed = httpx.post(f"{url}/v1/completions", json={**body, "echo": True}, timeout=60).json()["choices"][0]
        plain = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]
        stream = sse(httpx.post(f"{url}/v1/completions", json={**body, "stream": True}, timeout=60))
        assert echoed["text"] == whole and whole.startswith(prompt)
        assert plain["text"] == whole[len(prompt):] == "".join(c["choices"][0]["text"] for c in stream)
        assert plain["text"].startswith(" ")
        streamed = [c["choices"][0]["logprobs"] for c in stream[:-1]]
        assert sum((lp["tokens"] for lp in streamed), []) == plain["logprobs"]["tokens"]
        assert sum((lp["text_offset"] for lp in streamed), []) == plain["logprobs"]["text_offset"]
        for choice in (echoed, plain):
            lp = choice["logprobs"]
            assert len(lp["tokens"]) == (len(ids) if choice is echoed else 0) + len(out)
            assert "".join(lp["tokens"]) == choice["text"] and "<s>" not in lp["tokens"]
            for i, (piece, at) in enumerate(zip(lp["tokens"], lp["text_offset"])):
                assert at == len("".join(lp["tokens"][:i])) and choice["text"][at:at + len(piece)] == piece
                if piece.isascii() and piece and lp["top_logprobs"][i] is not None:  # keys read in context too
                    assert lp["top_logprobs"][i][piece] == lp["token_logprobs"][i]


def test_logprobs_zero_returns_the_chosen_token(url):
    """OpenAI: logprobs=n gives the n most likely tokens and always the chosen one; n=0 leaves just that one."""
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 4, "logprobs": 0,
                                                 "echo": True, "temperature": 0}, timeout=60).json()
    lp = r["choices"][0]["logprobs"]
    assert lp["top_logprobs"][0] is None and lp["token_logprobs"][0] is None and len(lp["tokens"]) > 5
    for piece, value, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert top == {piece: value} and value <= 0


def test_context_length_refusal_is_the_engines(url, stories):
    """The server refuses with the engine's one rule and message, before queueing any of the prompts."""
    ids = stories[1]("Once upon a time").input_ids
    cases = [({"prompt": "Once upon a time", "max_tokens": 300}, ContextLengthError(len(ids), 300, 256)),
             ({"prompt": [[5, 6], [1] * 256], "max_tokens": 1}, ContextLengthError(256, 1, 256)),
             ({"prompt": "Once upon a time", "max_tokens": 300, "stream": True}, ContextLengthError(len(ids), 300, 256))]
    for body, want in cases:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"] == {"message": str(want), "type": "invalid_request_error",
                                                              "param": want.param, "code": "context_length_exceeded"}
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                      "max_tokens": 300}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.get(f"{url}/health", timeout=60).json()["waiting"] == 0


def test_200_concurrent_requests_no_failures_and_outputs_as_alone(url, stories):
    refs = {p: alone(stories, p, 4).text for p in PROMPTS}

    def one(i):
        p = PROMPTS[i % len(PROMPTS)]
        r = httpx.post(f"{url}/v1/completions", json={"prompt": p, "max_tokens": 4, "temperature": 0}, timeout=60)
        return r.status_code, p, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text

    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(200)))
    assert [s for s, _, _ in results] == [200] * 200
    assert all(text == refs[p] for _, p, text in results)


def test_overload_answers_503_fast_and_keeps_serving(stories):
    with serve(stories, max_batch=1, max_queue=2) as u:
        body = {"prompt": "Once upon a time", "max_tokens": 150, "temperature": 0}

        def one(_):
            t0 = time.monotonic()
            r = httpx.post(f"{u}/v1/completions", json=body, timeout=120)
            return r, time.monotonic() - t0

        with cf.ThreadPoolExecutor(10) as pool:
            results = list(pool.map(one, range(10)))
        codes = sorted(r.status_code for r, _ in results)
        assert 503 in codes and 200 in codes and set(codes) == {200, 503}
        for r, dt in results:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded"
                assert dt < 5  # answered at once (generous: the CPU is shared), not after the queue drains
            else:
                assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_api_key(stories):
    with serve(stories, api_key="sekrit") as u:
        r = httpx.get(f"{u}/v1/models", timeout=60)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{u}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=60).status_code == 401
        assert httpx.get(f"{u}/v1/models", headers={"Authorization": "Bearer sekrit"}, timeout=60).status_code == 200
        assert httpx.get(f"{u}/health", timeout=60).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{u}/v1", api_key="nope", max_retries=0).models.list()


@pytest.mark.parametrize("body, param", [
    ("{not json", None),
    ([1, 2], None),
    ({"prompt": "x", "bogus": 1}, "bogus"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x", "max_tokens": "3"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**9}, "max_tokens"),
    ({"prompt": "x " * 400, "max_tokens": 1}, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, "model"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 2}, "top_p"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "logprobs": 9}, "logprobs"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": [99999]}, "prompt"),
    ({}, "prompt"),
])
def test_bad_completion_requests_are_400(url, body, param):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{url}/v1/completions", content=content, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if param:
        assert param in err["message"]


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}}, "stream_options"),
])
def test_bad_chat_requests_are_400(url, body, param):
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_unknown_route_is_openai_shaped_404(url):
    r = httpx.get(f"{url}/v1/nothing", timeout=60)
    assert r.status_code == 404 and "error" in r.json()


def test_disconnect_frees_the_slot_and_timeout_gives_504(stories):
    with serve(stories, max_batch=1, request_timeout=2.0) as u:
        with httpx.stream("POST", f"{u}/v1/completions", json={"prompt": "Once", "max_tokens": 200,
                                                                "stream": True}, timeout=60) as r:
            next(r.iter_lines())
        deadline = time.monotonic() + 30
        while httpx.get(f"{u}/health", timeout=60).json()["running"]:
            assert time.monotonic() < deadline, "the disconnected request kept its slot"
            time.sleep(0.05)
        ok = httpx.post(f"{u}/v1/completions", json={"prompt": "Sun", "max_tokens": 3}, timeout=60)
        assert ok.status_code == 200
        slow = httpx.post(f"{u}/v1/completions", json={"prompt": "Once", "max_tokens": 200, "stop": ["@@@"],
                                                       "temperature": 1.0, "seed": 0}, timeout=60)
        if slow.status_code != 200:  # 200 tokens can finish within 2 s on an idle machine
            assert slow.status_code == 504 and slow.json()["error"]["code"] == "timeout"


def test_cli_serve_sigterm_exits_zero(stories_dir):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "sparse_runtime", "serve", "--model", str(stories_dir), "--port", "0",
                          "--device", "cpu", "--max-seq-len", "128", "--threads", "1"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        for _ in range(100):  # model loading may print progress lines first
            line = p.stderr.readline()
            if "serving" in line or not line:
                break
        assert "serving" in line, line
        base = line.split(" on ")[1].split()[0]
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "Once", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_cli_serve_listens_before_printing_its_address(stories_dir, monkeypatch):
    """A client that connects as soon as the address is printed is queued, not refused: the socket listens before
    the line is printed (uvicorn would only listen once it has started, after it)."""
    from sparse_runtime.cli import main

    seen = {}

    def run(self, sockets):  # in place of uvicorn's serving: what state is the printed socket in?
        seen["listening"] = sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        sockets[0].close()

    monkeypatch.setattr(uvicorn.Server, "run", run)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert main(["serve", "--model", str(stories_dir), "--port", "0", "--device", "cpu", "--max-seq-len",
                     "128"]) == 0
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert seen == {"listening": 1}
