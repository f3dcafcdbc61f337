"""The operand layout of the ``mmasp`` decode kernel (``csrc/mmasp.cu``), derived from the canonical 2:4
tensors at load time.

The kernel runs one ``mma.sp.m16n8k32`` per 16 output features x 32 input columns x 8 tokens, with W as the
sparse A operand. Per the PTX ISA (sparse ``mma.m16n8k32``, ``.f16``/``.bf16``; lane = 4 * groupID + tq):

- A: four 32-bit registers, each two kept values of one 4-column group: register ``j`` holds row
  ``groupID + 8 * (j & 1)``, group ``tq + 4 * (j >> 1)`` of the 16 x 32 tile. A canonical values row holds
  each group's two kept values in one 32-bit word (first value in the low half), so a register is one word.
- metadata: one 32-bit word per lane; the sparsity selector ``sel`` names the lane pair ``4 * groupID + 2 * sel
  + {0, 1}`` that supplies it. Lane ``... + half`` holds the nibbles of groups ``4 * half .. 4 * half + 3`` of
  row ``groupID`` in bits 0..15 and of row ``groupID + 8`` in bits 16..31, each nibble as the canonical format
  stores it (first index in the low 2 bits). Two k-steps share one word per lane: selector 0 for the first,
  1 for the second.
- B (x^T, 32 x 8): register ``j`` holds k rows ``8 j + 2 tq``, ``+1`` of column ``groupID`` (two stacked
  m16n8k16 B fragments); the kernel loads it with ``ldmatrix.x4`` from x in shared memory.
- accumulators: value ``i`` is row ``groupID + 8 * (i >> 1)``, column ``2 tq + (i & 1)``.

So the layout is a gather of canonical words, no re-encoding: ``vals [N/16, K/32, 32, 4]`` int32 and ``meta
[N/16, K/64, 32]`` int32 (N padded to 16 rows with zero values and indices {0, 1}). ``tests/mmasp_emulator.py``
runs the kernel's loops on the CPU over this layout.
"""
from __future__ import annotations

import torch

from ..format.codec import cdiv
from .caches import DECODE_MAX_M  # the kernel takes two n-tiles of 8 tokens (csrc/mmasp.cu checks it)

ROW_TILE = 16  # output features per MMA (W is the A operand)
K_STEP = 32  # input columns per MMA
K_CHUNK = 64  # two k-steps: one metadata word per lane
WARPS = 8  # warps (row tiles) per CTA: csrc/mmasp.h SR_MMASP_WARPS
MAX_SPLIT_COLUMNS = 1472  # csrc/mmasp.h SR_MMASP_MAX_KS: a CTA's x slice lives in shared memory (48 KB)
PAD_META = 0x44  # a padded row's groups: kept indices 0 and 1 (valid, increasing), values 0


def unsupported_shape(n: int, k: int) -> str | None:
    """Why the kernel cannot take an ``n x k`` weight, or None."""
    if n < 1 or k < K_CHUNK or k % K_CHUNK:
        return f"shape {n}x{k} not supported (in_features a positive multiple of {K_CHUNK}, one metadata chunk)"
    return None


def split_columns(n: int, k: int, sms: int, ctas_per_sm) -> int:
    """64-column chunks per CTA along K: enough CTAs for 2 per SM (16 warps), in one wave where the kernel's
    occupancy allows it.

    ``ctas_per_sm(split_chunks)``: CTAs one SM keeps resident at that K slice (the extension's
    ``ctas_per_sm``, the smaller of its two variants). From the slice that gives 2 CTAs per SM, slices grow (fewer
    CTAs) until the grid fits ``ctas_per_sm * sms`` slots, up to ``MAX_SPLIT_COLUMNS`` columns; where even that
    needs a second wave, the largest slice (fewest CTAs). Depends on the shape and the GPU only, not on M, so
    every M of a layer (and every captured graph) gets the same grid and the same summation order."""
    chunks = k // K_CHUNK
    ctas_n = cdiv(cdiv(n, ROW_TILE), WARPS)
    most = min(chunks, MAX_SPLIT_COLUMNS // K_CHUNK)
    start = min(cdiv(chunks, max(1, cdiv(2 * sms, ctas_n))), most)
    for per in range(start, most + 1):
        if ctas_n * cdiv(chunks, per) <= ctas_per_sm(per) * sms:
            return per
    return most


def grid(n: int, k: int, split_chunks: int) -> tuple[int, int]:
    """(CTAs along N, CTAs along K) of a launch."""
    return cdiv(cdiv(n, ROW_TILE), WARPS), cdiv(k // K_CHUNK, split_chunks)


def _lanes():
    lane = torch.arange(32)
    return lane // 4, lane % 4


def _wrap32(w: torch.Tensor) -> torch.Tensor:
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def fragment_layout(values: torch.Tensor, meta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical ``values [N, K/2]`` + ``meta [N, K/8]`` uint8 -> the kernel's ``(vals, meta)`` int32 tensors."""
    why = unsupported_shape(values.shape[0], k)
    if why:
        raise ValueError(why)
    if values.element_size() != 2 or tuple(values.shape) != (values.shape[0], k // 2) or \
            tuple(meta.shape) != (values.shape[0], k // 8) or meta.dtype != torch.uint8:
        raise ValueError(f"expected 16-bit values [N, {k // 2}] and uint8 meta [N, {k // 8}], got "
                         f"{values.dtype} {tuple(values.shape)} and {meta.dtype} {tuple(meta.shape)}")
    n = values.shape[0]
    tiles, steps, chunks = cdiv(n, ROW_TILE), k // K_STEP, k // K_CHUNK
    pad = tiles * ROW_TILE - n
    if pad:
        values = torch.cat([values, values.new_zeros(pad, k // 2)])
        meta = torch.cat([meta, meta.new_full((pad, k // 8), PAD_META)])
    g, tq = _lanes()
    j = torch.arange(4)
    words = values.contiguous().view(torch.int32).view(tiles, ROW_TILE, steps, 8)  # word = one group's two values
    row = g[:, None] + 8 * (j & 1)  # [32, 4]: A register j of each lane
    group = tq[:, None] + 4 * (j >> 1)
    vals = words[:, row, :, group].permute(2, 3, 0, 1).contiguous()  # [tiles, steps, 32, 4]
    m = meta.to(torch.int64)
    m16 = (m[:, 0::2] | m[:, 1::2] << 8).view(tiles, ROW_TILE, chunks, 4)  # 4 groups of one row per 16 bits
    # Lane (g, tq) of chunk c: k-step 2c + (tq >> 1) (its selector), groups 4 * (tq & 1) .. + 3 of that step,
    # i.e. 16-bit column 2 * (2c + (tq >> 1)) + (tq & 1) = 4c + tq of the row.
    lo, hi = m16[:, g, :, tq], m16[:, g + 8, :, tq]  # [32, tiles, chunks]
    meta_w = _wrap32(lo | hi << 16).permute(1, 2, 0).contiguous()  # [tiles, chunks, 32]
    return vals, meta_w
