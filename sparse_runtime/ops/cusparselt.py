"""cuSPARSELt from Python: compression, cached plans, algorithm search, a fused bias.

Over the extension :mod:`sparse_runtime._C`, which takes device pointers, shapes and streams as ints.
``torch._cslt_sparse_mm`` rebuilds descriptors, plan and workspace on every call; here a plan is built
once per (device, M, N, K, dtype, bias pointer) and kept in an LRU cache, so a call costs one
dictionary look-up, one output allocation and ``cusparseLtMatmul``.

Why plans are per exact M (after padding M to a multiple of 8) rather than per M bucket: a plan's
descriptors fix M, and running a bucket's plan on a smaller M would need the input padded up to the
bucket, up to 2x the work. What is bucketed (powers of two, :func:`m_bucket`) is the expensive part, the
algorithm/split-K search: the first M of a bucket is searched, later ones reuse its result. The LRU cap
(``SPARSE_RUNTIME_PLAN_CACHE``, default 1024 plans of a few KB each) bounds memory when a server sees
many distinct prompt lengths; an evicted plan is rebuilt in ~50-200 us from the cached search result.

Search results are cached in memory and in a JSON file (in :func:`sparse_runtime.ops.caches.cache_dir`), keyed
by GPU name and library versions. ``SPARSE_RUNTIME_CSLT_SEARCH`` picks
``manual`` (default: every algorithm id x split-K, each timed as :func:`sparse_runtime.ops.timing.device_time_us`
does: device time of CUDA graphs of calls with L2 flushed between them, as a served model runs a layer), ``library``
(``cusparseLtMatmulSearch``, its pick timed the same way) or ``off`` (the library's default algorithm).

Workspaces: one per (device, stream) for eager calls, replaced (and freed) when a plan needs more; a call inside
a CUDA graph capture takes a temporary from the graph's own memory pool instead, so no graph holds a pointer
into the shared table and no capture leaves anything behind here.

The pure helpers (padding, buckets, keys, the LRU, the cache file) need neither a GPU nor the extension.
"""
from __future__ import annotations

import os

import torch

from .caches import LRU, DiskCache, device_key, m_bucket
from .devices import cuda_unavailable, raw_stream
from ..errors import BackendUnavailable, ShapeError
from ..format.codec import cdiv, dtype_name, unsupported_dtype
from .timing import device_time_us

try:
    from .. import _C
    _IMPORT_ERROR = None
except ImportError as e:  # the pure-Python install: no nvcc or cuSPARSELt at build time
    _C = None
    _IMPORT_ERROR = f"the extension sparse_runtime._C is not built or does not load ({e})"

DTYPES = (torch.float16, torch.bfloat16, torch.int8)  # what the extension takes, by dtype_name


# -- pure logic ---------------------------------------------------------------------------------------
def round_up(x: int, multiple: int) -> int:
    return cdiv(x, multiple) * multiple


def weight_align(dtype: torch.dtype) -> int:
    """cuSPARSELt needs the structured matrix's rows and columns to be multiples of this (16 B / 8 B types)."""
    return 32 if dtype == torch.int8 else 16


def m_align(dtype: torch.dtype) -> int:
    """The dense operand's M must be a multiple of this (PyTorch pads to the same)."""
    return 16 if dtype == torch.int8 else 8


def padded_shape(m: int, n: int, k: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(M, N, K) as cuSPARSELt will see them after zero padding."""
    a = weight_align(dtype)
    return round_up(max(m, 1), m_align(dtype)), round_up(n, a), round_up(k, a)


def plan_key(device: int, m: int, n: int, k: int, dtype: str, bias_ptr: int) -> tuple:
    """Identity of a plan. The bias pointer is part of it because a plan captures the pointer at init."""
    return (device, m, n, k, dtype, bias_ptr)


def tune_key(n: int, k: int, dtype: str, has_bias: bool, bucket: int) -> str:
    """Identity of a search result: shape, dtype, bias and M bucket (JSON-friendly string)."""
    return f"n={n},k={k},{dtype},bias={int(has_bias)},m<={bucket}"


# -- availability -------------------------------------------------------------------------------------
def versions() -> dict:
    """``{"extension": whether sparse_runtime._C loads (or why not), "cusparselt": the library version or None}``:
    the one place outside this module learns about the extension."""
    if _C is None:
        return {"extension": f"not available: {_IMPORT_ERROR}", "cusparselt": None}
    return {"extension": "sparse_runtime._C loaded", "cusparselt": ".".join(map(str, _C.library_version()))}


def unavailable(device: torch.device | str | None = None) -> str | None:
    """Why cuSPARSELt cannot run on ``device`` (default: the current CUDA device), or None."""
    if _C is None:
        return _IMPORT_ERROR
    return cuda_unavailable(torch.device("cuda") if device is None else torch.device(device), "cuSPARSELt")


def _require(device: torch.device) -> int:
    why = unavailable(device)
    if why:
        raise BackendUnavailable(why)
    return torch.cuda.current_device() if device.index is None else device.index


# -- compression --------------------------------------------------------------------------------------
def expand_canonical(values: torch.Tensor, meta: torch.Tensor, k: int) -> torch.Tensor:
    """Canonical 2:4 ``values``/``meta`` -> the dense ``[N, k]`` weight, by one CUDA kernel."""
    index = _require(values.device)
    values, meta = values.contiguous(), meta.contiguous()
    out = torch.empty(values.shape[0], k, dtype=values.dtype, device=values.device)
    _C.expand24(index, values.data_ptr(), meta.data_ptr(), out.data_ptr(), values.shape[0], k,
                values.element_size(), raw_stream(index))
    return out


def _check_dense(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ShapeError(f"cuSPARSELt takes a 2-D weight, got shape {tuple(w.shape)}")
    why = unsupported_dtype(w.dtype, DTYPES)
    if why:
        raise ShapeError(f"cuSPARSELt: {why}")
    a = weight_align(w.dtype)
    if w.shape[0] % a or w.shape[1] % a:
        raise ShapeError(f"cuSPARSELt needs weight dims that are multiples of {a}, got {tuple(w.shape)}; "
                         f"pad with zeros (CusparseLtWeight does this)")


def compress_dense(w: torch.Tensor) -> torch.Tensor:
    """The opaque cuSPARSELt buffer (uint8) of a dense 2:4 weight ``[N, K]``."""
    _check_dense(w)
    index = _require(w.device)
    w = w.contiguous()
    name = dtype_name(w.dtype)
    size, buf_size = _C.compressed_size(index, w.shape[0], w.shape[1], name)
    out = torch.empty(size, dtype=torch.uint8, device=w.device)
    buf = torch.empty(max(buf_size, 1), dtype=torch.uint8, device=w.device)
    _C.compress(index, w.shape[0], w.shape[1], name, w.data_ptr(), out.data_ptr(), buf.data_ptr(),
                raw_stream(index))
    return out


class CusparseLtWeight:
    """A layer's weight prepared for cuSPARSELt: the compressed buffer, padded dims and padded bias."""

    def __init__(self, packed: torch.Tensor, n: int, k: int, dtype: torch.dtype, bias: torch.Tensor | None):
        self.packed, self.n, self.k, self.dtype = packed, n, k, dtype
        self.dtype_name = dtype_name(dtype)
        self.device = packed.device
        self.index = packed.device.index if packed.device.index is not None else torch.cuda.current_device()
        _, self.npad, self.kpad = padded_shape(1, n, k, dtype)
        if bias is not None and bias.numel() < self.npad:
            bias = torch.nn.functional.pad(bias.detach(), (0, self.npad - n))
        self.bias = None if bias is None else bias.detach().contiguous()
        self.packed_ptr = packed.data_ptr()
        self.bias_ptr = 0 if self.bias is None else self.bias.data_ptr()
        self.last = (None, None)  # (M, plan) of the previous call: skips the LRU in steady state

    @classmethod
    def from_dense(cls, w: torch.Tensor, bias: torch.Tensor | None = None) -> CusparseLtWeight:
        n, k = w.shape
        _, npad, kpad = padded_shape(1, n, k, w.dtype)
        if (npad, kpad) != (n, k):  # zero rows/columns keep 2:4 and change nothing in the product
            w = torch.nn.functional.pad(w, (0, kpad - k, 0, npad - n))
        return cls(compress_dense(w), n, k, w.dtype, bias)

    @classmethod
    def from_canonical(cls, values: torch.Tensor, meta: torch.Tensor, k: int,
                       bias: torch.Tensor | None = None) -> CusparseLtWeight:
        """From the canonical format (see :mod:`sparse_runtime.format.codec`); the dense copy is temporary."""
        return cls.from_dense(expand_canonical(values, meta, k), bias)


# -- plans and matmul ---------------------------------------------------------------------------------
_PLANS = LRU(int(os.environ.get("SPARSE_RUNTIME_PLAN_CACHE", "1024")))
_TUNED = DiskCache("cusparselt_search.json")
_WORKSPACES: dict[tuple[int, int], torch.Tensor] = {}
# Plans replaced after the capture that made them with the default algorithm (at most one per plan key: the
# eager search that replaces one is cached): that graph launches with the descriptors they hold.
_RETIRED: list = []
_PROVISIONAL: set = set()  # plan keys built with the default algorithm during a capture: searched at the next eager call
_SECTIONS: dict[int, str] = {}


def _section(index: int) -> str:
    if index not in _SECTIONS:
        versions = {"cusparselt": ".".join(map(str, _C.library_version())), "cudart": _C.runtime_version()}
        _SECTIONS[index] = device_key(torch.cuda.get_device_name(index), versions)
    return _SECTIONS[index]


def _new_workspace(index: int, nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{index}")


def _workspace(index: int, stream: int, nbytes: int) -> torch.Tensor | None:
    """A workspace of ``nbytes`` (None for 0) for a launch on ``stream``; the caller holds it until the launch
    is queued.

    Eager calls share one per (device, stream); one too small is replaced, and the old one freed: only launches
    on that stream used it, and the caching allocator reuses its memory in stream order. Inside a graph capture
    the workspace is a temporary from the graph's private pool, like any intermediate of the graph: the graph
    keeps that memory for its replays, and nothing here keeps the capture's."""
    if not nbytes:
        return None
    if _capturing():
        return _new_workspace(index, nbytes)
    ws = _WORKSPACES.get((index, stream))
    if ws is None or ws.numel() < nbytes:
        ws = _WORKSPACES[(index, stream)] = _new_workspace(index, nbytes)
    return ws


def _capturing() -> bool:
    return torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling()


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _search(w: CusparseLtWeight, mpad: int) -> dict:
    """Fastest (alg_id, split_k) for this weight at M = ``mpad``; ``{"alg_id": -1, ...}`` means the default."""
    mode = os.environ.get("SPARSE_RUNTIME_CSLT_SEARCH", "manual")
    x = torch.randn(mpad, w.kpad, device=w.device).to(w.dtype)
    out = torch.empty(mpad, w.npad, dtype=w.dtype, device=w.device)

    def build(alg_id, split_k):
        return _C.Plan(w.index, mpad, w.npad, w.kpad, w.dtype_name, w.bias_ptr, alg_id, split_k)

    def timed(plan) -> float:
        """Device time of one call: graphs of calls with L2 flushed; the candidate's own workspace, freed after."""
        ws = _new_workspace(w.index, plan.workspace_size) if plan.workspace_size else None
        return device_time_us(lambda: plan.matmul(w.packed_ptr, x.data_ptr(), out.data_ptr(), _ptr(ws),
                                                  raw_stream(w.index)), calls=4, replays=5)

    default = build(-1, -1)
    if mode == "library":
        ws = _new_workspace(w.index, default.workspace_size) if default.workspace_size else None
        alg_id, split_k = default.search(w.packed_ptr, x.data_ptr(), out.data_ptr(), _ptr(ws), raw_stream(w.index))
        return {"alg_id": alg_id, "split_k": split_k, "us": timed(build(alg_id, split_k))}
    best = {"alg_id": -1, "split_k": -1, "us": timed(default)}
    for alg_id in range(default.max_alg_id + 1):
        for split_k in (1, 2, 4):
            try:
                us = timed(build(alg_id, split_k))
            except RuntimeError:  # NOT_SUPPORTED for this shape/config (raised by the eager warm-up calls)
                continue
            if us < best["us"]:
                best = {"alg_id": alg_id, "split_k": split_k, "us": us}
    return best


def _config(w: CusparseLtWeight, mpad: int) -> tuple[int, int]:
    _TUNED.bind(_section(w.index))
    key = tune_key(w.npad, w.kpad, w.dtype_name, w.bias is not None, m_bucket(mpad))
    found = _TUNED.get(key)
    if found is None:
        if _capturing() or os.environ.get("SPARSE_RUNTIME_CSLT_SEARCH") == "off":
            return -1, -1  # the library default; no timing inside a graph capture (searched later)
        found = _search(w, mpad)
        _TUNED.put(key, found)
    return found["alg_id"], found["split_k"]


def get_plan(w: CusparseLtWeight, mpad: int):
    key = plan_key(w.index, mpad, w.npad, w.kpad, w.dtype_name, w.bias_ptr)
    plan = _PLANS.get(key)
    capturing = _capturing()
    if plan is None or (key in _PROVISIONAL and not capturing):
        if plan is not None:
            _RETIRED.append(plan)  # the graph captured with it still holds its descriptors
        alg_id, split_k = _config(w, mpad)
        plan = _C.Plan(w.index, mpad, w.npad, w.kpad, w.dtype_name, w.bias_ptr, alg_id, split_k)
        _PLANS.put(key, plan)
        (_PROVISIONAL.add if capturing and alg_id == -1 else _PROVISIONAL.discard)(key)
        if not capturing:  # sized now, outside any capture
            _workspace(w.index, raw_stream(w.index), plan.workspace_size)
    return plan


def linear(x: torch.Tensor, w: CusparseLtWeight) -> torch.Tensor:
    """``x @ W^T + bias`` for ``x [M, K]``; padding as cuSPARSELt needs it."""
    m = x.shape[0]
    mpad = round_up(max(m, 1), m_align(w.dtype))
    if mpad != m or w.kpad != w.k or not x.is_contiguous() or x.data_ptr() % 16:
        x = torch.nn.functional.pad(x, (0, w.kpad - w.k, 0, mpad - m)).contiguous()
    last_m, plan = w.last
    if last_m != mpad:
        plan = get_plan(w, mpad)
        if not _capturing():  # a plan made in a capture may be provisional: looked up again when eager
            w.last = (mpad, plan)
    out = torch.empty(mpad, w.npad, dtype=w.dtype, device=w.device)
    stream = raw_stream(w.index)
    ws = _workspace(w.index, stream, plan.workspace_size)
    plan.matmul(w.packed_ptr, x.data_ptr(), out.data_ptr(), _ptr(ws), stream)
    if mpad != m or w.npad != w.n:
        out = out[:m, :w.n]
    return out


# -- torch.library op (torch.compile / CUDA graphs) ----------------------------------------------------
@torch.library.custom_op("sparse_runtime::cslt_linear", mutates_args=(), device_types="cuda")
def cslt_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int, k: int) -> torch.Tensor:
    """The op form of :func:`linear` (``bias`` as held by :class:`CusparseLtWeight`, padded to its N)."""
    out = linear(x, CusparseLtWeight(packed, n, k, x.dtype, bias))
    return out if out._base is None else out.clone()  # an op's output must own its storage


@cslt_linear.register_fake
def _(x, packed, bias, n, k):
    return x.new_empty(x.shape[0], n)


def linear_op(x: torch.Tensor, w: CusparseLtWeight):
    """:func:`linear` in eager mode (least host overhead), the custom op under ``torch.compile``."""
    if torch.compiler.is_compiling():
        return cslt_linear(x, w.packed, w.bias, w.n, w.k)
    return linear(x, w)
