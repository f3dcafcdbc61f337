"""The ``mma.sp`` decode kernel from Python: the prepared weight and the call.

Over the extension :mod:`sparse_runtime._mmasp` (``csrc/mmasp.cu``), which takes device pointers and
the stream as ints. The layout is derived once, at load time, by :mod:`sparse_runtime.ops.mmasp_layout`; the
split over K depends on the shape, the GPU's SM count and the kernel's occupancy on it only (not on M), so it,
the grid and the per-CTA-column counters are fixed at prepare time, outside any CUDA graph capture. The counters
return to zero after every launch; two streams running the same layer at once would race on them (nothing here
does that).
"""
from __future__ import annotations

import torch

from . import mmasp_layout as layout
from .devices import cuda_unavailable, raw_stream
from ..errors import BackendUnavailable, ShapeError
from ..format.codec import dtype_name, unsupported_dtype

try:
    from .. import _mmasp as _D
    _IMPORT_ERROR = None
except ImportError as e:  # the pure-Python install: no nvcc at build time
    _D = None
    _IMPORT_ERROR = f"the extension sparse_runtime._mmasp is not built or does not load ({e})"

DTYPES = (torch.float16, torch.bfloat16)  # what the kernel takes, by dtype_name


def unavailable(device: torch.device | str | None = None) -> str | None:
    """Why the kernel cannot run on ``device`` (default: the current CUDA device), or None."""
    if _D is None:
        return _IMPORT_ERROR
    return cuda_unavailable(torch.device("cuda") if device is None else torch.device(device), "the mma.sp kernel")


class MmaspWeight:
    """A 2:4 weight in the kernel's fragment layout, with its launch fixed: ``split_chunks`` and counters."""

    def __init__(self, vals: torch.Tensor, meta: torch.Tensor, n: int, k: int, dtype: torch.dtype,
                 bias: torch.Tensor | None, split_chunks: int):
        self.vals, self.meta, self.n, self.k, self.dtype, self.bias = vals, meta, n, k, dtype, bias
        self.split_chunks = split_chunks
        ctas_n, split = layout.grid(n, k, split_chunks)
        self.split = split
        self.counters = torch.zeros(ctas_n if split > 1 else 1, dtype=torch.int32, device=vals.device)

    @classmethod
    def from_canonical(cls, values: torch.Tensor, meta: torch.Tensor, k: int,
                       bias: torch.Tensor | None = None) -> MmaspWeight:
        why = unsupported_dtype(values.dtype, DTYPES)
        if why:
            raise ShapeError(f"the mma.sp kernel: {why}")
        n = values.shape[0]
        why = layout.unsupported_shape(n, k)
        if why:
            raise ShapeError(why)
        vals, meta_w = layout.fragment_layout(values.cpu(), meta.cpu(), k)  # a gather, once per load
        vals, meta_w = vals.to(values.device), meta_w.to(values.device)
        bias = None if bias is None else bias.to(values.dtype).contiguous()
        return cls(vals, meta_w, n, k, values.dtype, bias, split_columns(n, k, values.device, values.dtype))


def split_columns(n: int, k: int, device: torch.device, dtype: torch.dtype) -> int:
    """:func:`mmasp_layout.split_columns` with the device's SM count and the kernel's occupancy on it (the
    smaller of its two variants, M <= 8 and M > 8, so that every M gets the same split); off a GPU or without
    the extension, an H100's 132 SMs at the 2 CTAs per SM the split aims for."""
    if not device.type == "cuda" or _D is None:
        return layout.split_columns(n, k, 132, lambda per: 2)
    index = device.index if device.index is not None else torch.cuda.current_device()
    sms = torch.cuda.get_device_properties(index).multi_processor_count
    name = dtype_name(dtype)
    return layout.split_columns(n, k, sms, lambda per: min(_D.ctas_per_sm(index, m, per, name)
                                                            for m in (1, layout.DECODE_MAX_M)))


def linear(x: torch.Tensor, w: MmaspWeight) -> torch.Tensor:
    """``x [M, K] @ W^T (+ bias)`` for M <= 16, on the device ``w`` lives on."""
    m = x.shape[0]
    if x.dim() != 2 or x.shape[1] != w.k or not 1 <= m <= layout.DECODE_MAX_M:
        raise ShapeError(f"the mma.sp kernel takes x [M <= {layout.DECODE_MAX_M}, {w.k}], got {tuple(x.shape)}")
    if x.dtype != w.dtype:
        raise ShapeError(f"x is {x.dtype}, the weight {w.dtype}")
    why = unavailable(x.device)
    if why:
        raise BackendUnavailable(why)
    x = x.contiguous()
    if x.data_ptr() % 16:  # cp.async copies 16-byte vectors
        x = x.clone()
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    y = torch.empty(m, w.n, dtype=x.dtype, device=x.device)
    ws = torch.empty(w.split, m, w.n, dtype=torch.float32, device=x.device) if w.split > 1 else y
    _D.linear(index, w.vals.data_ptr(), w.meta.data_ptr(), x.data_ptr(),
              0 if w.bias is None else w.bias.data_ptr(), y.data_ptr(), ws.data_ptr(), w.counters.data_ptr(),
              m, w.n, w.k, w.split_chunks, dtype_name(x.dtype), raw_stream(index))
    return y
