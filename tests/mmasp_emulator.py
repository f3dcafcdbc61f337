"""A CPU emulator of the mma.sp decode kernel (csrc/mmasp.cu), for tests/test_mmasp_layout.py.

:func:`emulate` runs the kernel's loops lane by lane on the CPU, with the index expressions the CUDA source marks
``mirror:`` written here the same way, and models ``ldmatrix`` and ``mma.sp`` from the PTX ISA's fragment tables
independently of :func:`sparse_runtime.ops.mmasp_layout.fragment_layout`, so that a wrong layout shows as a wrong
product.
"""
import torch

from sparse_runtime.format.codec import cdiv
from sparse_runtime.ops.mmasp_layout import DECODE_MAX_M, K_CHUNK, K_STEP


def _halves(words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int32 registers [..., r] -> their 16-bit elements [..., 2r] (low half first), as float64."""
    return words.contiguous().view(dtype).to(torch.float64)


def ldmatrix_x4(xs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``ldmatrix.sync.aligned.m8n8.x4.b16``: lane ``8 i + r`` gives the address (row, col) of row r of matrix i;
    lane L receives, in register i, elements ``2 (L % 4)``, ``+1`` of row ``L // 4`` of matrix i.
    Returns [32 lanes, 8 elements] (register i = elements 2i, 2i+1)."""
    lane = torch.arange(32)
    out = torch.empty(32, 8, dtype=xs.dtype)
    for i in range(4):
        src = 8 * i + lane // 4
        for e in range(2):
            out[:, 2 * i + e] = xs[rows[src], cols[src] + 2 * (lane % 4) + e]
    return out


def mma_sp(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, e: torch.Tensor, sel: int) -> torch.Tensor:
    """``mma.sp.m16n8k32`` (f16/bf16 in, f32 out) from the PTX fragment tables: a [32, 8] elements a0..a7,
    b [32, 8] elements b0..b7, e [32] metadata words, acc [32, 4] c0..c3. Returns the new accumulators."""
    lane = torch.arange(32)
    gid, tig = lane >> 2, lane % 4
    dense_a = torch.zeros(16, 32, dtype=torch.float64)
    ew = e.to(torch.int64) & 0xFFFFFFFF
    for i in range(8):
        row = gid if i in (0, 1, 4, 5) else gid + 8  # "row = groupID for ai where 0 <= i < 2 || 4 <= i < 6"
        firstcol = tig * 4 + (16 if i >= 4 else 0)
        meta_lane = 4 * gid + 2 * sel + firstcol // 16  # the selected pair: first or second 16 columns
        shift = 16 * (row >= 8).long() + 4 * ((firstcol % 16) // 4)
        nibble = (ew[meta_lane] >> shift) & 0xF
        idx = (nibble >> (2 * (i & 1))) & 3
        dense_a[row, firstcol + idx] = a[:, i]
    dense_b = torch.zeros(32, 8, dtype=torch.float64)
    for i in range(8):
        dense_b[tig * 2 + (i & 1) + 8 * (i >> 1), gid] = b[:, i]  # "row = tig*2 + (i & 1) (+8, +16, +24)"
    d = dense_a @ dense_b
    out = acc.clone()
    for i in range(4):
        out[:, i] += d[gid + 8 * (i >> 1), 2 * tig + (i & 1)]
    return out


def emulate(x: torch.Tensor, vals: torch.Tensor, meta: torch.Tensor, n: int, k: int, bias: torch.Tensor | None,
            split_chunks: int) -> torch.Tensor:
    """What the kernel computes, lane by lane, in float64: ``y [M, n]``. Follows mmasp_kernel's loops: CTA
    columns over K (``split_chunks`` chunks each), warps over 16-row tiles, chunks, the two k-steps of a chunk
    (selector h), n-tiles; then the split-order reduction of the partials."""
    m = x.shape[0]
    if not 1 <= m <= DECODE_MAX_M:
        raise ValueError(f"M must be in 1..{DECODE_MAX_M}, got {m}")
    tiles, steps, chunks = vals.shape[0], k // K_STEP, k // K_CHUNK
    nts = 1 if m <= 8 else 2
    flat_v, flat_m = vals.reshape(-1, 4), meta.reshape(-1)
    lane = torch.arange(32)
    g, tq = lane // 4, lane % 4
    split = cdiv(chunks, split_chunks)
    ws = torch.zeros(split, m, n, dtype=torch.float64)
    for by in range(split):
        chunk0 = by * split_chunks
        nchunks = min(split_chunks, chunks - chunk0)
        xs = torch.zeros(nts * 8, split_chunks * K_CHUNK, dtype=x.dtype)  # the CTA's shared x slice, zero-filled
        xs[:m, :nchunks * K_CHUNK] = x[:, chunk0 * K_CHUNK:(chunk0 + nchunks) * K_CHUNK]
        for tile in range(tiles):
            acc = torch.zeros(nts, 32, 4, dtype=torch.float64)
            for cl in range(nchunks):
                c = chunk0 + cl
                e = flat_m[(tile * chunks + c) * 32 + lane]
                for h in range(2):
                    s = 2 * c + h
                    a = _halves(flat_v[(tile * steps + s) * 32 + lane], x.dtype)
                    sel = h
                    kk = cl * K_CHUNK + h * 32
                    for nt in range(nts):
                        token = nt * 8 + lane % 8
                        col = kk + 8 * (lane // 8)
                        b = ldmatrix_x4(xs, token, col).to(torch.float64)
                        acc[nt] = mma_sp(acc[nt], a, b, e, sel)
            for nt in range(nts):
                for i in range(4):
                    row = tile * 16 + g + 8 * (i >> 1)
                    tok = nt * 8 + 2 * tq + (i & 1)
                    keep = (row < n) & (tok < m)
                    ws[by, tok[keep], row[keep]] = acc[nt, keep, i]
    y = torch.zeros(m, n, dtype=torch.float64)
    for sp in range(split):
        y += ws[sp]
    return y if bias is None else y + bias.to(torch.float64)
