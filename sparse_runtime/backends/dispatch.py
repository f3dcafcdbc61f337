"""The ``dispatch`` backend: what ``backend="auto"`` runs on CUDA.

For each layer shape and M bucket (powers of two) it times the candidates once: ``cusparselt``, ``triton``,
``mmasp`` (the ``mma.sp`` decode kernel, for buckets up to its ``max_m``; each when registered and able to run
the layer) and ``dense`` (cuBLAS ``F.linear`` on the decompressed weight),
and from then on runs the fastest. The timer is device time in CUDA graphs with L2 flushed between calls
(:func:`sparse_runtime.ops.timing.device_time_us`): what a layer costs in a served model, where decode runs
under graphs and weights come from HBM; a candidate that cannot be captured is timed eagerly instead, while
the others keep their graph times. Eager calls add host overhead on top (the sparse paths' Python is
longer than ``F.linear``'s), which only CUDA graphs or ``torch.compile`` remove. A sparse candidate must beat dense by
``MARGIN`` to be chosen, so timing noise cannot make a call slower than the dense layer would have been.

Timings are shared by every layer of the same shape and cached on disk (``dispatch.json`` in
:func:`sparse_runtime.ops.caches.cache_dir`), keyed by GPU name and library versions. The dense weight
is materialised only for measuring and kept only while some bucket runs dense; likewise each sparse
candidate's prepared layout is kept only while some bucket runs it.

Nothing is timed inside a CUDA graph capture or ``torch.compile`` trace: an unmeasured bucket runs dense
there. Run one eager forward per M bucket first (a warm-up) to get the measured choice into the graph.
"""
from __future__ import annotations

import math

import torch

from ..ops import cusparselt
from ..ops.caches import DiskCache, device_key, m_bucket
from ..ops.devices import cuda_unavailable
from ..errors import BackendUnavailable
from ..format.codec import dtype_name
from ..ops.timing import device_time_us, time_us
from . import Backend, Capabilities, get, register
from .decompressed import DecompressedBackend

CANDIDATES = ("cusparselt", "triton", "mmasp")
DECOMPRESSED = DecompressedBackend()  # the dense candidate: cuBLAS on the weight decompressed once
DENSE = "dense"
MARGIN = 0.03


# -- pure logic ---------------------------------------------------------------------------------------
def shape_key(n: int, k: int, dtype: torch.dtype, has_bias: bool, rotation: tuple | None = None) -> str:
    rot = "none" if rotation is None else "x".join(map(str, rotation))
    return f"n={n},k={k},{dtype_name(dtype)},bias={int(has_bias)},rot={rot}"


def entry_key(shape: str, bucket: int) -> str:
    return f"{shape},m<={bucket}"


def select(timings: dict[str, float], margin: float = MARGIN) -> str:
    """The candidate to run, from microseconds per candidate (``dense`` required).

    A sparse candidate wins only if it is faster than dense by more than ``margin`` (a fraction)."""
    if DENSE not in timings:
        raise ValueError(f"timings need a '{DENSE}' entry, got {sorted(timings)}")
    sparse = [(t, name) for name, t in timings.items()
              if name != DENSE and t is not None and math.isfinite(t) and t > 0]
    if not sparse:
        return DENSE
    t, name = min(sparse)
    return name if t < timings[DENSE] * (1.0 - margin) else DENSE


def complete(timings: dict | None, names) -> bool:
    """Whether cached ``timings`` cover every candidate that can run now (plus dense)."""
    return timings is not None and all(n in timings for n in (*names, DENSE))


def fits(backend, bucket: int) -> bool:
    """Whether ``backend`` takes batches of ``bucket`` rows (decode-only kernels have a ``max_m``)."""
    return backend.capabilities.refusal(m=bucket) is None


def _time_all(runs: dict, timer) -> dict[str, float | None]:
    timings = {}
    for name, fn in runs.items():
        try:
            timings[name] = timer(fn)
        except Exception:  # noqa: BLE001 -- a candidate that fails on this shape is simply not chosen
            timings[name] = None
    return timings


# -- runtime ------------------------------------------------------------------------------------------
_TIMINGS = DiskCache("dispatch.json")


class _State:
    def __init__(self, candidates: dict):
        self.candidates = candidates  # name -> [backend, prepared state or None until first use]
        self.table: dict[int, str] = {}
        self.dense: dict = {}  # the decompressed backend's state: the dense weight once built


def _section(device: torch.device) -> str:
    versions = {"torch": torch.__version__, "timer": "graph-readflush"}  # how entries were measured
    if cusparselt.versions()["cusparselt"] is not None:
        versions["cusparselt"] = cusparselt.versions()["cusparselt"]
    try:
        import triton
        versions["triton"] = triton.__version__
    except ImportError:
        pass
    return device_key(torch.cuda.get_device_name(device), versions)


class DispatchBackend(Backend):
    name = "dispatch"
    priority = 100
    # dtypes: those of its candidates (checked per layer)
    capabilities = Capabilities(patterns=("2:4",), devices=("cuda",), auto_devices=("cuda",))

    def unavailable(self, device):
        return super().unavailable(device) or cuda_unavailable(device, "dispatch (among CUDA kernels)", capability=None)

    def _candidates(self, layer) -> dict:
        out = {}
        for name in CANDIDATES:
            try:
                backend = get(name)
            except BackendUnavailable:
                continue
            if backend.unavailable(layer.weight_values.device) is None and backend.unsupported(layer) is None:
                out[name] = [backend, None]
        return out

    def unsupported(self, layer, m=None):
        why = super().unsupported(layer, m)
        if why is None and not self._candidates(layer):
            return f"no sparse backend ({', '.join(CANDIDATES)}) can run this layer"
        return why

    def prepare(self, layer):
        return _State(self._candidates(layer))

    # -- candidates ------------------------------------------------------------------------------------
    def _run(self, name: str, layer, st: _State, x):
        if name == DENSE:
            return DECOMPRESSED.forward(layer, st.dense, x)
        entry = st.candidates[name]
        if entry[1] is None:
            entry[1] = entry[0].prepare(layer)
        return entry[0].forward(layer, entry[1], x)

    @staticmethod
    def _names(st: _State, bucket: int) -> list[str]:
        return [name for name, (backend, _) in st.candidates.items() if fits(backend, bucket)]

    def _measure(self, layer, st: _State, bucket: int) -> dict[str, float]:
        x = torch.randn(bucket, layer.in_features, device=layer.weight_values.device).to(layer.dtype)
        runs = {name: (lambda n=name: self._run(n, layer, st, x)) for name in (*self._names(st, bucket), DENSE)}
        timings = _time_all(runs, device_time_us)
        # A candidate that will not capture is timed eagerly, host overhead included: never less than its
        # device time, so it can only lose by it. The others keep their graph times.
        failed = {name: fn for name, fn in runs.items() if timings[name] is None}
        timings.update(_time_all(failed, lambda fn: time_us(fn, warmup=3, iters=15)))
        return timings

    def _decide(self, layer, st: _State, bucket: int) -> str:
        device = layer.weight_values.device
        _TIMINGS.bind(_section(device))
        rot = None if layer.rotation is None else tuple(layer.rotation.shape)
        key = entry_key(shape_key(layer.out_features, layer.in_features, layer.dtype,
                                  layer.bias is not None, rot), bucket)
        timings = _TIMINGS.get(key)
        names = self._names(st, bucket)
        if not complete(timings, names):
            if torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
                return DENSE  # not recorded in the table: measured at the next eager call
            timings = self._measure(layer, st, bucket)
            _TIMINGS.put(key, timings)
        choice = select({n: t for n, t in timings.items() if n in names or n == DENSE})
        st.table[bucket] = choice
        chosen = set(st.table.values())
        for name, entry in st.candidates.items():
            if name not in chosen:
                entry[1] = None  # measured, not chosen by any bucket: free its layout
        if DENSE not in chosen:
            st.dense.clear()  # keep only the compressed weight resident
        return choice

    def forward(self, layer, st: _State, x):
        bucket = m_bucket(x.numel() // x.shape[-1])
        name = st.table.get(bucket) or self._decide(layer, st, bucket)
        return self._run(name, layer, st, x)

    @staticmethod
    def table(layer) -> dict[int, str]:
        """The layer's current ``{M bucket: backend}`` choices (for inspection and tests)."""
        st = layer._resolve()[1]
        return dict(st.table) if isinstance(st, _State) else {}


register(DispatchBackend())
