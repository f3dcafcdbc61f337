// AVX-512 BF16 2:4 kernel for bf16 weights (built with the AVX-512 flags plus -mavx512bf16; run only where the
// CPU has them). fp32 weights and quantized codes go to the AVX-512 kernel. No torch headers, everything but the entry point in an
// anonymous namespace (see cpu24.h).
//
// A step covers 64 input columns of an output row: 32 kept bf16 values (one zmm) and 8 meta bytes. x stays bf16:
// vpermt2w gathers the 32 matching x entries from the two zmm holding x's 64 columns, and vdpbf16ps multiplies
// the pairs and accumulates in fp32. Against widening to fp32 (the AVX-512 kernel) that halves the permutes and
// multiplies per row of x, which is what limits M > 4.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12's AVX-512 headers (GCC bug 105593)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <cstring>

#include "cpu24.h"

namespace {


// 16-bit lane j holds kept value j of the step: group j/2, columns 4*(j/2)..+3. Its 2-bit index is bits
// 2*(j%8)..+1 of 16-bit word j/8 of the step's 8 meta bytes read as one little-endian qword.
alignas(64) constexpr int16_t kWord[32] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                           2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3};
alignas(64) constexpr int16_t kShift[32] = {0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14,
                                            0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14};
alignas(64) constexpr int16_t kBase[32] = {0,  0,  4,  4,  8,  8,  12, 12, 16, 16, 20, 20, 24, 24, 28, 28,
                                           32, 32, 36, 36, 40, 40, 44, 44, 48, 48, 52, 52, 56, 56, 60, 60};

inline __m512i load_const(const int16_t* a) { return _mm512_load_si512(a); }

// Column numbers 0..63 of the step's 32 kept values (vpermt2w reads the low 6 bits of each lane, so clean them).
inline __m512i step_columns(uint64_t w) {
  const __m512i words = _mm512_permutexvar_epi16(load_const(kWord), _mm512_set1_epi64(static_cast<long long>(w)));
  const __m512i s = _mm512_srlv_epi16(words, load_const(kShift));
  return _mm512_ternarylogic_epi32(s, _mm512_set1_epi16(3), load_const(kBase), 0xEA);  // (s & 3) | base
}

inline __m512 dot(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh&>(a), reinterpret_cast<__m512bh&>(b));
}

// y[m0 .. m0+MT, rows n0 + r * stride for r < R] over all of K.
template <int MT, int R>
void tile(const Cpu24Problem& p, int64_t n0, int64_t m0, int64_t stride) {
  const int64_t k = p.k, nvals = k / 2, nbytes = k / 8, steps = k / 64;
  const uint16_t* x = p.x16 + m0 * k;
  const auto* values = static_cast<const uint16_t*>(p.values);
  const uint8_t* meta[R];
  int64_t vrow[R];
  for (int r = 0; r < R; ++r) {
    meta[r] = p.meta + (n0 + r * stride) * nbytes;
    vrow[r] = (n0 + r * stride) * nvals;
  }
  __m512 acc[MT][R];
  for (int i = 0; i < MT; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();

  const auto step = [&](int64_t s) {
    __m512i lo[MT], hi[MT];
    for (int i = 0; i < MT; ++i) {
      lo[i] = _mm512_loadu_si512(x + i * k + 64 * s);
      hi[i] = _mm512_loadu_si512(x + i * k + 64 * s + 32);
    }
    for (int r = 0; r < R; ++r) {
      uint64_t w;
      std::memcpy(&w, meta[r] + 8 * s, 8);
      const __m512i col = step_columns(w);
      const __m512i v = _mm512_loadu_si512(values + vrow[r] + 32 * s);
      for (int i = 0; i < MT; ++i) acc[i][r] = dot(acc[i][r], _mm512_permutex2var_epi16(lo[i], col, hi[i]), v);
    }
  };
  cpu24_steps<Cpu24Values::bf16, R, 32>(values, vrow, meta, 0, steps, step);

  // K % 64 in {8, ..., 56}: the same step on masked loads (zero lanes, no reads past the row, no faults).
  const int rem = static_cast<int>(k - 64 * steps);
  if (rem) {
    const auto vmask = static_cast<__mmask32>((1u << (rem / 2)) - 1);
    const auto lomask = static_cast<__mmask32>(rem >= 32 ? 0xFFFFFFFFu : (1u << rem) - 1);
    const auto himask = static_cast<__mmask32>(rem > 32 ? (1u << (rem - 32)) - 1 : 0u);
    __m512i lo[MT], hi[MT];
    for (int i = 0; i < MT; ++i) {
      lo[i] = _mm512_maskz_loadu_epi16(lomask, x + i * k + 64 * steps);
      hi[i] = _mm512_maskz_loadu_epi16(himask, x + i * k + 64 * steps + 32);
    }
    for (int r = 0; r < R; ++r) {
      uint64_t w = 0;
      std::memcpy(&w, meta[r] + 8 * steps, rem / 8);
      const __m512i col = step_columns(w);
      const __m512i v = _mm512_maskz_loadu_epi16(vmask, values + vrow[r] + 32 * steps);
      for (int i = 0; i < MT; ++i) acc[i][r] = dot(acc[i][r], _mm512_permutex2var_epi16(lo[i], col, hi[i]), v);
    }
  }

  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r * stride;
    const float bias = p.bias ? p.bias[n] : 0.0f;
    for (int i = 0; i < MT; ++i) p.y[(m0 + i) * p.n + n] = _mm512_reduce_add_ps(acc[i][r]) + bias;
  }
}

struct Kernel {
  static constexpr int kMaxMT = 4;  // rows of x per tile (the tile's weight rows are reread from L1 for each)
  static constexpr int kRows = 4;   // weight rows per tile: 16 accumulators + 8 x registers of the 32 zmm
  static constexpr int kWideRows = 4, kWideMaxM = 2;  // as the AVX-512 kernel's (see there)
  static constexpr int kXElemBytes = 2;
  template <int MT, int R>
  static void tile(const Cpu24Problem& p, int64_t n0, int64_t m0, int64_t stride) {
    ::tile<MT, R>(p, n0, m0, stride);
  }
};

#include "cpu24_rows.h"

}  // namespace

void sr_cpu24_avx512bf16(const Cpu24Problem& p, int64_t row0, int64_t row1) {
  if (p.kind != Cpu24Values::bf16 || p.x16 == nullptr) {
    sr_cpu24_avx512(p, row0, row1);
    return;
  }
  schedule_rows<Kernel>(p, row0, row1);
}
