"""Torch-facing wrappers of the Triton 2:4 kernels (``sparse_runtime.kernels.sparse24``).

Each wrapper checks shapes, dtypes and devices, allocates the output and
launches through the one launch path (``triton_launch.launch`` of the
``triton_plan.LaunchPlan`` of the problem, shared by all callers): the prepared
:class:`Sparse24Layer`, the functional API and the ``torch.library`` custom ops
(``torch.ops.sparse_runtime.sparse24_matmul`` and ``rotate_sparse24_matmul``)
that the functional forms become under ``torch.compile``; their fake
implementations let it trace through them. CUDA graphs capture them once each
M bucket has been compiled eagerly (:meth:`Sparse24Layer.warm_up`, or one eager
call per bucket).

The kernels take the Triton layout :func:`prepare_sparse24` derives from the
canonical format: ``values [N, K/2]`` as is and ``meta`` repacked to int32
words ``[N, ceil(K/32)]``. On the CPU they run under ``TRITON_INTERPRET=1``
(tests); there bf16 is computed in fp32, since the interpreter's bf16
arithmetic is wrong.

Quantized weights (:mod:`sparse_runtime.format.quant`) pass their stored codes as ``values`` (int8 or fp8
``[N, K/2]``, int4 packed ``[N, K/4]`` uint8) and ``scales [N, groups]`` in x's dtype; the kernel dequantizes in
registers. Groups are whole rows or a power of two of columns (:func:`group_refusal`).
"""
from typing import Optional

import torch

from ..errors import ShapeError
from ..format.codec import cdiv, unsupported_dtype
from ..format.quant import CODE_DTYPES
from ..format.rotation import check_rotation
from . import triton_plan
from .triton_launch import bucket_rows, launch
from .caches import m_bucket
from .triton_plan import CTAS_PER_SM, interpreting, launch_plan

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SCHEME_OF_CODES = {dtype: scheme for scheme, dtype in CODE_DTYPES.items()}


# -- quantized values ------------------------------------------------------------------------------------
def in_features(values: torch.Tensor) -> int:
    """K of a weight whose kept values (or codes) are ``values [N, C]``: int4 codes pack two per byte."""
    return values.shape[1] * (4 if _SCHEME_OF_CODES.get(values.dtype) == "int4" else 2)


def group_refusal(k: int, groups: int) -> str | None:
    """Why the kernel cannot take ``groups`` scales per row of ``k`` columns, or None: a K tile must hold whole
    groups or lie in one, so a group is a whole row or a power of two of at least 8 columns."""
    if groups == 1:
        return None
    group = k // groups
    if groups <= 0 or k % groups or group < 8 or group & (group - 1):
        return f"quantization groups of {k / groups:g} columns (K={k}, {groups} groups); the Triton kernel " \
               "takes one scale per row or groups of a power of two (>= 8) columns"
    return None


def quant_mode(values: torch.Tensor, scales: Optional[torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    """(values as the kernel reads them, its ``QUANT``, its ``QGROUP``) for checked operands: fp8 codes go in as
    bytes (sm_80's Triton has no e4m3 type); ``QGROUP`` is 0 for one scale per row."""
    ker = triton_plan.kernels()
    if scales is None:
        return values, ker.Q_NONE.value, 0
    scheme = _SCHEME_OF_CODES[values.dtype]
    qgroup = 0 if scales.shape[1] == 1 else in_features(values) // scales.shape[1]
    if scheme == "fp8":
        return values.view(torch.uint8), ker.Q_FP8.value, qgroup
    return values, (ker.Q_INT4 if scheme == "int4" else ker.Q_INT8).value, qgroup


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
    """The kernels' layout from the canonical ``(values [N, K/2], meta [N, ceil(K/8)] uint8)`` (or stored codes as
    ``values``, see the module docstring)."""
    return values.contiguous(), pack_meta_int32(meta, in_features(values))


# -- checks ----------------------------------------------------------------------------------------------
def _check(x, values, meta, bias, rotation, op, scales=None) -> None:
    for name, t in (("x", x), ("values", values), ("meta", meta), ("bias", bias), ("rotation", rotation),
                    ("scales", scales)):
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
    n, k = values.shape[0], in_features(values)
    if k % 4:
        raise ShapeError(f"{op}: in_features={k} (2 x values.shape[1]) is not a multiple of 4")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ShapeError(f"{op}: x has shape {list(x.shape)}, expected [..., {k}] to match values {list(values.shape)}")
    if scales is None and values.dtype != x.dtype:
        codes = " (quantized codes need their scales)" if values.dtype in _SCHEME_OF_CODES else ""
        raise TypeError(f"{op}: values dtype {values.dtype} != x dtype {x.dtype}{codes}")
    if scales is not None:
        _check_scales(values, scales, x.dtype, n, k, op)
    if meta.dtype != torch.int32 or tuple(meta.shape) != (n, (k + 31) // 32):
        raise ShapeError(f"{op}: meta must be int32 [{n}, {(k + 31) // 32}] (see prepare_sparse24), "
                         f"got {meta.dtype} {list(meta.shape)}")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype != x.dtype):
        raise ShapeError(f"{op}: bias must be {x.dtype} [{n}], got {bias.dtype} {list(bias.shape)}")
    if rotation is not None:
        check_rotation(rotation, k)
        if rotation.dtype != x.dtype:
            raise TypeError(f"{op}: rotation dtype {rotation.dtype} != x dtype {x.dtype}")


def _check_scales(values, scales, dtype, n: int, k: int, op: str) -> None:
    if values.dtype not in _SCHEME_OF_CODES:
        raise TypeError(f"{op}: scales given for {values.dtype} values; quantized values are codes: "
                        + ", ".join(f"{dt} ({s})" for s, dt in CODE_DTYPES.items()))
    if scales.dtype != dtype:
        raise TypeError(f"{op}: scales dtype {scales.dtype} != x dtype {dtype}")
    groups = scales.shape[1] if scales.dim() == 2 else 0
    if scales.dim() != 2 or scales.shape[0] != n or groups == 0 or k % groups:
        raise ShapeError(f"{op}: scales must be [N, groups] = [{n}, groups] with groups dividing K={k}, "
                         f"got {list(scales.shape)}")
    why = group_refusal(k, groups)
    if why:
        raise ShapeError(f"{op}: {why}")


def decode_locks(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed split-K counters for one layer of ``n`` outputs: one per decode tile (BLOCK_N >= 16), and at
    least ``CTAS_PER_SM`` per SM (a launch splits only when it has fewer output tiles than that).

    Allocate them at prepare time, outside any CUDA-graph capture: counters made inside a capture come from
    that graph's private pool, and counters shared by several graphs race when their replays overlap."""
    fill = triton_plan.sms_and_l2(device)  # through the module: tests fake the device there
    return torch.zeros(max(cdiv(n, 16), CTAS_PER_SM * fill[0] if fill else 0), dtype=torch.int32, device=device)


def _matmul(x, values, meta, bias, rotation, out, split_k=None, locks=None, scales=None) -> None:
    """``out [M, N] = (x [M, K] @ R) @ W^T + bias``; all checked, x and out 2-D."""
    if interpreting() and x.dtype == torch.bfloat16:  # the interpreter's bf16 arithmetic is wrong
        up = [None if t is None else t.float() for t in (x, bias, rotation, scales)]
        tmp = torch.empty(out.shape, dtype=torch.float32, device=out.device)
        values = values if scales is not None else values.float()  # codes stay codes
        _matmul(up[0], values, meta, up[1], up[2], tmp, split_k, locks, up[3])
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
    scales = None if scales is None else scales.contiguous()
    values, quant, qgroup = quant_mode(values, scales)
    plan = launch_plan(m, n, k, x.dtype, x.device, _rotation_block(rotation, k), bias is not None, split_k, quant,
                       qgroup)
    launch(plan, x, values, meta, bias, rotation, out, locks, scales)


def _rotation_block(rotation, k: int) -> int | None:
    """R's block size; a full R is one block of K."""
    return None if rotation is None else (rotation.shape[-1] if rotation.dim() == 3 else k)


class Sparse24Layer:
    """One layer's prepared kernel state: the layout, its own split-K counters (made here, outside any CUDA-graph
    capture) and, per M bucket, the launch plan (shared with every caller of the same problem) with the autotuner's
    choice and its compiled kernels, so an eager call does no more than allocate and launch
    (:func:`sparse_runtime.ops.triton_launch.launch`, as every path does).

    Calls take ``x [..., K]`` already checked against the layer (``SparseLinear.forward`` does); under
    ``torch.compile`` they go through the custom ops. Before capturing CUDA graphs, :meth:`warm_up` the row counts
    the graphs will run: a launch that would compile inside a capture raises."""

    def __init__(self, values: torch.Tensor, meta: torch.Tensor, scales: Optional[torch.Tensor] = None):
        self.values, self.meta = prepare_sparse24(values, meta)
        self.scales = None if scales is None else scales.contiguous()
        self.n, self.k = self.values.shape[0], in_features(self.values)
        self._codes, self._quant, self._qgroup = quant_mode(self.values, self.scales)  # what the kernel reads
        self.locks = decode_locks(self.n, self.values.device)
        self._plans: dict = {}
        self.dtype = values.dtype if scales is None else scales.dtype  # what x and the output are
        self._upcast = interpreting() and self.dtype == torch.bfloat16  # the interpreter's bf16 is wrong

    def __call__(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 rotation: Optional[torch.Tensor] = None) -> torch.Tensor:
        if torch.compiler.is_compiling() or self._upcast:
            if rotation is None:
                return sparse24_matmul(x, self.values, self.meta, bias, locks=self.locks, scales=self.scales)
            return rotate_sparse24_matmul(x, rotation, self.values, self.meta, bias, locks=self.locks,
                                          scales=self.scales)
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
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = launch_plan(m, self.n, self.k, x.dtype, x.device, rot_b, bias is not None,
                                                  None, self._quant, self._qgroup)
        launch(plan, x2, self._codes, self.meta, bias, rotation, out if x.dim() == 2 else out.view(m, self.n),
               self.locks, self.scales)
        return out

    def warm_up(self, ms, bias: Optional[torch.Tensor] = None, rotation: Optional[torch.Tensor] = None) -> None:
        """Autotune and compile, eagerly, what calls of ``ms`` rows (any counts: their M buckets are warmed whole)
        with this ``bias`` and ``rotation`` launch: every specialisation of each bucket that Triton compiles
        separately, for inputs aligned as fresh tensors are."""
        for m in sorted({rows for m in ms for rows in bucket_rows(m)}):
            self(self.meta.new_zeros((m, self.k), dtype=self.dtype), bias, rotation)


def _checked_matmul(x, values, meta, bias, rotation, out, split_k, op, locks=None, scales=None) -> torch.Tensor:
    _check(x, values, meta, bias, rotation, op, scales)
    n = values.shape[0]
    shape = (*x.shape[:-1], n)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ShapeError(f"{op}: out must be a contiguous {x.dtype} tensor of shape {list(shape)} on {x.device}, "
                         f"got {out.dtype} {list(out.shape)} on {out.device}")
    _matmul(x.reshape(-1, x.shape[-1]), values, meta, bias, rotation, out.view(-1, n), split_k, locks, scales)
    return out


# -- custom ops ------------------------------------------------------------------------------------------
@torch.library.custom_op("sparse_runtime::sparse24_matmul", mutates_args=())
def _sparse24_matmul_op(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                        bias: Optional[torch.Tensor], locks: Optional[torch.Tensor] = None,
                        scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    # locks: not a mutation (the kernel leaves every counter zero, as it found it)
    return _checked_matmul(x, values, meta, bias, None, None, None, "sparse24_matmul", locks, scales)


@torch.library.custom_op("sparse_runtime::rotate_sparse24_matmul", mutates_args=())
def _rotate_sparse24_matmul_op(x: torch.Tensor, rotation: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                               bias: Optional[torch.Tensor], locks: Optional[torch.Tensor] = None,
                               scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _checked_matmul(x, values, meta, bias, rotation, None, None, "rotate_sparse24_matmul", locks, scales)


@_sparse24_matmul_op.register_fake
def _(x, values, meta, bias, locks=None, scales=None):
    _check(x, values, meta, bias, None, "sparse24_matmul", scales)
    return x.new_empty((*x.shape[:-1], values.shape[0]))


@_rotate_sparse24_matmul_op.register_fake
def _(x, rotation, values, meta, bias, locks=None, scales=None):
    _check(x, values, meta, bias, rotation, "rotate_sparse24_matmul", scales)
    return x.new_empty((*x.shape[:-1], values.shape[0]))


# -- public ----------------------------------------------------------------------------------------------
def sparse24_matmul(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    out: Optional[torch.Tensor] = None, split_k: Optional[int] = None,
                    locks: Optional[torch.Tensor] = None, scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W^T + bias`` for ``W`` in the layout of :func:`prepare_sparse24`; ``x [..., K]``.

    Under ``torch.compile`` this is the custom op; eager calls launch directly, skipping the op dispatcher's
    host overhead (which decode, at ~10 us a GEMV, would feel). ``out`` (written in place) and ``split_k``
    (force a split-K factor) are for eager use and tests. ``locks``: split-K counters from :func:`decode_locks`,
    made outside any CUDA-graph capture (default: the launch plan's own, one set per stream). ``scales``: with
    quantized codes as ``values`` (module docstring)."""
    if out is None and split_k is None and torch.compiler.is_compiling():
        return torch.ops.sparse_runtime.sparse24_matmul(x, values, meta, bias, locks, scales)
    return _checked_matmul(x, values, meta, bias, None, out, split_k, "sparse24_matmul", locks, scales)


def rotate_sparse24_matmul(x: torch.Tensor, rotation: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                           bias: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                           split_k: Optional[int] = None, locks: Optional[torch.Tensor] = None,
                           scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(x @ R) @ W^T + bias`` with ``R`` full ``[K, K]`` or block-diagonal ``[K/b, b, b]``, fused
    (rotated first where no config fits R's tile in the device's shared memory)."""
    if out is None and split_k is None and torch.compiler.is_compiling():  # see sparse24_matmul
        return torch.ops.sparse_runtime.rotate_sparse24_matmul(x, rotation, values, meta, bias, locks, scales)
    return _checked_matmul(x, values, meta, bias, rotation, out, split_k, "rotate_sparse24_matmul", locks, scales)
