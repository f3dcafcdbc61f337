"""Triton 2:4 sparse matmul: ``Y = act((X @ R) @ W^T + b)`` from compressed ``W``.

Upstream Triton has no sparse tensor-core instruction, so each program loads the
compressed values and metadata, rebuilds the dense ``W`` tile in registers and
runs dense ``tl.dot``s. It moves 9/16 of the dense weight bytes (2 bytes of
values + 1/4 byte of metadata per kept fp16 value), so at decode the ceiling
over a dense GEMV is 16/9 = 1.78x.

Layout (derived at load time from the canonical format, see ``sparse_runtime.format``):

``values [N, K/2]``
    the canonical tensor as is, row-major: a row's kept values for a K tile are
    contiguous, so they load as wide vectors along K.
``meta [N, ceil(K/32)] int32``
    the canonical bytes, each row zero-padded to a multiple of 4 bytes and read
    as little-endian int32: word ``w`` covers the 16 kept values (8 groups,
    32 dense columns) ``16w .. 16w+15``; group ``g`` is the nibble at bits
    ``4*(g % 8)``, low 2 bits the first kept index, high 2 bits the second.

Instead of interleaving the rebuilt ``W`` back to ``[BN, BK]`` the kernel splits
the X tile by column phase: with ``x_c = X[:, c::4]`` and
``w_c[n, g] = W[n, 4g + c]`` (selected from the two kept values of group ``g``),
``X @ W^T = sum_c x_c @ w_c^T``: four dots of depth ``BK/4``, no gather.

Schedules (configs below, chosen by M):

* decode (M <= 16): one 16-row M tile, narrow N blocks, long K tiles and
  split-K over ``SPLIT`` programs per N block so the grid fills the GPU; each
  split writes fp32 partials ``[S, M, N]`` and ``_splitk_reduce_kernel`` sums
  them and applies the epilogue (deterministic, no atomics, safe to autotune).
* tiles (M > 16): classic 2-D tiling with grouped program order for L2 reuse.

Rotation prologue (``ROT``): 1 = block-diagonal ``R`` stored ``[K/b, b, b]``
with ``b`` dividing ``BLOCK_K``; the X tile is rotated in registers by one
extra ``[BM, BK] x [BK, BK]`` dot against the diagonal of ``R`` it covers
(off-diagonal entries are masked, never loaded). 2 = full ``[K, K]`` ``R``:
each X tile is rebuilt from all of X, so every program re-reads a ``K x BK``
slice of ``R`` per K tile (O(N/BN * K^2) L2 reads): exact, but slower than
rotating first at large K.

Everything accumulates in fp32; the rotated X is rounded to the input dtype,
as the unfused ``(x @ R)`` would be.
"""
import os

import triton
import triton.language as tl

ACTIVATIONS = {"none": 0, "relu": 1, "gelu": 2, "silu": 3}
ROTATIONS = {"none": 0, "block": 1, "full": 2}

# Without a GPU driver the interpreter cannot benchmark configs: keep one, small, each.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(blocks, warps, stages):
    return [triton.Config(dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), b)), num_warps=w, num_stages=s)
            for b in blocks for w in warps for s in stages]


if INTERPRET:
    DECODE_CONFIGS = _configs([(16, 32, 64)], [4], [1])
    TILE_CONFIGS = _configs([(32, 32, 64)], [4], [1])
else:
    DECODE_CONFIGS = _configs([(16, 32, 256), (16, 64, 128), (16, 64, 256), (16, 32, 512), (16, 128, 128)],
                              [4, 8], [2, 3, 4])
    TILE_CONFIGS = _configs([(64, 64, 64), (64, 128, 64), (128, 64, 64), (128, 128, 64), (128, 256, 64),
                             (64, 256, 64), (128, 128, 128)], [4, 8], [3, 4])


def without_block_k(configs):
    """The same configs with BLOCK_K left to the caller (the fused block rotation fixes it)."""
    seen, out = set(), []
    for c in configs:
        kw = {k: v for k, v in c.kwargs.items() if k != "BLOCK_K"}
        key = (tuple(sorted(kw.items())), c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


ROT_DECODE_CONFIGS = without_block_k(DECODE_CONFIGS)
ROT_TILE_CONFIGS = without_block_k(TILE_CONFIGS)
# Split-K slices are multiples of this, so every BLOCK_K of the lists tiles a slice exactly.
SPLIT_UNIT = max(c.kwargs["BLOCK_K"] for c in DECODE_CONFIGS + TILE_CONFIGS)
AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "k_per_split"]


@triton.jit
def _split4(t, BM: tl.constexpr, BK: tl.constexpr):
    """[BM, BK] -> its four column phases t[:, c::4], each [BM, BK/4]."""
    t = tl.reshape(t, (BM, BK // 4, 2, 2))
    even, odd = tl.split(t)  # columns 4g + {0, 2} and 4g + {1, 3}
    t0, t2 = tl.split(even)
    t1, t3 = tl.split(odd)
    return t0, t1, t2, t3


@triton.jit
def _epilogue(acc, bias_ptr, offs_n, mask_n, HAS_BIAS: tl.constexpr, ACT: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        acc = tl.maximum(acc, 0.0)
    elif ACT == 2:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACT == 3:
        acc = acc / (1.0 + tl.exp(-acc))
    return acc


@triton.jit
def sparse24_matmul_kernel(
    x_ptr, values_ptr, meta_ptr, rot_ptr, bias_ptr, out_ptr, ws_ptr,
    M, N, K, k_per_split, M_BUCKET, ROT_B,
    stride_xm, stride_vn, stride_mn, stride_om,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, ROT: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr = 8,
):
    """One (M tile, N tile) x one K slice. ``SPLIT``: write fp32 partials to ``ws [S, M, N]``."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Grouped order: GROUP_M consecutive M tiles share each N tile while it is in L2.
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size)
    pid_n = (pid % (GROUP_M * num_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_kx = tl.arange(0, BLOCK_K)  # dense columns of the tile
    offs_kv = tl.arange(0, BLOCK_K // 2)  # kept values of the tile
    offs_g = tl.arange(0, BLOCK_K // 4)  # groups of the tile
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    v_rows = values_ptr + offs_n[:, None] * stride_vn
    m_rows = meta_ptr + offs_n[:, None] * stride_mn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = min(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        kx = k0 + offs_kx
        if ROT == 0:
            xt = tl.load(x_rows + kx[None, :], mask=mask_m[:, None] & (kx[None, :] < K), other=0.0)
        elif ROT == 1:
            xt = tl.load(x_rows + kx[None, :], mask=mask_m[:, None] & (kx[None, :] < K), other=0.0)
            # R_tile[i, j] = R[k0+i, k0+j] inside the diagonal blocks the tile covers (k0 % ROT_B == 0).
            blk_i = kx // ROT_B
            r_ptrs = (rot_ptr + blk_i[:, None] * ROT_B * ROT_B + (kx % ROT_B)[:, None] * ROT_B
                      + (kx % ROT_B)[None, :])
            r_mask = (blk_i[:, None] == blk_i[None, :]) & (kx[:, None] < K) & (kx[None, :] < K)
            rt = tl.load(r_ptrs, mask=r_mask, other=0.0)
            xt = tl.dot(xt, rt, input_precision="ieee").to(x_ptr.dtype.element_ty)
        else:
            xr = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for j0 in range(0, K, BLOCK_K):
                kj = j0 + offs_kx
                xj = tl.load(x_rows + kj[None, :], mask=mask_m[:, None] & (kj[None, :] < K), other=0.0)
                rj = tl.load(rot_ptr + kj[:, None] * K + kx[None, :],
                             mask=(kj[:, None] < K) & (kx[None, :] < K), other=0.0)
                xr = tl.dot(xj, rj, xr, input_precision="ieee")
            xt = xr.to(x_ptr.dtype.element_ty)
        x0, x1, x2, x3 = _split4(xt, BLOCK_M, BLOCK_K)

        kv = k0 // 2 + offs_kv
        v = tl.load(v_rows + kv[None, :], mask=mask_n[:, None] & (kv[None, :] < K // 2), other=0.0)
        v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, BLOCK_K // 4, 2)))  # first / second kept value per group
        g = k0 // 4 + offs_g
        word = tl.load(m_rows + (g // 8)[None, :], mask=mask_n[:, None] & (g[None, :] < K // 4), other=0)
        nib = word >> (4 * (g % 8))[None, :]
        i0 = nib & 3
        i1 = (nib >> 2) & 3
        zero = tl.zeros_like(v0)
        # Indices are strictly increasing: column 0 can only be the first kept value, column 3 the second.
        w0 = tl.where(i0 == 0, v0, zero)
        w1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
        w2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
        w3 = tl.where(i1 == 3, v1, zero)
        acc = tl.dot(x0, tl.trans(w0), acc, input_precision="ieee")
        acc = tl.dot(x1, tl.trans(w1), acc, input_precision="ieee")
        acc = tl.dot(x2, tl.trans(w2), acc, input_precision="ieee")
        acc = tl.dot(x3, tl.trans(w3), acc, input_precision="ieee")

    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT:
        tl.store(ws_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask)
    else:
        acc = _epilogue(acc, bias_ptr, offs_n, mask_n, HAS_BIAS, ACT)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def splitk_reduce_kernel(ws_ptr, bias_ptr, out_ptr, M, N, S, stride_om,
                         HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[m, :] = epilogue(sum_s ws[s, m, :]); one program per (row, N block)."""
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((1, BLOCK_N), dtype=tl.float32)
    for s in range(0, S):
        acc += tl.load(ws_ptr + (s * M + m) * N + offs_n, mask=mask_n, other=0.0)[None, :]
    acc = _epilogue(acc, bias_ptr, offs_n, mask_n, HAS_BIAS, ACT)
    tl.store(out_ptr + m * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask_n[None, :])


sparse24_decode = triton.autotune(DECODE_CONFIGS, key=AUTOTUNE_KEY)(sparse24_matmul_kernel)
sparse24_tiles = triton.autotune(TILE_CONFIGS, key=AUTOTUNE_KEY)(sparse24_matmul_kernel)
# The fused block rotation needs BLOCK_K to be a multiple of the block size: the caller passes it.
sparse24_rot_decode = triton.autotune(ROT_DECODE_CONFIGS, key=AUTOTUNE_KEY + ["ROT_B"])(sparse24_matmul_kernel)
sparse24_rot_tiles = triton.autotune(ROT_TILE_CONFIGS, key=AUTOTUNE_KEY + ["ROT_B"])(sparse24_matmul_kernel)
