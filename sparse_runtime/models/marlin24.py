"""The ``marlin-24`` tensor layout (compressed-tensors' format for the Marlin 2:4 kernel) to and from the canonical
2:4 format's integer codes, in-group indices and scales. Layout only: the checkpoint logic is
:mod:`.compressed_tensors`'.

For a 2:4 weight ``[N, K]`` with ``bits``-bit integer codes (4 or 8) and scales ``[N, G]`` (``G = K/128`` or 1):

``weight_packed`` int32 ``[K/32, 16N·bits/32]``
    The kept codes transposed to ``[K/2, N]`` (kept value ``j`` of output ``n`` at ``[j, n]``), as unsigned
    ``code + 2**(bits-1)``, cut into tiles of 16 kept rows x 64 outputs. Tile ``(t, u)`` (rows ``16t..``, outputs
    ``64u..``) fills entries ``1024u .. 1024u + 1023`` of stored row ``t`` in the order :func:`_tile_order` gives
    (the order the kernel's threads load tensor-core fragments in), and every ``32/bits`` consecutive entries are
    one int32, the first in the low bits.
``meta`` int16 ``[K/32, 2N]``
    CUTLASS's 2:4 metadata: per weight row, one int16 per 16 dense columns holding its four groups' nibbles, the
    first group in the low nibble and in each nibble the first kept index in the low 2 bits (so it is the canonical
    meta's byte pairs read as little-endian int16); word ``(r, c)`` lies at the flat position
    :func:`_meta_positions` gives (CUTLASS's interleaved column-major order).
``scale_packed`` float16 ``[G, N]``
    The scales transposed; with several groups per row and ``group_size < K/2`` (the condition compressed-tensors
    0.14 writes with) each run of 8 consecutive entries is reordered by ``_SCALE_RUN``.

Constraints (the kernel's tiles): ``N % 64 == 0``, ``K % 32 == 0``, groups of 128 columns or one per row.
"""
from __future__ import annotations

import torch

GROUP_SIZE = 128  # the only group size the Marlin 2:4 kernel takes (else one scale per row)
_TILE_ROWS, _TILE_OUTPUTS = 16, 64  # kept rows x outputs per tile
_TILE = _TILE_ROWS * _TILE_OUTPUTS
_SCALE_RUN = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])


def unsupported_shape(out_features: int, in_features: int, group_size: int | None) -> str | None:
    """Why a ``[out_features, in_features]`` weight cannot be stored as marlin-24, or None."""
    if out_features % _TILE_OUTPUTS:
        return f"out_features={out_features} is not a multiple of {_TILE_OUTPUTS}"
    if in_features % (2 * _TILE_ROWS):
        return f"in_features={in_features} is not a multiple of {2 * _TILE_ROWS}"
    if group_size not in (None, GROUP_SIZE):
        return f"group size {group_size}: marlin-24 takes groups of {GROUP_SIZE} or one scale per output row"
    if group_size is not None and in_features % group_size:
        return f"in_features={in_features} is not a multiple of the group size {group_size}"
    return None


def stored_shapes(out_features: int, in_features: int, bits: int, groups: int) -> dict[str, tuple]:
    """``{name: (shape, dtype)}`` of the three stored tensors."""
    rows = in_features // (2 * _TILE_ROWS)
    return {"weight_packed": ((rows, out_features * _TILE_ROWS * bits // 32), torch.int32),
            "meta": ((rows, 2 * out_features), torch.int16),
            "scale_packed": ((groups, out_features), torch.float16)}


def _tile_order(bits: int) -> torch.Tensor:
    """For each of a tile's 1024 stored entries, the flat index ``row * 64 + output`` of the code it holds."""
    e = torch.arange(_TILE)
    per_word = 32 // bits
    lane = e % per_word  # a word holds its even entries first, then its odd ones
    src = e - lane + torch.where(lane < per_word // 2, 2 * lane, 2 * (lane - per_word // 2) + 1)
    pair, half, col, thread = src & 3, (src >> 2) & 1, (src >> 3) & 3, src >> 5
    row = 2 * (thread & 3) + (pair & 1) + 8 * (pair >> 1)
    out = 8 * (thread >> 2) + 4 * half + col
    return row * _TILE_OUTPUTS + out


def _meta_positions(rows: int, cols: int) -> torch.Tensor:
    """``[rows, cols]``: the flat position in the stored meta of metadata word ``(r, c)``. Within each 64 rows the
    row's bits move (bit 0 to 1, 1 to 5, 3..5 to 2..4), bit 2 becomes the low bit of the position and column
    bit 0 the row's bit 0; column pairs are ``2 * rows`` apart."""
    r = torch.arange(rows).unsqueeze(1)
    c = torch.arange(cols).unsqueeze(0)
    bit = lambda i: (r >> i) & 1  # noqa: E731
    row = (r >> 6 << 6) + (c & 1) + 2 * bit(0) + 4 * bit(3) + 8 * bit(4) + 16 * bit(5) + 32 * bit(1)
    return (c >> 1) * (2 * rows) + 2 * row + bit(2)


def _scales_permuted(group_size: int | None, in_features: int) -> bool:
    return group_size is not None and group_size < in_features // 2


def _cutlass_indices(dense_codes: torch.Tensor) -> torch.Tensor:
    """``[N, K/4, 4]`` codes -> ``[N, K/4, 2]`` ascending indices of the nonzero codes, a group with fewer than two
    padded with its lowest zero columns from column 2 on: the choice of CUTLASS's encoder, which sees only the
    nonzeros (so a kept code 0 is stored as compressed-tensors stores it)."""
    col = torch.arange(4, device=dense_codes.device)
    key = (dense_codes != 0).to(torch.int32) * 8 + (col >= 2).to(torch.int32) * 4 + (3 - col)
    return key.topk(2, dim=-1).indices.sort(dim=-1).values


def _to_int(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Unsigned ``x`` (int64) as the same bits in the signed ``dtype``."""
    bits = torch.iinfo(dtype).bits
    return torch.where(x >= 1 << (bits - 1), x - (1 << bits), x).to(dtype)


def pack(codes: torch.Tensor, indices: torch.Tensor, scales: torch.Tensor, bits: int,
         group_size: int | None) -> dict[str, torch.Tensor]:
    """Canonical 2:4 ``codes`` ``[N, K/2]`` (integers), ``indices`` ``[N, K/4, 2]`` and ``scales`` ``[N, G]`` ->
    the three marlin-24 tensors (scales converted to float16); ``unpack_*`` are the inverses."""
    n, half = codes.shape
    k = 2 * half
    dense = torch.zeros(n, k // 4, 4, dtype=torch.int64)
    dense.scatter_(-1, indices.long().cpu(), codes.long().cpu().reshape(n, -1, 2))
    idx = _cutlass_indices(dense)
    kept = dense.gather(-1, idx).reshape(n, half) + (1 << (bits - 1))
    tiles = kept.t().reshape(half // _TILE_ROWS, _TILE_ROWS, n // _TILE_OUTPUTS, _TILE_OUTPUTS)
    tiles = tiles.permute(0, 2, 1, 3).reshape(half // _TILE_ROWS, -1, _TILE)[..., _tile_order(bits)]
    entries = tiles.reshape(half // _TILE_ROWS, -1, 32 // bits)
    words = (entries << (bits * torch.arange(32 // bits))).sum(-1)

    nibbles = idx[..., 0] | (idx[..., 1] << 2)  # [N, K/4]
    meta_words = (nibbles.reshape(n, -1, 4) << torch.tensor([0, 4, 8, 12])).sum(-1)  # [N, K/16]
    meta = torch.empty(meta_words.numel(), dtype=torch.int64)
    meta[_meta_positions(*meta_words.shape).reshape(-1)] = meta_words.reshape(-1)

    s = scales.detach().to(device="cpu", dtype=torch.float16).t().contiguous()
    if _scales_permuted(group_size, k):
        s = s.reshape(-1, len(_SCALE_RUN))[:, _SCALE_RUN].reshape(s.shape)
    return {"weight_packed": _to_int(words, torch.int32),
            "meta": _to_int(meta, torch.int16).reshape(k // 32, 2 * n),
            "scale_packed": s}


def unpack_codes(weight_packed: torch.Tensor, shape: tuple[int, int], bits: int) -> torch.Tensor:
    """``weight_packed`` of a ``shape = (N, K)`` weight -> its kept codes, int8 ``[N, K/2]``."""
    n, k = shape
    half = k // 2
    words = weight_packed.long() & 0xFFFFFFFF
    entries = (words.unsqueeze(-1) >> (bits * torch.arange(32 // bits))) & ((1 << bits) - 1)
    tiles = torch.empty_like(entries).reshape(half // _TILE_ROWS, -1, _TILE)
    tiles[..., _tile_order(bits)] = entries.reshape(tiles.shape)
    kept = tiles.reshape(half // _TILE_ROWS, n // _TILE_OUTPUTS, _TILE_ROWS, _TILE_OUTPUTS).permute(0, 2, 1, 3)
    return (kept.reshape(half, n).t() - (1 << (bits - 1))).to(torch.int8).contiguous()


def unpack_indices(meta: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``meta`` of a ``shape = (N, K)`` weight -> the in-group indices ``[N, K/4, 2]`` as stored (the caller
    checks they name two columns in order)."""
    n, k = shape
    words = (meta.long() & 0xFFFF).reshape(-1)[_meta_positions(n, k // 16)]  # [N, K/16]
    nibbles = ((words.unsqueeze(-1) >> torch.tensor([0, 4, 8, 12])) & 0xF).reshape(n, k // 4)
    return torch.stack([nibbles & 3, nibbles >> 2], dim=-1)


def unpack_scales(scale_packed: torch.Tensor, shape: tuple[int, int], group_size: int | None) -> torch.Tensor:
    """``scale_packed`` of a ``shape = (N, K)`` weight -> its scales ``[N, G]``, float16."""
    s = scale_packed
    if _scales_permuted(group_size, shape[1]):
        s = s.reshape(-1, len(_SCALE_RUN))[:, _SCALE_RUN.argsort()].reshape(s.shape)
    return s.t().contiguous()
