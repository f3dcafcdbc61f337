// AVX-512 2:4 kernel (built with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma; run only where the CPU has
// them). No torch headers, everything but the entry points in an anonymous namespace (see cpu24.h).
//
// A step covers 32 input columns of an output row: 16 kept values (one zmm) and 4 meta bytes. The 2-bit indices
// become 16 column numbers 0..31 in a few integer ops, and one vpermt2ps gathers the matching x entries from the
// two zmm holding x's 32 columns, so W is read at its compressed size and never expanded in memory. The column
// numbers of a step are reused for every row of x in the pass. int8 and int4 codes are widened to fp32 in
// registers (the scales are applied to sums, not to codes).
// GCC 12's AVX-512 headers self-initialise their "undefined" vectors and warn about it (GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <cstring>

#include "cpu24.h"

namespace {


// Kept value j of a step is in group j/2, i.e. columns 4*(j/2)..+3; its index is bits 2j..2j+1 of the 4 meta
// bytes read as one little-endian word. vpermt2ps reads the low 5 bits of each lane, so they must be clean.
inline __m512i step_columns(uint32_t w) {
  const __m512i shift = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i s = _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(w)), shift);
  return _mm512_ternarylogic_epi32(s, _mm512_set1_epi32(3), base, 0xEA);  // (s & 3) | base
}

// int4: lanes 0..7 take the low dword of the step's 8 code bytes, 8..15 the high one; each lane shifts its
// nibble down, and vpermps (which reads only the low 4 bits of each index) maps the stored nibble to code - 8.
inline __m512 int4_codes(uint64_t w) {
  const __m512i dwords = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                                  _mm512_castsi128_si512(_mm_cvtsi64_si128(static_cast<long long>(w))));
  const __m512i nibbles = _mm512_srlv_epi32(
      dwords, _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28));
  const __m512 code = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  return _mm512_permutexvar_ps(nibbles, code);
}

// The step's 16 values from kept value i on, as fp32 (codes as they are: the scales come later).
template <Cpu24Values V>
inline __m512 load_values(const void* values, int64_t i) {
  if constexpr (V == Cpu24Values::bf16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(values) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  // bf16 is fp32's top half
  } else if constexpr (V == Cpu24Values::f32) {
    return _mm512_loadu_ps(static_cast<const float*>(values) + i);
  } else if constexpr (V == Cpu24Values::int8) {
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(values) + i));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c));
  } else {
    uint64_t w;
    std::memcpy(&w, static_cast<const uint8_t*>(values) + i / 2, 8);
    return int4_codes(w);
  }
}

// The first popcount(mask) of them (mask = 2^j - 1), the rest zero; nothing past them is read.
template <Cpu24Values V>
inline __m512 load_values_masked(const void* values, int64_t i, __mmask16 mask) {
  if constexpr (V == Cpu24Values::bf16) {
    const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(values) + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else if constexpr (V == Cpu24Values::f32) {
    return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(values) + i);
  } else if constexpr (V == Cpu24Values::int8) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, static_cast<const int8_t*>(values) + i)));
  } else {
    uint64_t w = 0;
    std::memcpy(&w, static_cast<const uint8_t*>(values) + i / 2, __builtin_popcount(mask) / 2);
    return _mm512_maskz_mov_ps(mask, int4_codes(w));  // a zero nibble is code -8: clear those lanes
  }
}

// y[m0 .. m0+MT, rows n0 + r * stride for r < R] over all of K. Quantized values: per-row scales multiply the
// row's sum at the end; grouped scales (p.group < K, a multiple of 32 columns, so whole steps) multiply each
// group's sum into a second set of accumulators when the group ends.
template <Cpu24Values V, int MT, int R>
void tile(const Cpu24Problem& p, int64_t n0, int64_t m0, int64_t stride) {
  constexpr bool kQuant = cpu24_quantized(V);
  const int64_t k = p.k, nvals = k / 2, nbytes = k / 8, steps = k / 32;
  const float* x = p.x + m0 * k;
  const uint8_t* meta[R];
  int64_t vrow[R];
  for (int r = 0; r < R; ++r) {
    meta[r] = p.meta + (n0 + r * stride) * nbytes;
    vrow[r] = (n0 + r * stride) * nvals;
  }
  __m512 acc[MT][R];
  const auto zero_acc = [&] {
    for (int i = 0; i < MT; ++i)
      for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  };
  const auto step = [&](int64_t s) {
    __m512 lo[MT], hi[MT];
    for (int i = 0; i < MT; ++i) {
      lo[i] = _mm512_loadu_ps(x + i * k + 32 * s);
      hi[i] = _mm512_loadu_ps(x + i * k + 32 * s + 16);
    }
    for (int r = 0; r < R; ++r) {
      uint32_t w;
      std::memcpy(&w, meta[r] + 4 * s, 4);
      const __m512i col = step_columns(w);
      const __m512 v = load_values<V>(p.values, vrow[r] + 16 * s);
      for (int i = 0; i < MT; ++i)
        acc[i][r] = _mm512_fmadd_ps(_mm512_permutex2var_ps(lo[i], col, hi[i]), v, acc[i][r]);
    }
  };
  const auto run_steps = [&](int64_t s0, int64_t s1) {
    cpu24_steps<V, R, 16>(p.values, vrow, meta, s0, s1, step);
  };
  zero_acc();

  const bool grouped = kQuant && p.group < k;
  if (!grouped) {
    run_steps(0, steps);
    // K % 32 in {8, 16, 24}: the same step on masked loads. Masked-off values and x lanes are zero and never
    // fault, so nothing past the end of a row is read.
    const int rem = static_cast<int>(k - 32 * steps);
    if (rem) {
      const __mmask16 vmask = static_cast<__mmask16>((1u << (rem / 2)) - 1);
      const __mmask16 lomask = static_cast<__mmask16>(rem >= 16 ? 0xFFFFu : (1u << rem) - 1);
      const __mmask16 himask = static_cast<__mmask16>(rem > 16 ? (1u << (rem - 16)) - 1 : 0u);
      __m512 lo[MT], hi[MT];
      for (int i = 0; i < MT; ++i) {
        lo[i] = _mm512_maskz_loadu_ps(lomask, x + i * k + 32 * steps);
        hi[i] = _mm512_maskz_loadu_ps(himask, x + i * k + 32 * steps + 16);
      }
      for (int r = 0; r < R; ++r) {
        uint32_t w = 0;
        std::memcpy(&w, meta[r] + 4 * steps, rem / 8);
        const __m512i col = step_columns(w);
        const __m512 v = load_values_masked<V>(p.values, vrow[r] + 16 * steps, vmask);
        for (int i = 0; i < MT; ++i)
          acc[i][r] = _mm512_fmadd_ps(_mm512_permutex2var_ps(lo[i], col, hi[i]), v, acc[i][r]);
      }
    }
  } else if constexpr (kQuant) {
    const int64_t group_steps = p.group / 32, groups = k / p.group;
    __m512 total[MT][R];
    for (int i = 0; i < MT; ++i)
      for (int r = 0; r < R; ++r) total[i][r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      if (g) zero_acc();
      run_steps(g * group_steps, (g + 1) * group_steps);
      for (int r = 0; r < R; ++r) {
        const __m512 scale = _mm512_set1_ps(p.scales[(n0 + r * stride) * groups + g]);
        for (int i = 0; i < MT; ++i) total[i][r] = _mm512_fmadd_ps(acc[i][r], scale, total[i][r]);
      }
    }
    for (int i = 0; i < MT; ++i)
      for (int r = 0; r < R; ++r) acc[i][r] = total[i][r];
  }

  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r * stride;
    const float bias = p.bias ? p.bias[n] : 0.0f;
    const float scale = kQuant && !grouped ? p.scales[n] : 1.0f;
    for (int i = 0; i < MT; ++i) {
      const float sum = _mm512_reduce_add_ps(acc[i][r]);
      p.y[(m0 + i) * p.n + n] = (kQuant ? sum * scale : sum) + bias;
    }
  }
}

// Decompression (prefill): a meta byte's 8 columns keep 4 values; kKept[byte] has their column bits, so
// vexpandps drops consecutive values into the kept lanes and zeroes the rest.
struct KeptLut {
  uint8_t bits[256];
};

constexpr KeptLut make_kept() {
  KeptLut t{};
  for (int b = 0; b < 256; ++b)
    t.bits[b] = static_cast<uint8_t>((1 << (b & 3)) | (1 << ((b >> 2) & 3)) | (1 << (4 + ((b >> 4) & 3))) |
                                     (1 << (4 + ((b >> 6) & 3))));
  return t;
}

constexpr KeptLut kKept = make_kept();

void decompress_f32(const float* values, const uint8_t* meta, float* dense, int64_t rows, int64_t k) {
  const int64_t steps = k / 16;
  for (int64_t r = 0; r < rows; ++r) {
    const float* v = values + r * (k / 2);
    const uint8_t* mt = meta + r * (k / 8);
    float* out = dense + r * k;
    for (int64_t s = 0; s < steps; ++s) {
      const auto mask = static_cast<__mmask16>(kKept.bits[mt[2 * s]] | (kKept.bits[mt[2 * s + 1]] << 8));
      _mm512_storeu_ps(out + 16 * s, _mm512_maskz_expandloadu_ps(mask, v + 8 * s));
    }
    if (k % 16)  // 8 columns left; expandloadu reads only the 4 values the mask asks for
      _mm512_mask_storeu_ps(out + 16 * steps, 0xFF, _mm512_maskz_expandloadu_ps(kKept.bits[mt[2 * steps]], v + 8 * steps));
  }
}

void decompress_bf16(const uint16_t* values, const uint8_t* meta, uint16_t* dense, int64_t rows, int64_t k) {
  // vpexpandw needs AVX512-VBMI2: widen to 32-bit lanes, expand, narrow back.
  const int64_t steps = k / 16;
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* v = values + r * (k / 2);
    const uint8_t* mt = meta + r * (k / 8);
    uint16_t* out = dense + r * k;
    for (int64_t s = 0; s < steps; ++s) {
      const auto mask = static_cast<__mmask16>(kKept.bits[mt[2 * s]] | (kKept.bits[mt[2 * s + 1]] << 8));
      const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + 8 * s)));
      const __m512i e = _mm512_maskz_expand_epi32(mask, _mm512_castsi256_si512(w));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * s), _mm512_cvtepi32_epi16(e));
    }
    if (k % 16) {
      const __m256i w = _mm256_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(v + 8 * steps)));
      const __m512i e = _mm512_maskz_expand_epi32(kKept.bits[mt[2 * steps]], _mm512_castsi256_si512(w));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * steps), _mm256_castsi256_si128(_mm512_cvtepi32_epi16(e)));
    }
  }
}

template <Cpu24Values V>
struct Kernel {
  // int4 may hold a second set of accumulators (grouped scales): half the rows of x per tile.
  static constexpr bool kInt4 = V == Cpu24Values::int4;
  static constexpr int kMaxMT = kInt4 ? 2 : 4;  // rows of x per tile (the tile's weight rows are reread from L1 for each)
  static constexpr int kRows = 4;  // weight rows per tile: kMaxMT * kRows accumulators, 16 of the 32 zmm (int4 8 + 8)
  // With the streams prefetched, 4 rows beat 8 (fewer streams) on Zen 5: 10-20% on the Llama-3-8B shapes.
  static constexpr int kWideRows = 4, kWideMaxM = 2;
  static constexpr int kXElemBytes = 4;
  template <int MT, int R>
  static void tile(const Cpu24Problem& p, int64_t n0, int64_t m0, int64_t stride) {
    ::tile<V, MT, R>(p, n0, m0, stride);
  }
};

#include "cpu24_rows.h"

struct Vec {
  using T = __m512;
  static constexpr int kLanes = 16, kVecs = 4, kRows = 6;  // 24 accumulators of the 32 zmm
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T set1(float f) { return _mm512_set1_ps(f); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
};

#include "cpu24_gemm.h"

}  // namespace

void sr_cpu24_gemm_avx512(const Cpu24Gemm& g) { gemm_rows<Vec>(g); }
int64_t sr_cpu24_gemm_block_avx512() { return Vec::kLanes * Vec::kVecs; }

void sr_cpu24_avx512(const Cpu24Problem& p, int64_t row0, int64_t row1) {
  switch (p.kind) {
    case Cpu24Values::f32: return schedule_rows<Kernel<Cpu24Values::f32>>(p, row0, row1);
    case Cpu24Values::bf16: return schedule_rows<Kernel<Cpu24Values::bf16>>(p, row0, row1);
    case Cpu24Values::int8: return schedule_rows<Kernel<Cpu24Values::int8>>(p, row0, row1);
    case Cpu24Values::int4: return schedule_rows<Kernel<Cpu24Values::int4>>(p, row0, row1);
  }
}

void sr_cpu24_decompress_avx512(const void* values, const uint8_t* meta, void* dense, int64_t rows, int64_t k,
                                int elem_bytes) {
  if (elem_bytes == 4)
    decompress_f32(static_cast<const float*>(values), meta, static_cast<float*>(dense), rows, k);
  else
    decompress_bf16(static_cast<const uint16_t*>(values), meta, static_cast<uint16_t*>(dense), rows, k);
}

float sr_sum_avx512(const float* a, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    s0 = _mm512_add_ps(s0, _mm512_loadu_ps(a + i));
    s1 = _mm512_add_ps(s1, _mm512_loadu_ps(a + i + 16));
    s2 = _mm512_add_ps(s2, _mm512_loadu_ps(a + i + 32));
    s3 = _mm512_add_ps(s3, _mm512_loadu_ps(a + i + 48));
  }
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i];
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3))) + tail;
}
