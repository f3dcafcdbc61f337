"""Quantized values for the canonical format: the schemes and their arithmetic.

A quantized sparse weight keeps the pattern's ``meta`` unchanged and replaces ``values`` by integer or fp8
codes plus ``scales`` in the layer's dtype (symmetric: no zero points). ``W ~= code * scale``, where a code's
scale is that of its output row and, for grouped schemes, of its group of ``group_size`` consecutive input
columns of the dense weight (so a 2:4 group of 128 columns holds 64 kept codes).

``int8``  codes int8, one scale per output row.
``int4``  codes in [-8, 7], one scale per row and group of ``group_size`` (default 128) input columns.
``fp8``   codes float8_e4m3fn (finite, |code| <= 448), one scale per output row.

This project's quantizer codes symmetrically, int8 in [-127, 127] and int4 in [-7, 7]; stored codes may use the
whole two's-complement range, which dequantizes just as exactly (compressed-tensors' quantizer divides by
absmax / 7.5, so a group whose largest weight is negative codes it -8).

Stored (a :class:`~sparse_runtime.format.codec.SparseWeight`'s ``values``): int8 and fp8 codes as they are,
``[N, C]`` for ``C`` kept values per row; int4 codes two per byte, ``[N, C/2]`` uint8, kept value ``2i`` in
the low nibble of byte ``i`` and ``2i+1`` in the high nibble, each as ``code + 8`` (offset binary, 0..15).

This module owns the arithmetic (scales, rounding, dequantization) and the stored form of the codes, which
the front-end's quantizers, the codec and every backend use, so fake-quantizing a dense weight and
dequantizing its stored codes give the same bits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import QuantError, ShapeError

SCHEMES = ("int8", "int4", "fp8")
DEFAULT_GROUP_SIZE = 128  # int4's group along the input dimension
_QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}
CODE_DTYPES = {"int8": torch.int8, "int4": torch.uint8, "fp8": torch.float8_e4m3fn}  # as stored
_INT4_OFFSET = 8  # a stored int4 nibble is code + 8


@dataclass(frozen=True)
class QuantScheme:
    """``name`` in :data:`SCHEMES`; ``group_size`` input columns per scale (None: one scale per row)."""

    name: str
    group_size: int | None = None

    def __post_init__(self):
        if self.name not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {self.name!r}; supported: {', '.join(SCHEMES)}")
        if self.group_size is not None and (self.group_size <= 0 or self.group_size % 8):
            raise ValueError(f"group_size must be a positive multiple of 8, got {self.group_size}")

    @classmethod
    def parse(cls, name: str, group_size: int | None = None) -> "QuantScheme":
        """The scheme a user names: int4 defaults to groups of 128, int8 and fp8 to per-channel scales."""
        if name == "int4" and group_size is None:
            group_size = DEFAULT_GROUP_SIZE
        return cls(name, group_size)

    @property
    def qmax(self) -> float:
        return _QMAX[self.name]

    def groups(self, in_features: int) -> int:
        """Scales per output row for a weight with ``in_features`` columns (checks the grouping fits)."""
        if self.group_size is None:
            return 1
        if in_features % self.group_size:
            raise ShapeError(f"in_features={in_features} is not divisible by the {self.name} group size {self.group_size}")
        return in_features // self.group_size

    @property
    def code_dtype(self) -> torch.dtype:
        """The dtype of the stored codes."""
        return CODE_DTYPES[self.name]

    def stored_columns(self, kept: int) -> int:
        """Columns of the stored codes for ``kept`` values per row (int4 packs two per byte)."""
        if self.name != "int4":
            return kept
        if kept % 2:
            raise ShapeError(f"int4 packs two codes per byte: needs an even number of kept values per row, got {kept}")
        return kept // 2

    def to_dict(self) -> dict:
        return {"scheme": self.name, "group_size": self.group_size}


def _grouped(w: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, C] -> [N, groups, C/groups]: dense or N:M-compressed, since N:M keeps the same number of values in
    every group of dense columns, in column order."""
    return w.reshape(w.shape[0], groups, -1)


def absmax_scales(weight: torch.Tensor, scheme: QuantScheme, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric round-to-nearest scales [N, groups] in ``weight``'s dtype from the (kept) entries' absmax.

    An all-zero group gets scale 1 (any scale codes it exactly), so scales are always finite and positive."""
    w = weight if mask is None else weight * mask
    amax = _grouped(w.abs().float(), scheme.groups(w.shape[1])).amax(-1)
    scales = (amax / scheme.qmax).to(weight.dtype)
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def quantize_codes(weight: torch.Tensor, scales: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Codes of ``weight`` [N, C] (dense or compressed) under ``scales`` [N, groups]: int8 for int8 and int4
    (int4 in [-7, 7]; packing is the codec's), float8_e4m3fn for fp8."""
    x = _grouped(weight.float(), scales.shape[1]) / scales.float().unsqueeze(-1)
    if scheme.name == "fp8":
        return x.clamp(-scheme.qmax, scheme.qmax).reshape(weight.shape).to(torch.float8_e4m3fn)
    return x.round().clamp(-scheme.qmax, scheme.qmax).reshape(weight.shape).to(torch.int8)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``code * scale`` in the scales' dtype; ``codes`` [N, C] dense or compressed, as in :func:`quantize_codes`."""
    c = _grouped(codes.to(scales.dtype), scales.shape[1])
    return (c * scales.unsqueeze(-1)).reshape(codes.shape)


def fake_quantize(weight: torch.Tensor, scheme: QuantScheme, scales: torch.Tensor | None = None,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """``dequantize(quantize(weight))`` in ``weight``'s dtype (masked entries stay zero): what a quantized
    layer computes with, bit for bit."""
    if scales is None:
        scales = absmax_scales(weight, scheme, mask)
    w = weight if mask is None else weight * mask
    return dequantize_codes(quantize_codes(w, scales, scheme), scales)


# -- the stored form ----------------------------------------------------------------------------------
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes [N, C] (int8 in [-8, 7], C even) -> [N, C/2] uint8, see the module docstring."""
    u = (codes + _INT4_OFFSET).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, C/2] uint8 -> int4 codes [N, C] int8: the inverse of :func:`pack_int4`."""
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    return nibbles.to(torch.int8) - _INT4_OFFSET


def store_codes(codes: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Codes [N, C] (int8 for int8 and int4, float8_e4m3fn for fp8) in their stored form."""
    return pack_int4(codes) if scheme.name == "int4" else codes


def stored_codes(stored: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """The codes [N, C] of stored codes: the inverse of :func:`store_codes`."""
    return unpack_int4(stored) if scheme.name == "int4" else stored


def encode(values: torch.Tensor, scales: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """The stored codes of ``values`` [N, C] under ``scales``."""
    return store_codes(quantize_codes(values, scales, scheme), scheme)


def decode(stored: torch.Tensor, scales: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """The values [N, C], in the scales' dtype, of stored codes: the inverse of :func:`encode` up to rounding."""
    return dequantize_codes(stored_codes(stored, scheme), scales)


def check_codes(stored: torch.Tensor, scheme: QuantScheme, name: str = "weight") -> None:
    """Refuse stored codes that would dequantize to wrong weights: a wrong dtype, or an fp8 NaN (every int8 and
    int4 bit pattern is a code). Shapes are the codec's (``expected_shapes``)."""
    if stored.dtype != scheme.code_dtype:
        raise TypeError(f"{name}.values: dtype {stored.dtype}, expected {scheme.code_dtype} for {scheme.name} codes")
    if scheme.name != "fp8":
        return
    bad = (stored.view(torch.uint8) & 0x7F) == 0x7F  # e4m3fn's NaN, its only non-finite code
    if bad.any():
        r, c = bad.nonzero()[0].tolist()
        raise QuantError(f"{name}.values: row {r}, column {c} holds a code outside the {scheme.name} range")


def check_scales(scales: torch.Tensor, name: str = "weight") -> None:
    """Refuse scales that are not finite or not positive."""
    if not torch.isfinite(scales).all():
        r, g = (~torch.isfinite(scales)).nonzero()[0].tolist()
        raise QuantError(f"{name}.scales: row {r}, group {g} has scale {float(scales[r, g])}; scales must be finite")
    if not (scales > 0).all():
        r, g = (scales <= 0).nonzero()[0].tolist()
        raise QuantError(f"{name}.scales: row {r}, group {g} has scale {float(scales[r, g])}; scales must be > 0")
