"""The canonical compressed weight format: the one form checkpoints hold.

A weight ``W [N, K]`` (out_features x in_features) with a sparsity pattern is
stored as two tensors, ``values`` and ``meta``. Backend layouts (the opaque
cuSPARSELt buffer, PyTorch's semi-structured tensor) are derived from these at
load time and never stored; the Triton kernels read them as they are.

``2:4`` (the tensor-core pattern)
    ``values [N, K/2]``, same dtype as W: the two kept entries of every group of
    4 consecutive input columns, in column order.
    ``meta [N, ceil(K/8)]`` uint8: the two 2-bit in-group indices of each kept
    value, packed densely and little-endian. Kept value ``j`` of a row (the
    column ``values[:, j]``) has its index in byte ``j // 4`` at bits
    ``2*(j % 4) .. 2*(j % 4) + 1``. So each byte holds two groups: group ``2b``
    in the low nibble, group ``2b+1`` in the high nibble, and in each nibble the
    low 2 bits are the first (smaller) kept index, the high 2 bits the second.
    The first index is always strictly smaller than the second. When ``K/4`` is
    odd the last high nibble is zero padding. This is the nibble-per-group
    order NVIDIA's sparse tensor cores read, before any hardware reordering.

``n:m`` (any other N:M, e.g. ``4:8``, ``1:4``)
    ``values [N, K*n/m]`` in column order and ``meta [N, K*n/m]`` uint8 holding
    each kept value's in-group index (0..m-1), strictly increasing per group.

``unstructured``
    ``values [nnz]``: the kept entries in row-major order, and
    ``meta [N, ceil(K/8)]`` uint8: the mask as a little-endian bitmap (column
    ``k`` of a row is bit ``k % 8`` of byte ``k // 8``).

Quantized values (N:M only; see :mod:`sparse_runtime.format.quant`)
    ``values`` holds the kept values' codes (int8 ``[N, C]``, int4 packed
    ``[N, C/2]`` uint8, fp8 e4m3 ``[N, C]``, ``C`` kept values per row) and
    ``scales [N, groups]`` their scales in the layer's dtype; ``meta`` is as
    above. ``to_dense()`` dequantizes, then decompresses.

Every decompression is exact: ``decompress(compress(W, mask)) == W * mask``
bit for bit, for any floating dtype; with quantization,
``compress(W, mask, quant=s).to_dense() == fake_quantize(W, s, mask=mask)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MaskError, QuantError, ShapeError
from . import quant as q
from .quant import QuantScheme

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what the format stores


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers, ``b > 0``."""
    return -(-a // b)


def dtype_name(dtype: torch.dtype, short: bool = False) -> str:
    """``torch.bfloat16 -> "bfloat16"`` (``short``: ``"bf16"``): how checkpoints, caches, the extensions, the CLI
    and error messages name a dtype."""
    name = str(dtype).removeprefix("torch.")
    return name.replace("bfloat", "bf").replace("float", "fp") if short else name


def unsupported_dtype(dtype: torch.dtype, supported) -> str | None:
    """Why ``dtype`` is refused by what takes ``supported``, or None: the one wording of a dtype refusal."""
    if dtype in supported:
        return None
    return f"unsupported dtype {dtype_name(dtype)}; supported: {', '.join(map(dtype_name, supported))}"


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"2:4" -> (2, 4)``; ``"unstructured" -> None``. Raises on anything else."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except (ValueError, AttributeError):
        raise ValueError(f"sparsity pattern must be 'N:M' or 'unstructured', got {pattern!r}") from None
    if not 0 < n < m or m > 256:
        raise ValueError(f"pattern {pattern!r} needs 0 < N < M <= 256")
    return n, m


def is_24(pattern: str) -> bool:
    """Whether ``pattern`` is 2:4, the sparse tensor cores' pattern."""
    return parse_pattern(pattern) == (2, 4)


def unsupported_pattern(pattern: str, supported) -> str | None:
    """Why ``pattern`` is refused by what takes ``supported``, or None: the one wording of a pattern refusal."""
    if parse_pattern(pattern) in {parse_pattern(p) for p in supported}:
        return None
    return f"unsupported pattern {pattern}; supported: {', '.join(supported)}"


def check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise a clear error for weights no sparse format should take."""
    if weight.dim() != 2:
        raise ShapeError(f"{name}: expected a 2-D weight [out_features, in_features], got shape {tuple(weight.shape)}")
    why = unsupported_dtype(weight.dtype, FLOAT_DTYPES)
    if why:
        raise TypeError(f"{name}: {why}")
    if not torch.isfinite(weight).all():
        bad = (~torch.isfinite(weight)).nonzero()[0].tolist()
        raise ValueError(f"{name}: weight has NaN/Inf values (first at row {bad[0]}, column {bad[1]})")


def _check_groups(k: int, m: int, name: str) -> None:
    if k % m:
        raise ShapeError(f"{name}: in_features={k} is not divisible by the group size {m}")


def _groups_keep(mask: torch.Tensor, n: int, m: int, name: str) -> None:
    counts = mask.view(mask.shape[0], -1, m).sum(-1)
    bad = (counts != n).nonzero()
    if len(bad):
        r, g = bad[0].tolist()
        raise MaskError(
            f"{name}: row {r}, group {g} (columns {g * m}..{g * m + m - 1}) keeps {int(counts[r, g])} of {m}, "
            f"expected exactly {n} ({len(bad)} bad group(s) in all)"
        )


def _nm_indices(weight: torch.Tensor, mask: torch.Tensor | None, n: int, m: int, name: str) -> torch.Tensor:
    """In-group indices [N, K/m, n] (ascending) of the kept entries."""
    rows, k = weight.shape
    if mask is None:
        # No mask: the nonzeros are the kept entries; groups with fewer than n
        # nonzeros keep some zeros (lowest columns first), which is still exact.
        mask = weight != 0
        counts = mask.view(rows, -1, m).sum(-1)
        if (counts > n).any():
            r, g = (counts > n).nonzero()[0].tolist()
            raise MaskError(f"{name}: row {r}, group {g} has {int(counts[r, g])} nonzeros, more than {n} of {m}")
    else:
        if mask.shape != weight.shape:
            raise ShapeError(f"{name}: mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}")
        mask = mask.to(device=weight.device, dtype=torch.bool)
        _groups_keep(mask, n, m, name)
    return kept_indices(mask, n, m)


def kept_indices(mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In-group indices [N, K/m, n], ascending, of the kept entries of ``mask``.

    A group keeping fewer than ``n`` is padded with its lowest unkept columns."""
    pos = torch.arange(m, device=mask.device)
    key = mask.view(mask.shape[0], -1, m).to(torch.int32) * (2 * m) + (m - 1 - pos)  # kept first, then low columns
    return key.topk(n, dim=-1).indices.sort(dim=-1).values


def compress_nm(weight: torch.Tensor, mask: torch.Tensor | None, n: int, m: int, name: str = "weight"):
    """Compress an N:M-sparse weight. Returns ``(values, meta)``; 2:4 packs meta to 2 bits."""
    check_weight(weight, name)
    _check_groups(weight.shape[1], m, name)
    rows, k = weight.shape
    idx = _nm_indices(weight, mask, n, m, name)
    values = weight.reshape(rows, -1, m).gather(-1, idx).reshape(rows, k * n // m)
    if (n, m) == (2, 4):
        return values, pack_meta_24(idx)
    return values, idx.to(torch.uint8).reshape(rows, -1)


def pack_meta_24(idx: torch.Tensor) -> torch.Tensor:
    """[N, K/4, 2] indices in 0..3 -> [N, ceil(K/8)] uint8 (see module docstring)."""
    rows, groups = idx.shape[:2]
    nib = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)
    if groups % 2:
        nib = torch.cat([nib, nib.new_zeros(rows, 1)], dim=1)
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


def unpack_meta_24(meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """[N, ceil(K/8)] uint8 -> [N, K/4, 2] int64 in-group indices."""
    groups = in_features // 4
    nib = torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(meta.shape[0], -1)[:, :groups]
    return torch.stack([nib & 0x3, nib >> 2], dim=-1).long()


def decompress_nm(values: torch.Tensor, meta: torch.Tensor, n: int, m: int, in_features: int) -> torch.Tensor:
    rows = values.shape[0]
    if (n, m) == (2, 4):
        idx = unpack_meta_24(meta, in_features)
    else:
        idx = meta.long().view(rows, -1, n)
    out = values.new_zeros(rows, in_features // m, m)
    out.scatter_(-1, idx, values.view(rows, -1, n))
    return out.view(rows, in_features)


def compress_unstructured(weight: torch.Tensor, mask: torch.Tensor | None, name: str = "weight"):
    check_weight(weight, name)
    if mask is None:
        mask = weight != 0
    elif mask.shape != weight.shape:
        raise ShapeError(f"{name}: mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}")
    mask = mask.to(device=weight.device, dtype=torch.bool)
    return weight[mask], pack_bits(mask)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """[N, K] bool -> [N, ceil(K/8)] uint8, column k at bit k % 8 of byte k // 8."""
    rows, k = mask.shape
    pad = (-k) % 8
    bits = torch.cat([mask, mask.new_zeros(rows, pad)], 1).view(rows, -1, 8).to(torch.uint8)
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    return (bits << shifts).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.view(packed.shape[0], -1)[:, :in_features].bool()


def decompress_unstructured(values: torch.Tensor, meta: torch.Tensor, in_features: int) -> torch.Tensor:
    mask = unpack_bits(meta, in_features)
    out = values.new_zeros(mask.shape)
    out[mask] = values
    return out


@dataclass
class SparseWeight:
    """A weight in the canonical format: ``pattern``, dense ``shape``, ``values`` and ``meta``; quantized, also
    ``scales`` and their scheme ``quant`` (``values`` then holds codes)."""

    pattern: str
    shape: tuple[int, int]
    values: torch.Tensor
    meta: torch.Tensor
    scales: torch.Tensor | None = None
    quant: QuantScheme | None = None

    @classmethod
    def compress(cls, weight: torch.Tensor, mask: torch.Tensor | None = None, pattern: str = "2:4",
                 name: str = "weight", quant: QuantScheme | None = None, scales: torch.Tensor | None = None):
        """``weight`` under ``mask``; with ``quant``, its kept values quantized under ``scales`` (default: the
        absmax of the kept entries, :func:`~sparse_runtime.format.quant.absmax_scales`)."""
        nm = parse_pattern(pattern)
        if quant is None and scales is not None:
            raise QuantError(f"{name}: scales given without a quantization scheme")
        if nm is None:
            values, meta = compress_unstructured(weight, mask, name)
        else:
            values, meta = compress_nm(weight, mask, *nm, name=name)
        if quant is None:
            return cls(pattern, tuple(weight.shape), values, meta)
        expected_shapes(pattern, tuple(weight.shape), quant=quant)  # refuses what cannot be quantized
        if scales is None:
            scales = q.absmax_scales(weight, quant, mask)
        if scales.dtype != weight.dtype:
            raise TypeError(f"{name}.scales: dtype {dtype_name(scales.dtype)}, expected the weight's "
                            f"{dtype_name(weight.dtype)}")
        sw = cls(pattern, tuple(weight.shape), values, meta, scales.to(weight.device), quant)
        sw._check_scales(name)  # before they code anything
        sw.values = q.encode(values, sw.scales, quant)
        return sw

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weight computes in: the values', or the scales' when quantized."""
        return self.values.dtype if self.quant is None else self.scales.dtype

    @property
    def nnz(self) -> int:
        """Kept entries (kept zeros included)."""
        nm = parse_pattern(self.pattern)
        if nm is None:
            return self.values.numel()
        rows, k = self.shape
        return rows * k * nm[0] // nm[1]

    def to_dense(self) -> torch.Tensor:
        values = self.values if self.quant is None else q.decode(self.values, self.scales, self.quant)
        nm = parse_pattern(self.pattern)
        if nm is None:
            return decompress_unstructured(values, self.meta, self.shape[1])
        return decompress_nm(values, self.meta, *nm, self.shape[1])

    def mask(self) -> torch.Tensor:
        """The boolean mask of kept positions (kept zeros included)."""
        nm = parse_pattern(self.pattern)
        if nm is None:
            return unpack_bits(self.meta, self.shape[1])
        ones = torch.ones(expected_shapes(self.pattern, self.shape)["values"], dtype=torch.uint8,
                          device=self.meta.device)
        return SparseWeight(self.pattern, self.shape, ones, self.meta).to_dense().bool()

    def _check_scales(self, name: str) -> None:
        want = expected_shapes(self.pattern, self.shape, quant=self.quant)["scales"]
        if tuple(self.scales.shape) != want:
            raise ShapeError(f"{name}.scales: shape {tuple(self.scales.shape)}, expected {want} for "
                             f"{self.quant.name} (group_size={self.quant.group_size}) {list(self.shape)}")
        why = unsupported_dtype(self.scales.dtype, FLOAT_DTYPES)
        if why:
            raise TypeError(f"{name}.scales: {why}")
        q.check_scales(self.scales, name)

    def validate(self, name: str = "weight") -> None:
        """Check tensor shapes, dtypes and index ranges against ``pattern`` and ``shape`` (and codes and scales
        against ``quant``).

        Run on every checkpoint load: a corrupt ``meta`` would otherwise decode
        to silently wrong weights."""
        rows, k = self.shape
        if (self.scales is None) != (self.quant is None):
            raise QuantError(f"{name}: scales and a quantization scheme go together (scales "
                             f"{'missing' if self.scales is None else 'given'}, scheme {self.quant})")
        expected = expected_shapes(self.pattern, self.shape, nnz=self.values.numel(), quant=self.quant)
        for tname, t in (("values", self.values), ("meta", self.meta)):
            if tuple(t.shape) != expected[tname]:
                raise ShapeError(f"{name}.{tname}: shape {tuple(t.shape)}, expected {expected[tname]} for {self.pattern} {list(self.shape)}")
        if self.meta.dtype != torch.uint8:
            raise TypeError(f"{name}.meta: dtype {self.meta.dtype}, expected torch.uint8")
        if self.quant is None:
            why = unsupported_dtype(self.values.dtype, FLOAT_DTYPES)
            if why:
                raise TypeError(f"{name}.values: {why}")
        else:
            self._check_scales(name)
            q.check_codes(self.values, self.quant, name)
        nm = parse_pattern(self.pattern)
        if nm is None:
            nnz = int(unpack_bits(self.meta, k).sum())
            if nnz != self.values.numel():
                raise ShapeError(f"{name}: bitmap keeps {nnz} entries but values holds {self.values.numel()}")
            return
        n, m = nm
        if (n, m) == (2, 4):
            idx = unpack_meta_24(self.meta, k)
            if k % 8 == 4 and (self.meta[:, -1] >> 4).any():
                raise ShapeError(f"{name}.meta: nonzero padding nibble")
        else:
            idx = self.meta.long().view(rows, -1, n)
            if (idx >= m).any():
                raise ShapeError(f"{name}.meta: in-group index >= {m}")
        if n > 1 and not (idx[..., 1:] > idx[..., :-1]).all():
            bad = (idx[..., 1:] <= idx[..., :-1]).any(-1).nonzero()[0].tolist()
            raise ShapeError(f"{name}.meta: row {bad[0]}, group {bad[1]} has indices that are not strictly increasing")

    def nbytes(self) -> int:
        scales = 0 if self.scales is None else self.scales.numel() * self.scales.element_size()
        return self.values.numel() * self.values.element_size() + self.meta.numel() + scales


def expected_shapes(pattern: str, shape: tuple[int, int], nnz: int | None = None,
                    quant: QuantScheme | None = None) -> dict[str, tuple]:
    """Tensor shapes the format prescribes; ``nnz`` is needed for unstructured only. With ``quant``,
    ``values`` is the stored codes' shape and ``scales`` is added; refuses what cannot be quantized."""
    rows, k = shape
    nm = parse_pattern(pattern)
    if nm is None:
        if quant is not None:
            raise QuantError(f"quantized values need an N:M pattern; {pattern} weights cannot be quantized")
        return {"values": (nnz,), "meta": (rows, cdiv(k, 8))}
    n, m = nm
    if k % m:
        raise ShapeError(f"in_features={k} is not divisible by the group size {m} of pattern {pattern}")
    kept = k * n // m
    shapes = {"values": (rows, kept), "meta": (rows, cdiv(k, 8) if (n, m) == (2, 4) else kept)}
    if quant is None:
        return shapes
    if quant.group_size is not None and quant.group_size % m:
        raise ShapeError(f"{quant.name} group_size {quant.group_size} is not a multiple of the pattern's "
                         f"group of {m} columns ({pattern})")
    return {**shapes, "values": (rows, quant.stored_columns(kept)), "scales": (rows, quant.groups(k))}
