"""A bounded load test of ``sparse-runtime serve`` over real HTTP on loopback, then an overload run.

    python -m benchmarks.serve_load --threads 1        # SmolLM2-135M, 200 requests from 16 clients

The server is the real CLI (``python -m sparse_runtime serve``) in its own process. Load: --requests
streaming completions (greedy, --max-tokens each) from --clients concurrent clients; per request the
latency (request sent to last event) and the time to first token (to the first event with text);
throughput in requests/s and generated tokens/s; failures. Overload: a second server with --max-batch 1
and --max-queue 2 is filled with 3 requests, then gets --overload-extra more at once: each must be a 503
with Retry-After within 100 ms (target) while the 3 admitted requests complete.
Writes benchmarks/results/serve_load.json.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
import time

import httpx

from .common import RESULTS, metadata, write_json

PROMPTS = ["The capital of France is", "Write a short poem about the sea.", "def fibonacci(n):",
           "Once upon a time, in a small village,", "The three laws of thermodynamics are", "My favourite food is",
           "In 1969, the first humans", "To make a cup of tea, you"]


@contextlib.contextmanager
def server(model: str, threads: int, max_batch: int, max_queue: int, extra=()):
    """The CLI server on a free loopback port; yields its base URL; SIGTERM and a clean exit afterwards."""
    cmd = [sys.executable, "-m", "sparse_runtime", "serve", "--model", model, "--port", "0", "--threads", str(threads),
           "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--max-seq-len", "512", *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if m := re.search(r"serving .* on (http://\S+)", line):
                url = m.group(1)
                break
        else:
            raise RuntimeError(f"the server exited ({proc.wait()}) before it printed its address")
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # drain, so the server never blocks on it
        while httpx.get(url + "/health").status_code != 200:
            time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        if rc != 0:
            raise RuntimeError(f"the server exited {rc} on SIGTERM")


def streamed(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> dict:
    """One streaming completion: status, latency, time to first text, tokens generated."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, ok = None, 0, False
    try:
        with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                return {"ok": False, "status": r.status_code, "latency_s": time.perf_counter() - t0}
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    ok = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    break
                if ttft is None and any(c.get("text") for c in event.get("choices", [])):
                    ttft = time.perf_counter() - t0
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError:
        return {"ok": False, "status": None, "latency_s": time.perf_counter() - t0}
    return {"ok": ok, "status": 200, "latency_s": time.perf_counter() - t0, "ttft_s": ttft, "tokens": tokens}


def percentiles(values: list[float]) -> dict:
    v = sorted(values)
    at = lambda q: v[min(len(v) - 1, int(q * len(v)))] if v else None
    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


def load(url: str, requests: int, clients: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    with client_pool(clients) as client, cf.ThreadPoolExecutor(clients) as pool:
        res = list(pool.map(lambda i: streamed(client, url, PROMPTS[i % len(PROMPTS)], max_tokens), range(requests)))
    wall = time.perf_counter() - t0
    good = [r for r in res if r["ok"]]
    return {"requests": requests, "clients": clients, "max_tokens": max_tokens, "failed": len(res) - len(good),
            "seconds": wall, "requests_per_s": requests / wall,
            "generated_tokens_per_s": sum(r["tokens"] for r in good) / wall,
            "latency_s": percentiles([r["latency_s"] for r in good]),
            "ttft_s": percentiles([r["ttft_s"] for r in good if r["ttft_s"] is not None])}


def client_pool(clients: int) -> httpx.Client:
    """One connection-pooling client shared by the threads, as a real load generator keeps its connections."""
    return httpx.Client(timeout=600, limits=httpx.Limits(max_connections=clients, max_keepalive_connections=clients))


def overload(url: str, extra: int, max_tokens: int) -> dict:
    """Fill a max-batch-1, max-queue-2 server with 3 admitted requests, then send ``extra`` more at once:
    each must get 503 + Retry-After at once, and the admitted ones must still complete."""
    with client_pool(3 + extra) as client, cf.ThreadPoolExecutor(3 + extra) as pool:
        admitted = [pool.submit(streamed, client, url, PROMPTS[i], max_tokens) for i in range(3)]
        deadline = time.monotonic() + 120
        while (h := client.get(url + "/health").json())["running"] + h["waiting"] < 3:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the 3 admitted requests never filled the server: {h}")
            time.sleep(0.01)

        def one(i):
            t0 = time.perf_counter()
            r = client.post(url + "/v1/completions", json={"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                                                          "temperature": 0})
            return r.status_code, "retry-after" in r.headers, time.perf_counter() - t0

        res = list(pool.map(one, range(extra)))
        kept = [f.result() for f in admitted]
    rejected = [dt for code, _, dt in res if code == 503]
    return {"admitted": 3, "admitted_ok": sum(r["ok"] for r in kept), "extra_requests": extra,
            "max_batch": 1, "max_queue": 2, "rejected_503": len(rejected),
            "rejected_with_retry_after": sum(c == 503 and h for c, h, _ in res),
            "other": sum(code != 503 for code, _, _ in res),
            "other_ok": sum(code == 200 for code, _, _ in res),  # admitted after all: a slot freed meanwhile
            "rejection_latency_max_s": max(rejected) if rejected else None,
            "rejection_latency_p50_s": percentiles(rejected)["p50"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--overload-extra", type=int, default=12, help="requests sent to the full overload server")
    ap.add_argument("--threads", type=int, default=1, help="the server's torch CPU threads")
    ap.add_argument("--note", default="", help="recorded beside the device, e.g. 'shared machine'")
    ap.add_argument("--out", default=str(RESULTS / "serve_load.json"))
    args = ap.parse_args(argv)
    report = {"model": args.model, **metadata("cpu", args.note, threads=args.threads),  # the server's threads
              "max_batch": args.max_batch}
    with server(args.model, args.threads, args.max_batch, args.requests) as url:
        report["load"] = load(url, args.requests, args.clients, args.max_tokens)
        print(json.dumps(report["load"], indent=2), flush=True)
    with server(args.model, args.threads, 1, 2) as url:
        report["overload"] = overload(url, args.overload_extra, 16 * args.max_tokens)  # long: the server stays full
        print(json.dumps(report["overload"], indent=2), flush=True)
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
