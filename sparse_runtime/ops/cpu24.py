"""2:4 sparse linear on the CPU: the wrapper of the extension :mod:`sparse_runtime._cpu24` (``csrc/cpu24_*.cpp``).

``linear(x, values, meta, bias)`` is ``x @ W^T + bias`` with ``W [N, K]`` in the canonical 2:4 format
(:mod:`sparse_runtime.format.codec`: ``values [N, K/2]``, ``meta [N, K/8]`` uint8), fp32 or bf16 storage (x,
values, bias and the output share it), fp32 accumulation, ``K % 8 == 0``. Up to 16 rows of x (decode), and
beyond while x is small, it streams the compressed weight once (17/32 of the dense fp32 bytes); larger inputs run
a sparse GEMM on the kept values (half a dense GEMM's multiplies), or, for bf16 on CPUs that multiply bf16
natively, decompress panels of W for torch's GEMM (prefill). The kernel's ISA (``avx512bf16``, ``avx512``, ``avx2``,
``scalar``) is picked at run time; threads are torch's.

Quantized values (:mod:`sparse_runtime.format.quant`, schemes :data:`QUANT_CODES`): ``values`` holds int8 codes
``[N, K/2]`` or int4 codes packed two per byte ``[N, K/4]`` uint8, and ``scales [N, groups]`` in x's dtype (one
per row, or per group of ``K/groups`` input columns) come with them. Streaming widens the codes to fp32 in
registers and scales each row's (or group's) sum; prefill dequantizes (a chunk of rows at a time). Groups must be a
multiple of 32 columns for the SIMD kernels; other groups (multiples of 8) run on the scalar kernel.

The canonical tensors are used as they are: no CPU layout is derived. Under ``torch.compile`` the call is the
custom op ``torch.ops.sparse_runtime.cpu24_linear``; eager calls skip the op dispatch. This is the only module
that imports the extension.
"""
import math
from typing import Optional

import torch

from ..errors import BackendUnavailable, ShapeError
from ..format.quant import CODE_DTYPES

try:
    from .. import _cpu24 as _E
    _IMPORT_ERROR = None
except ImportError as e:  # a pure-Python install: no C++ compiler or torch at build time
    _E = None
    _IMPORT_ERROR = f"the extension sparse_runtime._cpu24 is not built or does not load ({e})"

DTYPES = (torch.float32, torch.bfloat16)
QUANT_CODES = {s: CODE_DTYPES[s] for s in ("int8", "int4")}  # the schemes the kernels dequantize: their code dtypes
K_MULTIPLE = 8  # in_features: whole meta bytes per row
# beyond decode: stream the compressed weight, the sparse GEMM on the kept values, or panels for torch's GEMM
PATHS = ("stream", "gemm", "panels")


def available() -> bool:
    return _E is not None


def unavailable_reason() -> Optional[str]:
    """Why the extension cannot run here, or None."""
    return _IMPORT_ERROR


def isas() -> list[str]:
    """The kernel ISAs this CPU runs, worst to best (``[]`` without the extension)."""
    return list(_E.isas()) if _E is not None else []


def read_bandwidth_probe(buffer: torch.Tensor) -> float:
    """Sum of a contiguous fp32 CPU ``buffer``, read with torch's threads and the best ISA: time it for the
    machine's read bandwidth as the kernels see it."""
    _require()
    return _E.read_bandwidth_probe(buffer)


def parallel_for_threads() -> int:
    """Threads the kernels split their work over: torch's count, unless the extension was built without OpenMP."""
    _require()
    return _E.parallel_for_threads()


def _require():
    if _E is None:
        raise BackendUnavailable(_IMPORT_ERROR)


def _check(x, values, meta, bias, scales=None) -> tuple[int, int]:
    """``(N, K)``, or a clear error for inputs the kernel cannot take."""
    for name, t in (("x", x), ("values", values), ("meta", meta), ("bias", bias), ("scales", scales)):
        if t is not None and t.device.type != "cpu":
            raise BackendUnavailable(f"cpu24.linear runs on CPU tensors only; {name} is on {t.device}")
    if scales is None:
        if values.dtype in QUANT_CODES.values():
            raise TypeError(f"cpu24.linear: values are {values.dtype} codes but no scales were given")
        if values.dtype not in DTYPES:
            raise TypeError(f"cpu24.linear: values dtype {values.dtype} is not supported; supported: torch.float32, "
                            "torch.bfloat16, or int8/int4 codes with scales")
        dtype, owner, per_byte = values.dtype, "values", 2
    else:
        if values.dtype not in QUANT_CODES.values():
            raise TypeError(f"cpu24.linear: quantized values must be int8 codes (int8) or packed int4 codes (uint8), "
                            f"got {values.dtype}")
        if scales.dtype not in DTYPES:
            raise TypeError(f"cpu24.linear: scales dtype {scales.dtype} is not supported; supported: torch.float32, "
                            "torch.bfloat16")
        dtype, owner, per_byte = scales.dtype, "scales", 4 if values.dtype == QUANT_CODES["int4"] else 2
    for name, t in (("x", x), ("bias", bias)):
        if t is not None and t.dtype != dtype:
            raise TypeError(f"cpu24.linear: {name} is {t.dtype} but {owner} is {dtype}; x, bias and {owner} "
                            "share one dtype (torch.float32 or torch.bfloat16)")
    if meta.dtype != torch.uint8:
        raise TypeError(f"cpu24.linear: meta must be torch.uint8, got {meta.dtype}")
    if values.dim() != 2:
        raise ShapeError(f"cpu24.linear: values must be 2-D [N, K/{per_byte}], got shape {tuple(values.shape)}")
    n, k = values.shape[0], values.shape[1] * per_byte
    if k == 0 or k % K_MULTIPLE:
        raise ShapeError(f"cpu24.linear: in_features K={k} (values [N, K/{per_byte}] = {tuple(values.shape)}) must "
                         "be a positive multiple of 8")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ShapeError(f"cpu24.linear: x {tuple(x.shape)} must end in K={k}, the weight's in_features "
                         f"(values {tuple(values.shape)})")
    if tuple(meta.shape) != (n, k // 8):
        raise ShapeError(f"cpu24.linear: meta must be [N, K/8] = {[n, k // 8]}, got {list(meta.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ShapeError(f"cpu24.linear: bias must be [N] = [{n}], got {list(bias.shape)}")
    if scales is not None:
        groups = scales.shape[1] if scales.dim() == 2 else 0
        if scales.dim() != 2 or scales.shape[0] != n or groups == 0 or k % groups or (k // groups) % 8:
            raise ShapeError(f"cpu24.linear: scales must be [N, groups] = [{n}, groups], groups of a multiple of 8 "
                             f"of the K={k} columns, got {list(scales.shape)}")
    return n, k


def _run(x, values, meta, bias, isa, out=None, path="", scales=None):
    _require()
    try:
        return _launch(x, values, meta, bias, isa, out, path, scales)
    except (RuntimeError, ValueError, TypeError, IndexError):
        _check(x, values, meta, bias, scales)  # the kernel refused: say why in this module's terms
        raise


def _launch(x, values, meta, bias, isa, out, path, scales):
    # The extension checks every input itself (csrc/cpu24_ext.cpp); _check's friendlier errors run only when it
    # refuses: at decode sizes they cost more than the kernel.
    n, k = values.shape[0], x.shape[-1]
    shape = (*x.shape[:-1], n)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype)  # owns its storage, as a custom op's output must
    elif tuple(out.shape) != shape or out.dtype != x.dtype or out.device.type != "cpu" or not out.is_contiguous():
        raise ShapeError(f"cpu24.linear: out must be a contiguous CPU {x.dtype} tensor of shape {list(shape)}, "
                         f"got {out.dtype} {list(out.shape)} on {out.device}")
    m = math.prod(x.shape[:-1])
    _E.linear(x.reshape(m, k).contiguous(), values.contiguous(), meta.contiguous(),  # copies only if strided
              None if bias is None else bias.contiguous(), isa, out.view(m, n), path,
              None if scales is None else scales.contiguous())
    return out


if _E is not None:  # the extension defines the op in C++ (no Python per call under torch.compile); its fake:
    @torch.library.register_fake("sparse_runtime::cpu24_linear")
    def _(values, meta, bias, x, isa="", path="", scales=None):
        n, _ = _check(x, values, meta, bias, scales)
        return x.new_empty((*x.shape[:-1], n))


def linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor] = None,
           isa: str = "", out: Optional[torch.Tensor] = None, path: str = "",
           scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x [..., K] @ W^T (+ bias) -> [..., N]``; W as canonical 2:4 ``values``/``meta``, or with ``scales`` as
    quantized codes (int8 ``[N, K/2]``, int4 packed ``[N, K/4]`` uint8) and their ``[N, groups]`` scales.

    ``isa``: ``""`` for the best this CPU runs, else one of :func:`isas` (the others raise ValueError).
    ``out``: a contiguous ``[..., N]`` tensor of x's dtype to write into (eager only).
    ``path``: one of :data:`PATHS` to force how more than 16 rows run (``""``: by the size of x)."""
    if torch.compiler.is_compiling() and out is None:
        return torch.ops.sparse_runtime.cpu24_linear(values, meta, bias, x, isa, path, scales)
    return _run(x, values, meta, bias, isa, out, path, scales)
