"""``sparse-runtime serve``: an OpenAI-compatible HTTP server (completions, chat completions, SSE streaming)."""
from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

from .common import add_model_arguments, add_tp_argument, load_from_args

HELP = "serve a model over an OpenAI-compatible HTTP API (continuous batching, streaming)"


def add_arguments(p) -> None:
    add_model_arguments(p)
    add_tp_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on startup)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch; more get 503")
    p.add_argument("--max-seq-len", type=int, default=2048, help="KV cache length per sequence")
    p.add_argument("--api-key", default=os.environ.get("SPARSE_RUNTIME_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $SPARSE_RUNTIME_API_KEY, else none)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request gets 504")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="on SIGTERM, seconds to finish in-flight requests before aborting them")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model's name)")
    p.add_argument("--sparsify", default=None, metavar="PATTERN", help="magnitude-prune to PATTERN (e.g. 2:4) first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compile", nargs="?", const="default", choices=("default", "max-autotune"),
                   help="compile the decode step: CUDA graphs on CUDA, inductor on the CPU (the first requests wait "
                        "for it; cached across processes). --compile max-autotune (CPU): prepack dense weights for "
                        "inductor's GEMM template, faster dense decode for a second copy of each dense weight and "
                        "minutes of compiling in every process")


def run(args) -> int:
    import uvicorn

    from ..serving.engine import Engine
    from ..serving.server import Server
    from ..nn.sparsify import sparsify

    tp = bool(args.tp and args.tp > 1)
    if tp:
        import datetime

        args.tp_timeout = datetime.timedelta(days=30)  # the following ranks wait for requests as long as it takes
    for name in ("max_batch", "max_queue", "max_seq_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    model, tok = load_from_args(args)
    if args.sparsify:
        print(sparsify(model, pattern=args.sparsify, backend=args.backend), file=sys.stderr)
    engine = Engine(model, tok, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                    compile={None: False, "default": True}.get(args.compile, args.compile))
    if tp:  # rank 0 serves; the others replay its model calls on their shards (tensor_parallel.follow)
        import torch.distributed as dist

        from ..serving.tensor_parallel import follow, lead, stop_followers

        if dist.get_rank():
            for sig in (signal.SIGTERM, signal.SIGINT):  # rank 0 tells them when to stop
                signal.signal(sig, lambda *_: None)
            follow(engine)
            return 0
        lead(engine)
    name = args.served_model_name or Path(args.model).name
    server = Server(engine, name, max_queue=args.max_queue, api_key=args.api_key,
                    request_timeout=args.request_timeout)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)  # before the address is printed: a client that connects at once waits instead of being refused
    host, port = sock.getsockname()[:2]
    print(f"serving {name} on http://{host}:{port} (max batch {args.max_batch}, queue {args.max_queue})",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(server.app, log_level="warning", timeout_graceful_shutdown=args.shutdown_timeout)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler it found:
    # make that a no-op so a requested shutdown exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if tp:
            stop_followers()
    print("server stopped", file=sys.stderr)
    return 0
