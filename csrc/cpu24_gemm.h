// The sparse GEMM the SIMD and scalar TUs share (prefill: M beyond decode): y = x @ W^T + b on the kept values
// themselves, so it does half a dense GEMM's multiplies. Included inside each kernel TU's anonymous namespace (never
// across TUs by linkage, see cpu24.h), after the TU defines
//   struct Vec { using T; kLanes; kVecs (vectors of x rows per tile: a block of kLanes * kVecs rows); kRows (weight
//                rows per tile); zero(), load(const float*), store(float*, T), set1(float), fma(a, b, c) = a*b+c };
//
// x is packed once per call as blocks of B = kLanes * kVecs rows transposed: xp[block][K][B], so one column of a
// block is kVecs vector loads. A kept value w of weight row n at column c then adds w * xp[block][c][:] to row n's
// B outputs: a broadcast, kVecs loads and kVecs FMAs, with no permute. A tile holds kRows x kVecs accumulators
// over kCpu24GemmKc columns of K; that slice of the packed block (kCpu24GemmKc * B floats) stays in L1 while every tile of
// the call's weight rows passes over it, and the outputs go to `work` (transposed, [block][rows][B]) between
// slices. Quantized or bf16 values arrive as fp32 (the caller widens them per chunk of rows).
#pragma once

// A tile's weights over a slice, packed in the order the tile reads them: per meta byte b, for each row r, its byte
// (mp[b * R + r]) and its 4 kept values (vp[(b * R + r) * 4 ..]). Read in place, a tile's R rows lie K/2 floats apart,
// the same L1 set for K a multiple of 2048, and evict each other and the packed x.
template <class V, int R>
void gemm_tile(const float* vp, const uint8_t* mp, const float* xp, int64_t bytes, float* out, bool first) {
  constexpr int NV = V::kVecs, L = V::kLanes, B = L * NV;
  typename V::T acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = first ? V::zero() : V::load(out + r * B + v * L);
  for (int64_t b = 0; b < bytes; ++b, vp += 4 * R, mp += R) {
    const float* xb = xp + 8 * b * B;
    // unrolled, so the accumulators stay in registers across rows (GCC otherwise runs a row at a time from memory)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const unsigned byte = mp[r];
      // kept value t of the byte's 8 columns: group t/2 (columns 4*(t/2)..+3), its 2-bit index picks one
      const float* col[4] = {xb + (byte & 3) * B, xb + ((byte >> 2) & 3) * B, xb + (4 + ((byte >> 4) & 3)) * B,
                             xb + (4 + (byte >> 6)) * B};
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) {
        const typename V::T wt = V::set1(vp[4 * r + t]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(wt, V::load(col[t] + v * L), acc[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) V::store(out + r * B + v * L, acc[r][v]);
}

// The rows left over after whole tiles, R - 1 or fewer of them.
template <class V, int R>
void gemm_rest(const float* vp, const uint8_t* mp, const float* xp, int64_t bytes, float* out, bool first,
               int64_t rows) {
  if constexpr (R > 1)
    if (rows < R) return gemm_rest<V, R - 1>(vp, mp, xp, bytes, out, first, rows);
  gemm_tile<V, R>(vp, mp, xp, bytes, out, first);
}

template <class V>
void gemm_rows(const Cpu24Gemm& g) {
  constexpr int R = V::kRows, B = V::kLanes * V::kVecs;
  const int64_t k = g.k, blocks = (g.m + B - 1) / B;
  float* vpack = g.vpack;
  uint8_t* mpack = g.mpack;
  for (int64_t k0 = 0; k0 < k; k0 += kCpu24GemmKc) {
    const int64_t bytes = (k - k0 < kCpu24GemmKc ? k - k0 : kCpu24GemmKc) / 8;
    for (int64_t r0 = 0; r0 < g.rows; r0 += R) {  // pack the slice, tile by tile
      const int64_t rt = g.rows - r0 < R ? g.rows - r0 : R;
      float* vp = vpack + r0 * bytes * 4;
      uint8_t* mp = mpack + r0 * bytes;
      for (int64_t b = 0; b < bytes; ++b)
        for (int64_t r = 0; r < rt; ++r) {
          mp[b * rt + r] = g.meta[(r0 + r) * (k / 8) + k0 / 8 + b];
          std::memcpy(vp + (b * rt + r) * 4, g.values + (r0 + r) * (k / 2) + k0 / 2 + 4 * b, 4 * sizeof(float));
        }
    }
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const float* xp = g.xp + (blk * k + k0) * B;
      float* out = g.work + blk * g.rows * B;
      int64_t r0 = 0;
      for (; r0 + R <= g.rows; r0 += R)
        gemm_tile<V, R>(vpack + r0 * bytes * 4, mpack + r0 * bytes, xp, bytes, out + r0 * B, k0 == 0);
      if (r0 < g.rows)
        gemm_rest<V, R - 1>(vpack + r0 * bytes * 4, mpack + r0 * bytes, xp, bytes, out + r0 * B,
                            k0 == 0, g.rows - r0);
    }
  }
  for (int64_t i = 0; i < g.m; ++i) {
    const float* o = g.work + ((i / B) * g.rows) * B + i % B;
    float* y = g.y + i * g.ldy;
    for (int64_t r = 0; r < g.rows; ++r) y[r] = o[r * B] + (g.bias ? g.bias[r] : 0.0f);
  }
}
