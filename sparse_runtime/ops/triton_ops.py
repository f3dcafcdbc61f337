"""Torch-facing wrappers of the Triton 2:4 kernels (``sparse_runtime.kernels.sparse24``).

Each wrapper checks shapes, dtypes and devices, allocates the output and
launches. The functional forms are ``torch.library`` custom ops
(``torch.ops.sparse_runtime.sparse24_matmul`` and ``rotate_sparse24_matmul``)
with fake implementations, so ``torch.compile`` traces through them and CUDA
graphs capture them (after one warm-up call has autotuned).

The kernels take the Triton layout :func:`prepare_sparse24` derives from the
canonical format: ``values [N, K/2]`` as is and ``meta`` repacked to int32
words ``[N, ceil(K/32)]``. On the CPU they run under ``TRITON_INTERPRET=1``
(tests); there bf16 is computed in fp32, since the interpreter's bf16
arithmetic is wrong.
"""
import functools
import inspect
from typing import Optional

import torch

from .caches import m_bucket
from .devices import raw_stream
from ..kernels.common import DECODE_MAX_M, interpreting  # noqa: F401  (backends read them here)
from ..errors import ShapeError
from ..format.codec import cdiv, unsupported_dtype
from ..format.rotation import apply_rotation, check_rotation
from .triton_launch import direct_launch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernels():
    from ..kernels import sparse24  # imports triton; deferred so the package imports without it

    return sparse24


# -- layout ----------------------------------------------------------------------------------------------
def _kept_columns_lut() -> torch.Tensor:
    """Canonical meta byte (two groups of in-group indices ``i0 | i1 << 2``) -> the same two groups as bitmasks
    of their kept columns, ``1 << i0 | 1 << i1``; nibble 0 (never a valid group: padding) stays 0."""
    n = torch.arange(16)
    mask = torch.where(n == 0, 0, (1 << (n & 3)) | (1 << (n >> 2)))
    b = torch.arange(256)
    return (mask[b & 15] | mask[b >> 4] << 4).to(torch.uint8)


_KEPT = _kept_columns_lut()


def pack_meta_int32(meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """Canonical 2:4 meta ``[N, ceil(K/8)]`` uint8 -> ``[N, ceil(K/32)]`` int32 (rows zero-padded), each group's
    nibble rewritten as the bitmask of its kept columns: the kernel tests bits instead of comparing indices."""
    if meta.dtype != torch.uint8 or meta.dim() != 2 or meta.shape[1] != (in_features + 7) // 8:
        raise ShapeError(f"meta: expected uint8 [N, {(in_features + 7) // 8}] for K={in_features}, "
                         f"got {meta.dtype} {list(meta.shape)}")
    words = (in_features + 31) // 32
    padded = meta.new_zeros(meta.shape[0], words * 4)
    padded[:, : meta.shape[1]] = _KEPT.to(meta.device)[meta.long()]
    return padded.view(torch.int32)  # little-endian: byte 4w + i is bits 8i.. of word w


def prepare_sparse24(values: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' layout from the canonical ``(values [N, K/2], meta [N, ceil(K/8)] uint8)``."""
    return values.contiguous(), pack_meta_int32(meta, values.shape[1] * 2)


# -- checks ----------------------------------------------------------------------------------------------
def _check(x, values, meta, bias, rotation, op) -> None:
    for name, t in (("x", x), ("values", values), ("meta", meta), ("bias", bias), ("rotation", rotation)):
        if t is not None and not (t.device.type == "cuda" or (interpreting() and t.device.type == "cpu")):
            raise RuntimeError(f"{op}: {name} is on {t.device}; the Triton kernels need a CUDA device "
                               "(or TRITON_INTERPRET=1 to run them on the CPU interpreter)")
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    why = unsupported_dtype(x.dtype, DTYPES)
    if why:
        raise TypeError(f"{op}: {why}")
    if values.dim() != 2:
        raise ShapeError(f"{op}: values must be [N, K/2], got shape {list(values.shape)}")
    n, k = values.shape[0], values.shape[1] * 2
    if k % 4:
        raise ShapeError(f"{op}: in_features={k} (2 x values.shape[1]) is not a multiple of 4")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ShapeError(f"{op}: x has shape {list(x.shape)}, expected [..., {k}] to match values {list(values.shape)}")
    if values.dtype != x.dtype:
        raise TypeError(f"{op}: values dtype {values.dtype} != x dtype {x.dtype}")
    if meta.dtype != torch.int32 or tuple(meta.shape) != (n, (k + 31) // 32):
        raise ShapeError(f"{op}: meta must be int32 [{n}, {(k + 31) // 32}] (see prepare_sparse24), "
                         f"got {meta.dtype} {list(meta.shape)}")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype != x.dtype):
        raise ShapeError(f"{op}: bias must be {x.dtype} [{n}], got {bias.dtype} {list(bias.shape)}")
    if rotation is not None:
        check_rotation(rotation, k)
        if rotation.dtype != x.dtype:
            raise TypeError(f"{op}: rotation dtype {rotation.dtype} != x dtype {x.dtype}")


_LOCKS: dict = {}


def decode_locks(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed split-K counters for one layer of ``n`` outputs: one per decode tile (BLOCK_N >= 16), and at
    least ``CTAS_PER_SM`` per SM (a launch splits only when it has fewer output tiles than that).

    Allocate them at prepare time, outside any CUDA-graph capture: counters made inside a capture come from
    that graph's private pool, and counters shared by several graphs race when their replays overlap."""
    ker = _kernels()
    fill = ker.gpu_fill(device)
    return torch.zeros(max(cdiv(n, 16), ker.CTAS_PER_SM * fill[0] if fill else 0), dtype=torch.int32, device=device)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _tile_locks(device: torch.device, n: int) -> torch.Tensor:
    """Shared counters for callers that pass none: zeroed once, reset by the kernel after each use.

    One set per (device, stream): launches on one stream run in order, so they can share counters; two
    streams running split-K launches at once must not. Never allocated inside a capture (see decode_locks)."""
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    locks = _LOCKS.get(key)
    if locks is None or locks.numel() < n:
        if _capturing(device):
            raise RuntimeError("sparse24: split-K counters cannot be allocated inside a CUDA-graph capture; "
                               "pass locks=decode_locks(N, device) made beforehand (SparseLinear does)")
        locks = _LOCKS[key] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return locks


# -- launch ----------------------------------------------------------------------------------------------
class _Plan:
    """What a launch needs beyond its tensors; a function of (layer, M bucket), so computed once per pair.
    ``configs``: those the autotuner may try; ``splits``: the split-K factor of each, by (BLOCK_M, BLOCK_N,
    BLOCK_K). Once an eager launch has consulted the autotuner, ``config`` is its choice for the bucket,
    ``grid`` its (BLOCK_M, N tiles, split) and ``launches`` a direct launch per compiled specialisation."""
    __slots__ = ("kernel", "configs", "splits", "max_splits", "lock_tiles", "m_bucket", "rotate_first", "kw",
                 "device", "stream", "config", "grid", "launches")


def _plan(m, n, k, dtype, device, rot_b, has_bias, split_k) -> _Plan:
    ker = _kernels()
    p = _Plan()
    p.m_bucket = m_bucket(m)
    p.kernel = ker.sparse24_decode if m <= DECODE_MAX_M else ker.sparse24_tiles
    rot = ker.rotation_mode(rot_b, p.kernel.configs)
    configs = ker.launch_configs(p.kernel.configs, rot, rot_b or 1, dtype.itemsize, p.m_bucket, n, k, device)
    # No config holds R's tile in this device's shared memory: rotate first, then the plain kernel.
    p.rotate_first = bool(rot) and not configs
    if p.rotate_first:
        rot, rot_b = 0, None
        configs = ker.launch_configs(p.kernel.configs, 0, 1, dtype.itemsize, p.m_bucket, n, k, device)
    p.configs = configs or p.kernel.configs  # nothing fits (not a config list of ours): let the compiler say so
    fill = ker.gpu_fill(device)
    p.splits = {ker.blocks(c): ker.even_split(c, k, split_k) if split_k else
                ker.split_k(c, p.m_bucket, n, k, dtype.itemsize, *fill) if fill else 1 for c in p.configs}
    p.max_splits = max(p.splits.values())
    p.lock_tiles = max((cdiv(p.m_bucket, bm) * cdiv(n, bn) for (bm, bn, _), s in p.splits.items() if s > 1),
                       default=0)
    p.kw = dict(HAS_BIAS=has_bias, ROT=rot, ROT_B=rot_b or 1,
                DOT_PREC="ieee" if dtype == torch.float32 else "tf32")
    p.device = device.index if device.type == "cuda" else None
    # the raw stream getter Triton's driver uses too; none off a GPU (the interpreter)
    p.stream = functools.partial(raw_stream, p.device) if p.device is not None else int
    p.config, p.grid, p.launches = None, None, {}
    return p


def _grid(p: _Plan, m: int, n: int):
    """The launch grid of each config: (output tiles, its split-K factor)."""
    splits = p.splits

    def grid(meta):
        bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
        return cdiv(m, bm) * cdiv(n, bn), splits[bm, bn, bk]

    return grid


def _fire(p: _Plan, x, values, meta, bias, rotation, out, locks) -> None:
    """Launch plan ``p``: ``out [M, N] = (x [M, K] @ R) @ W^T + bias``, all contiguous and checked, so the
    row strides are the widths (a stride read is a quarter microsecond of host time each)."""
    m, k = x.shape
    n = values.shape[0]
    if p.rotate_first:
        x, rotation = apply_rotation(x, rotation).contiguous(), None
    if p.max_splits > 1:
        ws = x.new_empty((p.max_splits, m, n), dtype=torch.float32)
        locks = _split_locks(locks, x.device, p.lock_tiles)
    else:
        ws = locks = out  # placeholders: an unsplit launch never touches them
    args = (x, values, meta, x if rotation is None else rotation, out if bias is None else bias, out, ws, locks,
            m, n, k, p.m_bucket, k, k // 2, (k + 31) // 32, n)
    if p.device is not None and p.device != torch.cuda.current_device():
        with torch.cuda.device(p.device):
            _start(p, args)
    else:
        _start(p, args)


def _spec(args: tuple) -> tuple:
    """What Triton specialises a compiled kernel on that may differ between two calls of one plan: M equal to 1
    or a multiple of 16, and the 16-byte alignment of the tensors passed in (x, R, bias). The layer's layout
    and counters are fixed, the output and workspace fresh from the allocator, the other integers the plan's."""
    m = args[8]
    return m == 1, m % 16 == 0, args[0].data_ptr() % 16, args[3].data_ptr() % 16, args[4].data_ptr() % 16


def _start(p: _Plan, args: tuple) -> None:
    """Launch directly when this specialisation has been launched before; else through Triton: the autotuner
    the first time a bucket runs eagerly, its choice after that, and inside a CUDA-graph capture before any
    eager call the first config (a capture never autotunes: the benchmark launches would be captured; the next
    eager call tunes the bucket). The compiled kernel of the bucket's choice is kept for the next call."""
    spec = _spec(args) if p.config is not None else None
    launch = p.launches.get(spec)
    if launch is not None:
        bm, tiles_n, split = p.grid
        launch(cdiv(args[8], bm) * tiles_n, split, p.stream(), *args)
        return
    grid = _grid(p, args[8], args[9])
    if p.config is None and not _capturing(args[0].device):
        compiled = p.kernel[grid](*args, **p.kw)
        _choose(p, p.kernel.best_config, args[9])
        spec = _spec(args)
    else:
        config = p.config or p.configs[0]
        compiled = p.kernel.fn.run(*args, grid=grid, warmup=False, **p.kw, **config.all_kwargs())
    if p.config is not None:
        launch = direct_launch(compiled, _constexprs({**p.kw, **p.config.kwargs}, len(args)))
        if launch is not None:  # the interpreter compiles nothing
            p.launches[spec] = launch


def _choose(p: _Plan, config, n: int) -> None:
    bm, bn, bk = _kernels().blocks(config)
    p.config, p.grid = config, (bm, cdiv(n, bn), p.splits[bm, bn, bk])


def _constexprs(values: dict, runtime: int) -> tuple:
    """The kernel's parameters after its ``runtime`` ones, in order: from ``values``, else their defaults (a
    compiled kernel's launcher takes every parameter, constexprs included)."""
    return tuple(values.get(name, default) for name, default in _params()[runtime:])


@functools.cache
def _params() -> tuple:
    """(name, default) of every kernel parameter, in order."""
    params = inspect.signature(_kernels().sparse24_matmul_kernel.fn).parameters.values()
    return tuple((q.name, q.default) for q in params)


def _launch(x, values, meta, bias, rotation, out, split_k=None, locks=None) -> None:
    """``out [M, N] = (x [M, K] @ R) @ W^T + bias``; all checked, x and out 2-D."""
    if interpreting() and x.dtype == torch.bfloat16:
        up = [None if t is None else t.float() for t in (x, values, bias, rotation)]
        tmp = torch.empty(out.shape, dtype=torch.float32, device=out.device)
        _launch(up[0], up[1], meta, up[2], up[3], tmp, split_k, locks)
        out.copy_(tmp)
        return
    m, k = x.shape
    n = values.shape[0]
    if m == 0 or n == 0:
        return
    # No-ops for prepared layouts; the kernels assume unit strides along the last dim.
    x, values, meta = x.contiguous(), values.contiguous(), meta.contiguous()
    bias = None if bias is None else bias.contiguous()
    rotation = None if rotation is None else rotation.contiguous()
    p = _plan(m, n, k, x.dtype, x.device, _rotation_block(rotation, k), bias is not None, split_k)
    _fire(p, x, values, meta, bias, rotation, out, locks)


def _rotation_block(rotation, k: int) -> int | None:
    """R's block size; a full R is one block of K."""
    return None if rotation is None else (rotation.shape[-1] if rotation.dim() == 3 else k)


class Sparse24Layer:
    """One layer's prepared kernel state: the layout, its own split-K counters (made here, outside any CUDA-graph
    capture) and, per M bucket, the launch plan with the autotuner's choice and its compiled kernels, so an
    eager call does no more than allocate and launch (:mod:`sparse_runtime.ops.triton_launch`).

    Calls take ``x [..., K]`` already checked against the layer (``SparseLinear.forward`` does); under
    ``torch.compile`` they go through the custom ops."""

    def __init__(self, values: torch.Tensor, meta: torch.Tensor):
        self.values, self.meta = prepare_sparse24(values, meta)
        self.n, self.k = self.values.shape[0], self.values.shape[1] * 2
        self.locks = decode_locks(self.n, self.values.device)
        self._plans: dict = {}
        self._upcast = interpreting() and values.dtype == torch.bfloat16  # the interpreter's bf16 is wrong

    def __call__(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 rotation: Optional[torch.Tensor] = None) -> torch.Tensor:
        if torch.compiler.is_compiling() or self._upcast:
            if rotation is None:
                return sparse24_matmul(x, self.values, self.meta, bias, locks=self.locks)
            return rotate_sparse24_matmul(x, rotation, self.values, self.meta, bias, locks=self.locks)
        x2 = x if x.dim() == 2 else x.reshape(-1, self.k)
        m = x2.shape[0]
        out = x2.new_empty((m, self.n))  # new_empty: a fraction of torch.empty(dtype=, device=)'s host time
        if x.dim() != 2:
            out = out.view(*x.shape[:-1], self.n)
        if m == 0 or self.n == 0:
            return out
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if rotation is not None and not rotation.is_contiguous():
            rotation = rotation.contiguous()
        rot_b = _rotation_block(rotation, self.k)
        key = (m_bucket(m), bias is None, rot_b)  # plans depend on M only through its bucket
        p = self._plans.get(key)
        if p is None:
            p = self._plans[key] = _plan(m, self.n, self.k, x.dtype, x.device, rot_b, bias is not None, None)
        _fire(p, x2, self.values, self.meta, bias, rotation, out if x.dim() == 2 else out.view(m, self.n), self.locks)
        return out


def _split_locks(locks, device, tiles: int) -> torch.Tensor:
    if locks is None:
        return _tile_locks(device, tiles)
    if locks.dtype != torch.int32 or locks.device != device or locks.numel() < tiles:
        raise ShapeError(f"sparse24: locks must be int32 with >= {tiles} elements on {device} (see decode_locks), "
                         f"got {locks.dtype} [{locks.numel()}] on {locks.device}")
    return locks


def _run(x, values, meta, bias, rotation, out, split_k, op, locks=None) -> torch.Tensor:
    _check(x, values, meta, bias, rotation, op)
    n = values.shape[0]
    shape = (*x.shape[:-1], n)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ShapeError(f"{op}: out must be a contiguous {x.dtype} tensor of shape {list(shape)} on {x.device}, "
                         f"got {out.dtype} {list(out.shape)} on {out.device}")
    _launch(x.reshape(-1, x.shape[-1]), values, meta, bias, rotation, out.view(-1, n), split_k, locks)
    return out


# -- custom ops ------------------------------------------------------------------------------------------
@torch.library.custom_op("sparse_runtime::sparse24_matmul", mutates_args=())
def _sparse24_matmul_op(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                        bias: Optional[torch.Tensor], locks: Optional[torch.Tensor] = None) -> torch.Tensor:
    # locks: not a mutation (the kernel leaves every counter zero, as it found it)
    return _run(x, values, meta, bias, None, None, None, "sparse24_matmul", locks)


@torch.library.custom_op("sparse_runtime::rotate_sparse24_matmul", mutates_args=())
def _rotate_sparse24_matmul_op(x: torch.Tensor, rotation: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                               bias: Optional[torch.Tensor], locks: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _run(x, values, meta, bias, rotation, None, None, "rotate_sparse24_matmul", locks)


@_sparse24_matmul_op.register_fake
def _(x, values, meta, bias, locks=None):
    _check(x, values, meta, bias, None, "sparse24_matmul")
    return x.new_empty((*x.shape[:-1], values.shape[0]))


@_rotate_sparse24_matmul_op.register_fake
def _(x, rotation, values, meta, bias, locks=None):
    _check(x, values, meta, bias, rotation, "rotate_sparse24_matmul")
    return x.new_empty((*x.shape[:-1], values.shape[0]))


# -- public ----------------------------------------------------------------------------------------------
def sparse24_matmul(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    out: Optional[torch.Tensor] = None,
                    split_k: Optional[int] = None, locks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W^T + bias`` for ``W`` in the layout of :func:`prepare_sparse24`; ``x [..., K]``.

    Under ``torch.compile`` this is the custom op; eager calls launch directly, skipping the op dispatcher's
    host overhead (which decode, at ~10 us a GEMV, would feel). ``out`` (written in place) and ``split_k``
    (force a split-K factor) are for eager use and tests. ``locks``: split-K counters from :func:`decode_locks`,
    made outside any CUDA-graph capture (default: a shared set per stream)."""
    if out is None and split_k is None and torch.compiler.is_compiling():
        return torch.ops.sparse_runtime.sparse24_matmul(x, values, meta, bias, locks)
    return _run(x, values, meta, bias, None, out, split_k, "sparse24_matmul", locks)


def rotate_sparse24_matmul(x: torch.Tensor, rotation: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                           bias: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                           split_k: Optional[int] = None, locks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(x @ R) @ W^T + bias`` with ``R`` full ``[K, K]`` or block-diagonal ``[K/b, b, b]``, fused
    (rotated first where no config fits R's tile in the device's shared memory)."""
    if out is None and split_k is None and torch.compiler.is_compiling():  # see sparse24_matmul
        return torch.ops.sparse_runtime.rotate_sparse24_matmul(x, rotation, values, meta, bias, locks)
    return _run(x, values, meta, bias, rotation, out, split_k, "rotate_sparse24_matmul", locks)
