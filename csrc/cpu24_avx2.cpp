// AVX2 + FMA 2:4 kernel (built with -mavx2 -mfma; run only where the CPU has them). No torch headers,
// everything but the entry points in an anonymous namespace (see cpu24.h).
//
// A step covers 16 input columns of an output row: 8 kept values (one ymm) and 2 meta bytes. Kept values 2g and
// 2g+1 come from group g (columns 4g..4g+3). With x's 16 columns regrouped once per step as A = [g0 | g2] and
// B = [g1 | g3] (128-bit halves), vpermilps picks within each half by the raw 2-bit index (it reads only bits
// 1:0 of each lane, so no masking), and a fixed blend takes lanes 2,3,6,7 (groups 1 and 3) from B. int8 and
// int4 codes are widened to fp32 in registers (the scales are applied to sums, not to codes).
#include <immintrin.h>

#include <cstring>

#include "cpu24.h"

namespace {

inline __m256i step_selectors(uint32_t w) {
  const __m256i shift = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  return _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w)), shift);
}

// int4: lane j takes nibble j of the step's 4 code bytes read as one little-endian word (byte j/2, the low
// nibble for even j), as code = nibble - 8.
inline __m256 int4_codes(uint32_t w) {
  const __m256i shift = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i nibbles = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w)), shift),
                                           _mm256_set1_epi32(15));
  return _mm256_cvtepi32_ps(_mm256_sub_epi32(nibbles, _mm256_set1_epi32(8)));
}

// The step's 8 values from kept value i on, as fp32 (codes as they are: the scales come later).
template <Cpu24Values V>
inline __m256 load_values(const void* values, int64_t i) {
  if constexpr (V == Cpu24Values::bf16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(values) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));  // bf16 is fp32's top half
  } else if constexpr (V == Cpu24Values::f32) {
    return _mm256_loadu_ps(static_cast<const float*>(values) + i);
  } else if constexpr (V == Cpu24Values::int8) {
    const __m128i c = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(values) + i));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
  } else {
    uint32_t w;
    std::memcpy(&w, static_cast<const uint8_t*>(values) + i / 2, 4);
    return int4_codes(w);
  }
}

// The 4 values of a half step (K % 16 == 8), upper lanes zero.
template <Cpu24Values V>
inline __m256 load_values_half(const void* values, int64_t i) {
  if constexpr (V == Cpu24Values::bf16) {
    const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(values) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else if constexpr (V == Cpu24Values::f32) {
    return _mm256_insertf128_ps(_mm256_setzero_ps(), _mm_loadu_ps(static_cast<const float*>(values) + i), 0);
  } else if constexpr (V == Cpu24Values::int8) {
    int32_t w;
    std::memcpy(&w, static_cast<const int8_t*>(values) + i, 4);
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi32_si128(w)));
  } else {
    uint16_t w;
    std::memcpy(&w, static_cast<const uint8_t*>(values) + i / 2, 2);
    return _mm256_blend_ps(int4_codes(w), _mm256_setzero_ps(), 0xF0);  // a zero nibble is code -8: clear those
  }
}

inline __m256 gather_x(__m256 a, __m256 b, __m256i sel) {
  return _mm256_blend_ps(_mm256_permutevar_ps(a, sel), _mm256_permutevar_ps(b, sel), 0xCC);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// y[m0 .. m0+MT, rows n0 + r * stride for r < R] over all of K. Quantized values: per-row scales multiply the
// row's sum at the end; grouped scales (p.group < K, a multiple of 32 columns, so whole steps) multiply each
// group's sum into a second set of accumulators when the group ends.
template <Cpu24Values V, int MT, int R>
void tile(const Cpu24Problem& p, int64_t n0, int64_t m0, int64_t stride) {
  constexpr bool kQuant = cpu24_quantized(V);
  const int64_t k = p.k, nvals = k / 2, nbytes = k / 8, steps = k / 16;
  const float* x = p.x + m0 * k;
  const uint8_t* meta[R];
  int64_t vrow[R];
  for (int r = 0; r < R; ++r) {
    meta[r] = p.meta + (n0 + r * stride) * nbytes;
    vrow[r] = (n0 + r * stride) * nvals;
  }
  __m256 acc[MT][R];
  const auto zero_acc = [&] {
    for (int i = 0; i < MT; ++i)
      for (int r = 0; r < R; ++r) acc[i][r] = _mm256_setzero_ps();
  };
  const auto step = [&](int64_t s) {
    __m256 a[MT], b[MT];
    for (int i = 0; i < MT; ++i) {
      const __m256 lo = _mm256_loadu_ps(x + i * k + 16 * s), hi = _mm256_loadu_ps(x + i * k + 16 * s + 8);
      a[i] = _mm256_permute2f128_ps(lo, hi, 0x20);  // columns 0..3 | 8..11
      b[i] = _mm256_permute2f128_ps(lo, hi, 0x31);  // columns 4..7 | 12..15
    }
    for (int r = 0; r < R; ++r) {
      uint16_t w;
      std::memcpy(&w, meta[r] + 2 * s, 2);
      const __m256i sel = step_selectors(w);
      const __m256 v = load_values<V>(p.values, vrow[r] + 8 * s);
      for (int i = 0; i < MT; ++i) acc[i][r] = _mm256_fmadd_ps(gather_x(a[i], b[i], sel), v, acc[i][r]);
    }
  };
  const auto run_steps = [&](int64_t s0, int64_t s1) {
    cpu24_steps<V, R, 8>(p.values, vrow, meta, s0, s1, step);
  };
  zero_acc();

  const bool grouped = kQuant && p.group < k;
  if (!grouped) {
    run_steps(0, steps);
    if (k % 16) {  // 8 columns left: groups 0 and 1 only, the upper halves are zero
      __m256 a[MT], b[MT];
      for (int i = 0; i < MT; ++i) {
        const __m256 lo = _mm256_loadu_ps(x + i * k + 16 * steps), zero = _mm256_setzero_ps();
        a[i] = _mm256_permute2f128_ps(lo, zero, 0x20);
        b[i] = _mm256_permute2f128_ps(lo, zero, 0x31);
      }
      for (int r = 0; r < R; ++r) {
        const __m256i sel = step_selectors(meta[r][2 * steps]);
        const __m256 v = load_values_half<V>(p.values, vrow[r] + 8 * steps);
        for (int i = 0; i < MT; ++i) acc[i][r] = _mm256_fmadd_ps(gather_x(a[i], b[i], sel), v, acc[i][r]);
      }
    }
  } else if constexpr (kQuant) {
    const int64_t group_steps = p.group / 16, groups = k / p.group;
    __m256 total[MT][R];
    for (int i = 0; i < MT; ++i)
      for (int r = 0; r < R; ++r) total[i][r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      if (g) zero_acc();
      run_steps(g * group_steps, (g + 1) * group_steps);
      for (int r = 0; r < R; ++r) {
        const __m256 scale = _mm256_set1_ps(p.scales[(n0 + r * stride) * groups + g]);
        for (int i = 0; i < MT; ++i) total[i][r] = _mm256_fmadd_ps(acc[i][r], scale, total[i][r]);
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
      const float sum = hsum(acc[i][r]);
      p.y[(m0 + i) * p.n + n] = (kQuant ? sum * scale : sum) + bias;
    }
  }
}

// Decompression (prefill), 8 columns (one meta byte, 4 values) at a time, by table: for each meta byte, which
// value lane (0..3) lands in each output column, lane 4 (zero) for the dropped columns. fp32 uses vpermps on
// 32-bit lanes, bf16 pshufb on bytes (0x80 writes a zero byte).
struct SpreadLut {
  alignas(32) int32_t lane[256][8];
  alignas(16) uint8_t byte[256][16];
};

constexpr SpreadLut make_spread() {
  SpreadLut t{};
  for (int b = 0; b < 256; ++b)
    for (int c = 0; c < 8; ++c) {
      const int g = c / 4, nib = (b >> (4 * g)) & 15, i0 = nib & 3, i1 = nib >> 2;
      const int lane = c % 4 == i0 ? 2 * g : c % 4 == i1 ? 2 * g + 1 : 4;
      t.lane[b][c] = lane;
      t.byte[b][2 * c] = static_cast<uint8_t>(lane < 4 ? 2 * lane : 0x80);
      t.byte[b][2 * c + 1] = static_cast<uint8_t>(lane < 4 ? 2 * lane + 1 : 0x80);
    }
  return t;
}

constexpr SpreadLut kSpread = make_spread();

void decompress_f32(const float* values, const uint8_t* meta, float* dense, int64_t rows, int64_t k) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* v = values + r * (k / 2);
    const uint8_t* mt = meta + r * (k / 8);
    float* out = dense + r * k;
    for (int64_t b = 0; b < k / 8; ++b) {
      const __m256 four = _mm256_insertf128_ps(_mm256_setzero_ps(), _mm_loadu_ps(v + 4 * b), 0);
      const __m256i sel = _mm256_load_si256(reinterpret_cast<const __m256i*>(kSpread.lane[mt[b]]));
      _mm256_storeu_ps(out + 8 * b, _mm256_permutevar8x32_ps(four, sel));
    }
  }
}

void decompress_bf16(const uint16_t* values, const uint8_t* meta, uint16_t* dense, int64_t rows, int64_t k) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* v = values + r * (k / 2);
    const uint8_t* mt = meta + r * (k / 8);
    uint16_t* out = dense + r * k;
    for (int64_t b = 0; b < k / 8; ++b) {
      const __m128i four = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(v + 4 * b));
      const __m128i sel = _mm_load_si128(reinterpret_cast<const __m128i*>(kSpread.byte[mt[b]]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 8 * b), _mm_shuffle_epi8(four, sel));
    }
  }
}

template <Cpu24Values V>
struct Kernel {
  // int4 may hold a second set of accumulators (grouped scales): half the weight rows per tile.
  static constexpr bool kInt4 = V == Cpu24Values::int4;
  static constexpr int kMaxMT = 2;  // rows of x per tile (the tile's weight rows are reread from cache for each)
  // weight rows per tile: kMaxMT * kRows accumulators (int4: and as many totals) + 4 regrouped x of the 16 ymm
  static constexpr int kRows = kInt4 ? 2 : 4;
  static constexpr int kWideRows = kInt4 ? 4 : 8, kWideMaxM = 1;
  static constexpr int kXElemBytes = 4;
  template <int MT, int R>
  static void tile(const Cpu24Problem& p, int64_t n0, int64_t m0, int64_t stride) {
    ::tile<V, MT, R>(p, n0, m0, stride);
  }
};

#include "cpu24_rows.h"

struct Vec {
  using T = __m256;
  static constexpr int kLanes = 8, kVecs = 2, kRows = 6;  // 12 accumulators of the 16 ymm
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T set1(float f) { return _mm256_set1_ps(f); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
};

#include "cpu24_gemm.h"

}  // namespace

void sr_cpu24_gemm_avx2(const Cpu24Gemm& g) { gemm_rows<Vec>(g); }
int64_t sr_cpu24_gemm_block_avx2() { return Vec::kLanes * Vec::kVecs; }

void sr_cpu24_avx2(const Cpu24Problem& p, int64_t row0, int64_t row1) {
  switch (p.kind) {
    case Cpu24Values::f32: return schedule_rows<Kernel<Cpu24Values::f32>>(p, row0, row1);
    case Cpu24Values::bf16: return schedule_rows<Kernel<Cpu24Values::bf16>>(p, row0, row1);
    case Cpu24Values::int8: return schedule_rows<Kernel<Cpu24Values::int8>>(p, row0, row1);
    case Cpu24Values::int4: return schedule_rows<Kernel<Cpu24Values::int4>>(p, row0, row1);
  }
}

void sr_cpu24_decompress_avx2(const void* values, const uint8_t* meta, void* dense, int64_t rows, int64_t k,
                              int elem_bytes) {
  if (elem_bytes == 4)
    decompress_f32(static_cast<const float*>(values), meta, static_cast<float*>(dense), rows, k);
  else
    decompress_bf16(static_cast<const uint16_t*>(values), meta, static_cast<uint16_t*>(dense), rows, k);
}

float sr_sum_avx2(const float* a, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm256_add_ps(s0, _mm256_loadu_ps(a + i));
    s1 = _mm256_add_ps(s1, _mm256_loadu_ps(a + i + 8));
    s2 = _mm256_add_ps(s2, _mm256_loadu_ps(a + i + 16));
    s3 = _mm256_add_ps(s3, _mm256_loadu_ps(a + i + 24));
  }
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i];
  return hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3))) + tail;
}
