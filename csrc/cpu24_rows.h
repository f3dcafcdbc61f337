// The row schedule the SIMD kernels share: included inside each kernel TU's anonymous namespace (never across
// TUs by linkage, see cpu24.h), after the TU defines its kernel type K with
//   template <int MT, int R> static void tile(const Cpu24Problem&, int64_t n0, int64_t m0, int64_t stride):
//     y rows m0 .. m0+MT-1 for the weight rows n0 + r * stride, r < R, over all of K;
//   kMaxMT (rows of x per tile), kRows (weight rows per tile), kWideRows (weight rows per tile while
//   M <= kWideMaxM: then W's bytes bound the call, and each ISA's is the count it streams fastest), kXElemBytes.
//
// Strided tiles: a tile reads its R weight rows side by side. Adjacent rows would be R short streams (a
// 576-wide fp32 row is 18 cache lines) that end before the hardware prefetchers have learnt them; rows `span`
// apart are R streams that each run through `span` consecutive rows of the thread's chunk. Measured on Zen 4 at
// M = 1: SmolLM2's 576-wide matrices went from 6-15 to 9-20 GB/s, the Llama-3-8B shapes gained 10-20%.
#pragma once

template <class K, int R, int MT>
void tile_upto(const Cpu24Problem& p, int64_t n0, int64_t m0, int64_t stride, int64_t mt) {
  if constexpr (MT > 1)
    if (mt < MT) return tile_upto<K, R, MT - 1>(p, n0, m0, stride, mt);
  K::template tile<MT, R>(p, n0, m0, stride);
}

template <class K, int R, int MaxMT>
void all_of_x(const Cpu24Problem& p, int64_t n0, int64_t stride) {
  for (int64_t m0 = 0; m0 < p.m; m0 += MaxMT) tile_upto<K, R, MaxMT>(p, n0, m0, stride, p.m - m0);
}

// Tiles of R rows `span` apart over [row0, row1), then the rows left over one at a time.
template <class K, int R, int MaxMT>
void strided(const Cpu24Problem& p, int64_t row0, int64_t row1) {
  const int64_t span = (row1 - row0) / R;
  for (int64_t t = 0; t < span; ++t) all_of_x<K, R, MaxMT>(p, row0 + t, span);
  for (int64_t n = row0 + span * R; n < row1; ++n) all_of_x<K, 1, MaxMT>(p, n, 1);
}

template <class K>
void schedule_rows(const Cpu24Problem& p, int64_t row0, int64_t row1) {
  if (p.m <= K::kWideMaxM) return strided<K, K::kWideRows, K::kWideMaxM>(p, row0, row1);
  // Many rows of x: blocks of them that stay in L2 while the chunk's weight rows pass over each. W is then read
  // once per block (from memory, a small cost at that M); unblocked, each tile of weight rows would reread all
  // of x from L3, which bounds large M.
  constexpr int64_t kXBlockBytes = 512 * 1024;  // half an L2
  const int64_t fit = kXBlockBytes / (p.k * K::kXElemBytes) / K::kMaxMT * K::kMaxMT;
  const int64_t mb = fit > K::kMaxMT ? fit : K::kMaxMT;
  for (int64_t m0 = 0; m0 < p.m; m0 += mb) {
    Cpu24Problem b = p;
    b.x = p.x + m0 * p.k;
    b.x16 = p.x16 ? p.x16 + m0 * p.k : nullptr;
    b.y = p.y + m0 * p.n;
    b.m = p.m - m0 < mb ? p.m - m0 : mb;
    strided<K, K::kRows, K::kMaxMT>(b, row0, row1);
  }
}
