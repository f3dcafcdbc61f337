"""benchmarks.engine and benchmarks.serve_load: their measurements, against stubs whose speed is known, and their
reports end to end on stories260K (tiny settings), as the tables read them."""
import argparse
import http.server
import json
import subprocess
import sys
import threading
import time
import types

import pytest
import torch

from benchmarks import engine, serve_load, tables
from benchmarks.common import module_env

STEP, PREFILL, HF_STEP = 0.03, 0.05, 0.05  # seconds: a decode step of the stub engine, its prefill, generate's step


class StubEngine:
    """Takes PREFILL, then STEP per token for the whole batch, whatever the batch: b / STEP tokens/s."""

    def __init__(self, model, tok, max_batch, max_seq_len, compile=False):
        self.max_batch = max_batch
        self.cache = types.SimpleNamespace(nbytes=0)

    def generate(self, requests):
        assert len(requests) <= self.max_batch
        time.sleep(PREFILL + requests[0].params.max_tokens * STEP)
        return requests


class StubModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4))

    def generate(self, x, max_new_tokens, **kwargs):
        time.sleep(PREFILL + max_new_tokens * HF_STEP)


def test_engine_measures_the_rates_of_an_engine_of_known_speed(monkeypatch):
    monkeypatch.setattr(engine, "Engine", StubEngine)
    args = argparse.Namespace(tokens=5, repeats=3, batches=[1, 4], prefill_batch=2, compile=False, device="cpu",
                              decode_prompt_tokens=4)
    ids = list(range(8))
    res = engine.measure(StubModel(), None, ids, args, engine.timer("cpu"), dense=False)
    d = res["decode_tokens_per_s"]
    # prefill and the first token cancel out of the decode rates
    assert d["engine_b1"] == pytest.approx(1 / STEP, rel=0.1)
    assert d["engine_b4"] == pytest.approx(4 / STEP, rel=0.1)
    assert d["hf_generate_b1"] == pytest.approx(1 / HF_STEP, rel=0.1)
    assert res["ttft_s"] == pytest.approx(PREFILL + STEP, rel=0.1)  # one token's request
    assert res["prefill_tokens_per_s"] == pytest.approx(2 * len(ids) / (PREFILL + STEP), rel=0.1)
    assert res["model_bytes"] == 16


class PacedModel(StubModel):
    def __init__(self, step: float):
        super().__init__()
        self.step = step


class PacedEngine(StubEngine):
    """A StubEngine taking its model's step per token."""

    def __init__(self, model, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        self.step = model.step

    def generate(self, requests):
        time.sleep(PREFILL + requests[0].params.max_tokens * self.step)
        return requests


def test_head_to_head_times_two_engines_of_known_speed(monkeypatch):
    steps = {"dense-int8": STEP, "2:4-int8": STEP / 2}
    monkeypatch.setattr(engine, "load_variant", lambda args, v: (PacedModel(steps[v]), None, list(range(8))))
    monkeypatch.setattr(engine, "Engine", PacedEngine)
    args = argparse.Namespace(tokens=4, decode_prompt_tokens=4, compile=False)
    h = engine.head_to_head(args, ["dense-int8", "2:4-int8"], rounds=3)
    assert [len(h["ms_per_token"][v]) for v in steps] == [3, 3]
    assert h["tokens_per_s"]["dense-int8"] == pytest.approx(1 / STEP, rel=0.1)
    assert h["ratio"] == pytest.approx(2, rel=0.15)  # prefill and the first token cancel


@pytest.mark.parametrize("argv", [["--head-to-head", "dense-int8", "2:4-int9"], ["--head-to-head", "dense-int8"]])
def test_head_to_head_refuses_unknown_variants_and_a_single_one(argv, capsys):
    with pytest.raises(SystemExit):
        engine.main(argv)
    assert "--head-to-head" in capsys.readouterr().err


MIB = 1 << 20
CACHE, STEP_PEAK, HF_PEAK = 48 * MIB, 96 * MIB, 256 * MIB  # bytes: the stubs' KV cache and transient allocations


def touched(nbytes: int) -> torch.Tensor:
    return torch.ones(nbytes // 4)  # written, so resident


class HeavyStubEngine(StubEngine):
    """Holds a KV cache of CACHE bytes and allocates STEP_PEAK more while it generates."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kv = touched(CACHE)
        self.cache = types.SimpleNamespace(nbytes=self.kv.nbytes)

    def generate(self, requests):
        touched(STEP_PEAK)
        return super().generate(requests)


class HeavyStubModel(StubModel):
    def generate(self, x, max_new_tokens, **kwargs):  # transformers' generate, measured after the peak is read
        touched(HF_PEAK)
        super().generate(x, max_new_tokens, **kwargs)


def test_engine_reads_the_peak_memory_of_its_own_engine_alone(monkeypatch):
    """The peak is the engine's (its cache, its decode's transient memory) above the baseline, read before generate,
    the eager engine and the bandwidth buffer (1 GiB) allocate more."""
    monkeypatch.setattr(engine, "Engine", HeavyStubEngine)
    args = argparse.Namespace(tokens=2, repeats=1, batches=[1, 2], prefill_batch=2, compile=True, device="cpu",
                              decode_prompt_tokens=4)
    baseline = engine.reset_peak("cpu")
    m = engine.measure(HeavyStubModel(), None, list(range(8)), args, engine.timer("cpu"), dense=True,
                       baseline=baseline)["memory"]
    assert m["baseline_bytes"] == baseline and m["kv_cache_bytes"] == CACHE
    assert m["above_baseline_bytes"] == pytest.approx(CACHE + STEP_PEAK, abs=8 * MIB)
    assert m["budget_bytes"] == int(engine.MEMORY_TARGET * 16) + CACHE and not m["met"]


def test_the_architectures_code_is_imported_before_the_baseline(stories_dir):
    """Code (the model's transformers module, torch's compiler) is imported before the baseline is read, so a
    variant's peak counts its model, caches and compiled state, not the libraries (a fresh interpreter: this one
    has them already)."""
    code = ("import sys, argparse; from benchmarks.engine import import_library_code as f; "
            "mods = ('transformers.models.llama.modeling_llama', 'torch._inductor.compile_fx'); "
            "assert not any(m in sys.modules for m in mods); "
            f"added = f(argparse.Namespace(config=None, model={str(stories_dir)!r})); "
            "assert all(m in sys.modules for m in mods) and added > 0, added")
    subprocess.run([sys.executable, "-c", code], check=True, env=module_env(), timeout=120)
    assert engine.memory_report(0, 10, 4, 1, library_code=7)["library_code_bytes"] == 7


TTFT, REST, TOKENS = 0.2, 0.3, 5  # seconds to the first text, then to the end; completion tokens per request


class StubServer(http.server.BaseHTTPRequestHandler):
    """Streams one completion: an event without text at once, the first text TTFT later, the last event (with
    usage) REST after that, then [DONE]."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.wfile.write(b'data: {"choices": [{"text": ""}]}\n\n')
        self.wfile.flush()
        time.sleep(TTFT)
        self.wfile.write(b'data: {"choices": [{"text": "a"}]}\n\n')
        self.wfile.flush()
        time.sleep(REST)
        self.wfile.write(b'data: {"choices": [{"text": "b"}], "usage": {"completion_tokens": %d}}\n\n' % TOKENS)
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args):
        pass


def test_serve_load_measures_the_latencies_and_rates_of_a_server_of_known_speed():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StubServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        # 8 requests from 4 clients: two waves of TTFT + REST each (and the client set up, ~0.1 s)
        lo = serve_load.load(f"http://127.0.0.1:{httpd.server_port}", requests=8, clients=4, max_tokens=TOKENS)
    finally:
        httpd.shutdown()
    wall = 2 * (TTFT + REST)
    assert lo["failed"] == 0
    assert lo["ttft_s"]["p50"] == pytest.approx(TTFT, rel=0.2)
    assert lo["latency_s"]["p50"] == pytest.approx(TTFT + REST, rel=0.15)
    assert lo["requests_per_s"] == pytest.approx(8 / wall, rel=0.15)
    assert lo["generated_tokens_per_s"] == pytest.approx(8 * TOKENS / wall, rel=0.15)


def test_engine_benchmark_report(stories_dir, tmp_path, monkeypatch):
    out = tmp_path / "engine.json"
    assert engine.main(["--model", str(stories_dir), "--batches", "1", "4", "--tokens", "5", "--repeats", "1",
                        "--prompt-tokens", "32", "--prefill-batch", "2", "--no-compile", "--out", str(out),
                        "--head-to-head", "dense", "2:4"]) == 0
    r = json.loads(out.read_text())
    assert set(r["variants"]) == {"dense", "2:4"} and out.with_suffix(".png").exists()
    assert r["head_to_head"]["variants"] == ["dense", "2:4"] and len(r["head_to_head"]["ms_per_token"]["2:4"]) == 4
    for v in r["variants"].values():  # each variant's process held its model and its KV cache at its peak
        m = v["memory"]
        assert m["peak_bytes"] - m["baseline_bytes"] == m["above_baseline_bytes"] >= v["model_bytes"] // 2
        assert m["kv_cache_bytes"] > 0 and m["budget_bytes"] == int(1.5 * v["model_bytes"]) + m["kv_cache_bytes"]
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    assert "| dense | " in tables.engine() and "| 2:4 | " in tables.engine()
    assert "Head to head in one process, runs alternating (4 rounds, median): 2:4 " in tables.engine()


def test_serve_load_benchmark_report(stories_dir, tmp_path, monkeypatch):
    out = tmp_path / "serve_load.json"
    assert serve_load.main(["--model", str(stories_dir), "--requests", "12", "--clients", "4",
                            "--max-tokens", "4", "--overload-extra", "4", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    lo, ov = r["load"], r["overload"]
    assert lo["failed"] == 0 and lo["requests"] == 12
    # a tiny model can finish an admitted request while the extras arrive: those are admitted and must succeed
    assert ov["admitted_ok"] == 3 and ov["rejected_503"] >= 1 and ov["rejected_503"] == ov["rejected_with_retry_after"]
    assert ov["rejected_503"] + ov["other_ok"] == 4
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    assert "| load: 4 clients, 4 tokens each | 12 | 12 | 0 |" in tables.serve_load()
