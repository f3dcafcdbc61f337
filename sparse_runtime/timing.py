"""GPU timers for run-time decisions (the dispatcher, the cuSPARSELt search): medians of CUDA events.

``time_us`` times eager calls one at a time, so host overhead counts. ``device_time_us`` times a CUDA graph
of many calls with the L2 cache flushed between them: the device time each call costs inside a served
model (decode runs under CUDA graphs there, and each layer's weight has left L2 by the time it is needed
again), with no Python in it.
"""
from __future__ import annotations

import statistics

import torch


def time_us(fn, warmup: int = 2, iters: int = 10) -> float:
    """Median wall time of one eager ``fn()`` in microseconds, by CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(times)


def _flush_buffer(device: torch.device) -> torch.Tensor:
    """Twice the L2 cache: zeroing it evicts whatever the previous call left there. Allocated per
    measurement, so no memory stays pinned by the timer."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
    return torch.empty(2 * l2, dtype=torch.uint8, device=device)


def _graph_us(body, calls: int, replays: int) -> float:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for _ in range(calls):
            body()
    graph.replay()  # also runs allocations captured inside (e.g. first-use buffers)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(times)


def device_time_us(fn, calls: int = 8, replays: int = 9, flush_l2: bool = True) -> float:
    """Median device time of one ``fn()`` in microseconds: CUDA graphs of ``calls`` calls (each after an L2
    flush), minus the same graph of flushes alone. ``fn`` must be capturable; it is warmed up first (on a side
    stream, as capture requires), so autotuning and plan searches stay out of the number."""
    device = torch.device("cuda", torch.cuda.current_device())
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    if not flush_l2:
        return _graph_us(fn, calls, replays) / calls
    buf = _flush_buffer(device)

    def flushed():
        buf.zero_()
        fn()

    total = _graph_us(flushed, calls, replays)
    flush_only = _graph_us(buf.zero_, calls, replays)
    return max(total - flush_only, 0.0) / calls
