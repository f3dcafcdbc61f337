"""Engine decode speed on the CPU vs transformers' ``generate``, and a bounded HTTP load test.

    python benchmarks/serve_bench.py --threads 1            # SmolLM2-135M, ~4 minutes on a quiet 2-core CPU

Decode tokens/s = (N - 1) / (time to generate N tokens - time to generate 1 token): the prefill and the first
token cancel out. Every run is greedy with EOS ignored, so each one makes exactly N tokens; each timing is the
median of --repeats runs. Targets (issue 11): engine batch 1 >= 1.5x transformers' generate; engine batch 8
aggregate >= 4x engine batch 1. The load test sends --requests completions from --clients concurrent
clients to a real server on 127.0.0.1 and counts failures. Writes benchmarks/results/serve_bench.json.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import platform
import socket
import statistics
import threading
import time
from pathlib import Path

import torch

from sparse_runtime.engine import Engine, Request, SamplingParams
from sparse_runtime.models import load_model

RESULTS = Path(__file__).parent / "results"
PROMPTS = ["The capital of France is", "Write a short poem about the sea.", "def fibonacci(n):",
           "Once upon a time, in a small village,", "The three laws of thermodynamics are", "My favourite food is",
           "In 1969, the first humans", "To make a cup of tea, you"]


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_rate(run, n: int, repeats: int, batch: int) -> float:
    """Aggregate decode tokens/s of ``run(tokens)`` making ``batch`` sequences of ``tokens`` tokens."""
    run(2)  # warm-up
    t1, tn = median_time(lambda: run(1), repeats), median_time(lambda: run(n), repeats)
    return batch * (n - 1) / (tn - t1)


def engine_runner(engine: Engine, ids: list[list[int]]):
    return lambda n: engine.generate([Request(i, SamplingParams(max_tokens=n, ignore_eos=True)) for i in ids])


def hf_runner(model, ids: list[int]):
    x = torch.tensor([ids])
    return lambda n: model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def load_test(model, tok, requests: int, clients: int, max_tokens: int, max_batch: int) -> dict:
    import httpx
    import uvicorn

    from sparse_runtime.server import Server

    server = Server(Engine(model, tok, max_batch=max_batch, max_seq_len=256), "bench", max_queue=requests)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(server.app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"

    def one(i):
        t0 = time.perf_counter()
        try:
            r = httpx.post(url, json={"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                                      "temperature": 0}, timeout=300)
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        return ok, time.perf_counter() - t0

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    uv.should_exit = True
    thread.join(30)
    lat = sorted(dt for _, dt in results)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
    return {"requests": requests, "clients": clients, "max_tokens": max_tokens, "max_batch": max_batch,
            "failed": sum(not ok for ok, _ in results), "seconds": wall, "requests_per_s": requests / wall,
            "latency_p50_s": pct(0.5), "latency_p90_s": pct(0.9), "latency_p99_s": pct(0.99)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=33, help="tokens per sequence in the timed runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--load-max-tokens", type=int, default=8)
    ap.add_argument("--shared", action=argparse.BooleanOptionalAction, default=True,
                    help="record that other jobs shared the CPU during the run (default: yes)")
    ap.add_argument("--out", default=str(RESULTS / "serve_bench.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    ids = [tok(p).input_ids for p in PROMPTS]
    n, rep = args.tokens, args.repeats
    with torch.inference_mode():
        rates = {"hf_generate_b1": decode_rate(hf_runner(model, ids[0]), n, rep, 1)}
        print(f"transformers generate, batch 1: {rates['hf_generate_b1']:.1f} tok/s", flush=True)
        engine = Engine(model, tok, max_batch=8, max_seq_len=128)
        rates["engine_b1"] = decode_rate(engine_runner(engine, ids[:1]), n, rep, 1)
        print(f"engine, batch 1: {rates['engine_b1']:.1f} tok/s", flush=True)
        rates["engine_b8"] = decode_rate(engine_runner(engine, ids), n, rep, 8)
        print(f"engine, batch 8: {rates['engine_b8']:.1f} tok/s aggregate", flush=True)
    load = load_test(model, tok, args.requests, args.clients, args.load_max_tokens, 8)
    print(f"load test: {load['requests'] - load['failed']}/{load['requests']} ok in {load['seconds']:.1f} s", flush=True)
    out = {
        "model": args.model, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": f"cpu ({platform.machine()}, {args.threads} threads{', shared machine' if args.shared else ''})",
        "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"tokens": n, "repeats": rep, "prompt_tokens_b1": len(ids[0]), "max_seq_len": 128},
        "decode_tokens_per_s": rates,
        "engine_b1_vs_hf": rates["engine_b1"] / rates["hf_generate_b1"],
        "engine_b8_vs_b1": rates["engine_b8"] / rates["engine_b1"],
        "load_test": load,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(args.out)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
