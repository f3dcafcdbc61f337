"""GPU timers for run-time decisions (the dispatcher, the cuSPARSELt search) and the benchmarks: CUDA events
around many calls, never a synchronisation between two calls.

``time_us`` times eager calls back to back, so host overhead counts wherever it exceeds the device time.
``device_time_us`` times a CUDA graph of many calls with the L2 cache emptied between them by a read-only
pass (no dirty lines for the timed call to write back): the device time each call costs inside a served
model (decode runs under CUDA graphs there, and each layer's weight has left L2 by the time it is needed
again), with no Python in it. ``cycle_time_us`` does the same for a list of calls on distinct buffers that
together exceed the L2 several times over, with no flush at all.
"""
from __future__ import annotations

import statistics

import torch


def _events_us(run, reps: int, per: int) -> float:
    """Median over ``reps`` of the time between two events around ``run()``, divided by ``per`` calls."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / per)
    return statistics.median(times)


def time_us(fn, warmup: int = 2, iters: int = 10, repeats: int = 5) -> float:
    """Eager time of one ``fn()`` in microseconds: the median over ``repeats`` of ``iters`` back-to-back calls
    between two CUDA events, divided by ``iters`` (host time shows where it exceeds the device's)."""
    for _ in range(warmup):
        fn()

    def run():
        for _ in range(iters):
            fn()

    return _events_us(run, repeats, iters)


def _flush_buffer(device: torch.device) -> torch.Tensor:
    """Twice the L2 cache, read (never written) between calls so that what the previous call left in L2 is
    evicted clean. Allocated per measurement, so no memory stays pinned by the timer."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
    return torch.ones(2 * l2 // 4, dtype=torch.int32, device=device)


def read_flush(buf: torch.Tensor) -> torch.Tensor:
    """A read-only pass over ``buf`` (a 4-byte result): evicts L2 without leaving dirty lines."""
    return buf.amax()


def _warm(fn, device) -> None:
    side = torch.cuda.Stream(device)  # warm-up on a side stream, as capture requires
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)


def _graph_us(body, calls: int, replays: int) -> float:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for _ in range(calls):
            body()
    graph.replay()  # also runs allocations captured inside (e.g. first-use buffers)
    return _events_us(graph.replay, replays, 1)


def device_time_us(fn, calls: int = 8, replays: int = 9, flush_l2: bool = True) -> float:
    """Median device time of one ``fn()`` in microseconds: CUDA graphs of ``calls`` calls (each after a
    read-only L2 flush), minus the same graph of flushes alone. ``fn`` must be capturable; it is warmed up
    first, so autotuning and plan searches stay out of the number."""
    device = torch.device("cuda", torch.cuda.current_device())
    _warm(fn, device)
    if not flush_l2:
        return _graph_us(fn, calls, replays) / calls
    buf = _flush_buffer(device)

    def flushed():
        read_flush(buf)
        fn()

    total = _graph_us(flushed, calls, replays)
    flush_only = _graph_us(lambda: read_flush(buf), calls, replays)
    return max(total - flush_only, 0.0) / calls


def cycle_time_us(fns, replays: int = 10, graph: bool = True) -> float:
    """Median device time of one call when ``fns`` (calls on distinct buffers, together > 3x L2) run in
    turn: one CUDA graph of a pass over them, replayed between two events; no flush, so nothing dirty but
    the calls' own outputs. ``graph=False``: the pass runs eagerly (for calls that cannot be captured)."""
    device = torch.device("cuda", torch.cuda.current_device())

    def one_pass():
        for f in fns:
            f()

    _warm(one_pass, device)
    if not graph:
        return _events_us(one_pass, replays, len(fns))
    return _graph_us(one_pass, 1, replays) / len(fns)
