"""Triton 2:4 sparse matmul: ``Y = (X @ R) @ W^T + b`` from compressed ``W``.

Upstream Triton has no sparse tensor-core instruction, so each program loads the
compressed values and metadata, rebuilds the dense ``W`` tile in registers and
runs dense ``tl.dot``s. It moves 9/16 of the dense weight bytes (2 bytes of
values + 1/4 byte of metadata per kept fp16 value), so at decode the ceiling
over a dense GEMV is 16/9 = 1.78x.

Layout (derived at load time from the canonical format, see ``sparse_runtime.format.codec``):

``values [N, K/2]``
    the canonical tensor as is, row-major: a row's kept values for a K tile are
    contiguous, so they load as wide vectors along K.
``meta [N, ceil(K/32)] int32``
    the canonical bytes with each group's nibble rewritten as the bitmask of its
    two kept columns (bit ``c`` set: column ``4g + c`` kept), each row
    zero-padded to a multiple of 4 bytes and read as little-endian int32: word
    ``w`` covers the 16 kept values (8 groups, 32 dense columns) ``16w .. 16w+15``;
    group ``g`` is the nibble at bits ``4*(g % 8)``. Bit tests cost the
    expansion fewer instructions than comparing 2-bit indices (SASS: 258
    instead of 294 in the 16x64x64 decode loop on sm_90).

Instead of interleaving the rebuilt ``W`` back to ``[BN, BK]`` the kernel splits
the X tile by column phase: with ``x_c = X[:, c::4]`` and
``w_c[n, g] = W[n, 4g + c]`` (selected from the two kept values of group ``g``),
``X @ W^T = sum_c x_c @ w_c^T``: four dots of depth ``BK/4``, no gather.

Schedules (config lists below; ``sparse_runtime.ops.triton_plan`` chooses the schedule by M, the list, and
each config's split-K factor):

* decode (M <= 16): one 16-row M tile, narrow N blocks, long K tiles and
  split-K over several programs per N block so the grid fills the GPU; each
  split writes fp32 partials ``[S, M, N]`` and bumps a per-tile counter; the
  last to arrive sums the partials in split order (deterministic), adds the
  bias and resets the counter: one launch, no memset, safe to autotune.
* tiles (M > 16): classic 2-D tiling with grouped program order for L2 reuse,
  split over K the same way where the output tiles alone are too few to fill the GPU.

Each config gets its own split (``triton_plan.split_k``, from the M bucket): enough CTAs for a few per SM;
configs that cannot get there are pruned when others can.

Rotation prologue (``ROT``): ``R`` is block-diagonal, stored as blocks
``[K/b, b, b]`` (a full ``[K, K]`` ``R`` is the case ``b = K``); each X tile is
rotated in registers before the sparse product. ``ROT_TILE`` when the K tile holds
whole blocks (``b`` divides ``BLOCK_K``, configs pruned to those): one
``[BM, BK] x [BK, BK]`` dot against the masked diagonal of R, a pipelined load
like the others. ``ROT_ROWS`` otherwise (wider blocks, full R): a loop over the
rows of R in the blocks the tile meets, ``BLOCK_J`` at a time; a full R is then
re-read ``K x BK`` per tile by every N block (O(N/BN * K^2) reads from L2):
exact, but slower than rotating first at large ``K``. Every N block re-reads
its slice of R, so R costs ``b / (0.56 * BLOCK_N)`` of the weight's bytes in
L2 traffic: wide N blocks keep it small.

Bytes per call (fp16/bf16, no rotation): ``N*K`` of values + ``N*K/8`` of meta
+ ``2*(M*K + M*N)`` of X and Y, plus ``8*S*M*N`` of fp32 partials when split ``S``
ways (``triton_plan.split_k``: resident in half the L2, else under 10% of the weight's bytes).
4096x4096 at M=1: 18.9 MB against 33.6 MB dense.

Everything accumulates in fp32; the rotated X is rounded to the input dtype,
as the unfused ``(x @ R)`` would be.

Quantized values (``QUANT``, the codes of ``sparse_runtime.format.quant``): ``values`` holds codes instead,
int8 ``[N, K/2]``, fp8 e4m3 ``[N, K/2]`` read as bytes (sm_80 has no e4m3 type), or int4 ``[N, K/4]`` uint8
with one byte per 2:4 group (its first kept value in the low nibble, each stored as code + 8); ``scales``
(in x's dtype) are ``[N]`` (``QGROUP = 0``: one per output row) or ``[N, K/QGROUP]`` (one per row and group of
``QGROUP`` dense columns, a power of two, so a K tile holds whole groups or lies in one). Each code is
dequantized in registers, ``code * scale`` in fp32 rounded to x's dtype (bit for bit the weight that
``format.quant.dequantize_codes`` gives), before the dots: the weight streams 1/2 (int8, fp8) or 1/4 (int4)
of its bytes plus the scales.
"""
import triton
import triton.language as tl

# ROT (constexpr): how the prologue rotates the X tile.
ROT_NONE = tl.constexpr(0)  # no rotation
ROT_TILE = tl.constexpr(1)  # the K tile holds whole diagonal blocks of R: one dot against R's masked diagonal
ROT_ROWS = tl.constexpr(2)  # wider blocks, or a full R: a loop over the rows of R in the blocks the tile meets
# QUANT (constexpr): what ``values`` holds.
Q_NONE = tl.constexpr(0)  # the weight's values, in x's dtype
Q_INT8 = tl.constexpr(1)  # int8 codes [N, K/2]
Q_FP8 = tl.constexpr(2)  # float8_e4m3fn codes [N, K/2], as uint8
Q_INT4 = tl.constexpr(3)  # int4 codes [N, K/4] uint8, a 2:4 group per byte


def _configs(blocks, warps, stages, swap_ab):
    return [triton.Config(dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), b), SWAP_AB=swap_ab), num_warps=w, num_stages=s)
            for b in blocks for w in warps for s in stages]


# Decode streams the weight: small tiles (few registers, many CTAs per SM) and deep
# pipelines keep enough bytes in flight; W is the MMA's A operand (swap AB: Y^T = W X^T).
GPU_DECODE_CONFIGS = (_configs([(16, 64, 64), (16, 128, 64)], [4], [4, 6], True)
                      + _configs([(16, 64, 128)], [4], [2, 4], True)
                      + _configs([(16, 128, 128)], [8], [2, 4], True)
                      # 2 stages leave room for R's [BK, BK] tile (ROT_TILE); wide N blocks share it
                      + _configs([(16, 256, 128)], [8], [2], True)
                      + _configs([(16, 256, 64), (16, 64, 256)], [8], [4], True))
GPU_TILE_CONFIGS = (_configs([(64, 64, 64), (64, 128, 64)], [4], [3, 4], False)
                    + _configs([(128, 64, 64)], [4], [3], False)
                    + _configs([(128, 128, 64)], [8], [3, 4], False)
                    # (64, 256, 64) is left out: it spills on sm_90 (benchmarks/kernel_report.py)
                    + _configs([(128, 128, 128)], [8], [2, 3], False)
                    # with a 128-block rotation (R's [128, 128] tile per stage) only this one fits sm_80
                    + _configs([(64, 64, 128)], [4], [2], False))
# Without a GPU driver the interpreter cannot benchmark configs: one small config per schedule.
INTERPRETER_DECODE_CONFIGS = _configs([(16, 32, 64)], [4], [1], True)
INTERPRETER_TILE_CONFIGS = _configs([(32, 32, 64)], [4], [1], False)
# One config per schedule, each fitting sm_80 and sm_90 with a 128-block rotation: GPU correctness tests compile
# a handful of kernels instead of replaying the whole autotune space on a cold cache.
PINNED_DECODE_CONFIGS = _configs([(16, 128, 128)], [8], [2], True)
PINNED_TILE_CONFIGS = _configs([(64, 64, 128)], [4], [2], False)


@triton.jit
def _split4(t, BM: tl.constexpr, BK: tl.constexpr):
    """[BM, BK] -> its four column phases t[:, c::4], each [BM, BK/4]."""
    t = tl.reshape(t, (BM, BK // 4, 2, 2))
    even, odd = tl.split(t)  # columns 4g + {0, 2} and 4g + {1, 3}
    t0, t2 = tl.split(even)
    t1, t3 = tl.split(odd)
    return t0, t1, t2, t3


@triton.jit
def _rotate_part(acc, x_rows, rot_ptr, mask_m, kj, kx, K, ROT_B: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + X[:, kj] @ R[kj, kx] for R stored as diagonal blocks [K/ROT_B, ROT_B, ROT_B] (others are zero)."""
    xj = tl.load(x_rows + kj[None, :], mask=mask_m[:, None] & (kj[None, :] < K), other=0.0)
    blk_j = kj // ROT_B
    blk_k = kx // ROT_B
    r_ptrs = rot_ptr + blk_j[:, None] * (ROT_B * ROT_B) + (kj % ROT_B)[:, None] * ROT_B + (kx % ROT_B)[None, :]
    r_mask = (blk_j[:, None] == blk_k[None, :]) & (kj[:, None] < K) & (kx[None, :] < K)
    return tl.dot(xj, tl.load(r_ptrs, mask=r_mask, other=0.0), acc, input_precision=DOT_PREC)


@triton.jit
def _e4m3_to_f32(c):
    """float8_e4m3fn bytes -> fp32, exactly: the 7 bits under the sign, shifted to fp16's exponent and mantissa,
    are the value times 2^-8 (subnormals included; NaN codes are refused at load time)."""
    h = ((c & 0x7F).to(tl.uint16) << 7) | ((c & 0x80).to(tl.uint16) << 8)
    return h.to(tl.float16, bitcast=True).to(tl.float32) * 256.0


@triton.jit
def _codes_to_f32(c, QUANT: tl.constexpr):
    if QUANT == Q_FP8:
        return _e4m3_to_f32(c)
    return c.to(tl.float32)


@triton.jit
def _tile_scales(s_rows, s_row, k0, mask_n, K, QGROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The fp32 scale of each (row, 2:4 group) of the tile, [BLOCK_N, BLOCK_K/4] or broadcastable to it."""
    if QGROUP == 0:  # one per row, loaded once
        return s_row[:, None]
    elif QGROUP >= BLOCK_K:  # the tile lies in one group
        return tl.load(s_rows + k0 // QGROUP, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    else:  # the tile holds BLOCK_K / QGROUP whole groups of QGROUP / 4 2:4 groups each
        kq = k0 // QGROUP + tl.arange(0, BLOCK_K // QGROUP)
        s = tl.load(s_rows[:, None] + kq[None, :], mask=mask_n[:, None] & (kq[None, :] < K // QGROUP), other=0.0)
        s = tl.broadcast_to(s.to(tl.float32)[:, :, None], (BLOCK_N, BLOCK_K // QGROUP, QGROUP // 4))
        return tl.reshape(s, (BLOCK_N, BLOCK_K // 4))


@triton.jit
def _add_bias(acc, bias_ptr, offs_n, mask_n, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def sparse24_matmul_kernel(
    x_ptr, values_ptr, meta_ptr, scales_ptr, rot_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_vn, stride_mn, stride_om,
    HAS_BIAS: tl.constexpr, ROT: tl.constexpr, ROT_B: tl.constexpr,
    DOT_PREC: tl.constexpr, SWAP_AB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr = 32,
    GROUP_M: tl.constexpr = 8, QUANT: tl.constexpr = 0, QGROUP: tl.constexpr = 0,
):
    """One (M tile, N tile) x one K slice of the grid's ``S = num_programs(1)`` (whole K tiles each).
    ``S > 1``: write fp32 partials to ``ws [S, M, N]``; ``lock`` holds a zeroed int32 counter per (M, N) tile.

    ``DOT_PREC``: "ieee" for fp32 inputs (no TF32 rounding), the backend default otherwise.
    ``SWAP_AB``: accumulate ``Y^T = W X^T`` so the wide W tile is the MMA's M side (wgmma
    needs M >= 64; X's 16 rows become its N side).
    ``QUANT``, ``QGROUP``: codes and their scales (module docstring); ``scales_ptr`` is unused for ``Q_NONE``."""
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
    offs_w = tl.arange(0, BLOCK_K // 32)  # meta words of the tile
    offs_j = tl.arange(0, BLOCK_J)  # rows of R per rotation step
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    v_rows = values_ptr + offs_n[:, None] * stride_vn
    m_rows = meta_ptr + offs_n[:, None] * stride_mn
    s_rows = scales_ptr + offs_n
    s_row = None
    if QGROUP != 0:
        s_rows = scales_ptr + offs_n * (K // QGROUP)
    elif QUANT != Q_NONE:
        s_row = tl.load(s_rows, mask=mask_n, other=0.0).to(tl.float32)
    wdt = x_ptr.dtype.element_ty  # the dtype the dots take W in

    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Split s takes K tiles [s T / S, (s + 1) T / S): balanced to one tile, none empty when S <= T.
    k_tiles = tl.cdiv(K, BLOCK_K)
    k_start = (pid_k * k_tiles // tl.num_programs(1)) * BLOCK_K
    k_end = min(((pid_k + 1) * k_tiles // tl.num_programs(1)) * BLOCK_K, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        k0 = tl.multiple_of(k0, BLOCK_K)  # slices are whole tiles: lets loads vectorize (and go async)
        kx = k0 + offs_kx
        if ROT == ROT_NONE:
            xt = tl.load(x_rows + kx[None, :], mask=mask_m[:, None] & (kx[None, :] < K), other=0.0)
        elif ROT == ROT_TILE:  # the tile holds whole diagonal blocks: one product
            xr = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            xt = _rotate_part(xr, x_rows, rot_ptr, mask_m, kx, kx, K, ROT_B, DOT_PREC).to(x_ptr.dtype.element_ty)
        else:  # ROT_ROWS: blocks wider than the tile, or a full R: the rows of R in the blocks the tile meets
            xr = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for j0 in range((k0 // ROT_B) * ROT_B, min(((k0 + BLOCK_K - 1) // ROT_B + 1) * ROT_B, K), BLOCK_J):
                xr = _rotate_part(xr, x_rows, rot_ptr, mask_m, j0 + offs_j, kx, K, ROT_B, DOT_PREC)
            xt = xr.to(x_ptr.dtype.element_ty)
        x0, x1, x2, x3 = _split4(xt, BLOCK_M, BLOCK_K)

        if QUANT == Q_INT4:  # a byte per 2:4 group: first kept value in the low nibble, second in the high
            kg = k0 // 4 + tl.arange(0, BLOCK_K // 4)
            c = tl.load(v_rows + kg[None, :], mask=mask_n[:, None] & (kg[None, :] < K // 4), other=0)
            s = _tile_scales(s_rows, s_row, k0, mask_n, K, QGROUP, BLOCK_N, BLOCK_K)
            # (nibble - 8) * s as one rounding of nibble * s - 8 s: the same fp32 value, one FMA
            off = -8.0 * s
            v0 = tl.fma((c & 0xF).to(tl.float32), s, off).to(wdt)
            v1 = tl.fma((c >> 4).to(tl.float32), s, off).to(wdt)
        else:
            kv = k0 // 2 + offs_kv
            v = tl.load(v_rows + kv[None, :], mask=mask_n[:, None] & (kv[None, :] < K // 2), other=0)
            v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, BLOCK_K // 4, 2)))  # first / second kept value per group
            if QUANT != Q_NONE:
                s = _tile_scales(s_rows, s_row, k0, mask_n, K, QGROUP, BLOCK_N, BLOCK_K)
                v0 = (_codes_to_f32(v0, QUANT) * s).to(wdt)
                v1 = (_codes_to_f32(v1, QUANT) * s).to(wdt)
        kw = k0 // 32 + offs_w
        word = tl.load(m_rows + kw[None, :], mask=mask_n[:, None] & (kw[None, :] < tl.cdiv(K, 32)), other=0)
        # Each word holds 8 groups; expand in registers rather than loading it 8 times.
        nib = tl.reshape(word[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :], (BLOCK_N, BLOCK_K // 4))
        zero = tl.zeros_like(v0)
        # Column 0 can only hold the first kept value, column 3 only the second; column 1 holds the second
        # when column 0 is kept too, column 2 the first when column 3 is kept too.
        p0 = (nib & 1) != 0
        p3 = (nib & 8) != 0
        w0 = tl.where(p0, v0, zero)
        w1 = tl.where((nib & 2) != 0, tl.where(p0, v1, v0), zero)
        w2 = tl.where((nib & 4) != 0, tl.where(p3, v0, v1), zero)
        w3 = tl.where(p3, v1, zero)
        if SWAP_AB:
            acc = tl.dot(w0, tl.trans(x0), acc, input_precision=DOT_PREC)
            acc = tl.dot(w1, tl.trans(x1), acc, input_precision=DOT_PREC)
            acc = tl.dot(w2, tl.trans(x2), acc, input_precision=DOT_PREC)
            acc = tl.dot(w3, tl.trans(x3), acc, input_precision=DOT_PREC)
        else:
            acc = tl.dot(x0, tl.trans(w0), acc, input_precision=DOT_PREC)
            acc = tl.dot(x1, tl.trans(w1), acc, input_precision=DOT_PREC)
            acc = tl.dot(x2, tl.trans(w2), acc, input_precision=DOT_PREC)
            acc = tl.dot(x3, tl.trans(w3), acc, input_precision=DOT_PREC)
    if SWAP_AB:
        acc = tl.trans(acc)

    mask = mask_m[:, None] & mask_n[None, :]
    if tl.num_programs(1) > 1:
        ws_tile = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws_tile + pid_k * M * N, acc, mask=mask)
        # The last split to finish a tile reduces it (fixed order: deterministic) and resets
        # the tile's counter for the next call, so split-K stays one launch (CUDA-graph friendly).
        tl.debug_barrier()  # every thread's partials are stored before the release below
        count = tl.atomic_add(lock_ptr + pid, 1, sem="acq_rel")
        if count == tl.num_programs(1) - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(0, tl.num_programs(1)):
                acc += tl.load(ws_tile + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            acc = _add_bias(acc, bias_ptr, offs_n, mask_n, HAS_BIAS)
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=mask)
            tl.atomic_xchg(lock_ptr + pid, 0)
    else:
        acc = _add_bias(acc, bias_ptr, offs_n, mask_n, HAS_BIAS)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)

