// Portable 2:4 kernels (no SIMD intrinsics): the fallback ISA, the reference the SIMD paths are tested against,
// the kernel of int4 groups the SIMD kernels do not take (see kCpu24SimdGroup), and the panel decompression
// and dequantization of the prefill path. No torch headers (see cpu24.h).
#include <cstring>

#include "cpu24.h"

namespace {

constexpr int kMaxM = 8;  // rows of x per pass over a weight row; the pass rereads the row from cache

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <Cpu24Values V>
inline float value_at(const void* values, int64_t i) {
  if constexpr (V == Cpu24Values::bf16) return bf16_to_float(static_cast<const uint16_t*>(values)[i]);
  else if constexpr (V == Cpu24Values::f32) return static_cast<const float*>(values)[i];
  else if constexpr (V == Cpu24Values::int8) return static_cast<const int8_t*>(values)[i];
  else {
    const unsigned byte = static_cast<const uint8_t*>(values)[i >> 1];
    return static_cast<float>(static_cast<int>(i & 1 ? byte >> 4 : byte & 15) - 8);
  }
}

// Quantized: the codes of each group of p.group columns accumulate on their own, then scaled into the row's sum.
template <Cpu24Values V>
void rows_scalar(const Cpu24Problem& p, int64_t row0, int64_t row1) {
  constexpr bool kQuant = cpu24_quantized(V);
  const int64_t k = p.k, nvals = k / 2, nbytes = k / 8;
  const int64_t group_bytes = kQuant ? p.group / 8 : nbytes, groups = nbytes / group_bytes;
  for (int64_t n = row0; n < row1; ++n) {
    const uint8_t* meta = p.meta + n * nbytes;
    const int64_t vbase = n * nvals;
    for (int64_t m0 = 0; m0 < p.m; m0 += kMaxM) {
      const int64_t mt = p.m - m0 < kMaxM ? p.m - m0 : kMaxM;
      float acc[kMaxM] = {};
      const float* x = p.x + m0 * k;
      for (int64_t g = 0; g < groups; ++g) {
        float gacc[kMaxM] = {};
        for (int64_t b = g * group_bytes; b < (g + 1) * group_bytes; ++b) {
          const unsigned byte = meta[b];
          for (int t = 0; t < 4; ++t) {
            // value 4b+t sits in group 2b + t/2, i.e. columns 8b + 4*(t/2) .. +3; its 2-bit index picks one
            const int64_t col = 8 * b + 4 * (t >> 1) + ((byte >> (2 * t)) & 3);
            const float v = value_at<V>(p.values, vbase + 4 * b + t);
            for (int64_t i = 0; i < mt; ++i) gacc[i] += v * x[i * k + col];
          }
        }
        const float scale = kQuant ? p.scales[n * groups + g] : 1.0f;
        for (int64_t i = 0; i < mt; ++i) acc[i] += kQuant ? gacc[i] * scale : gacc[i];
      }
      const float bias = p.bias ? p.bias[n] : 0.0f;
      for (int64_t i = 0; i < mt; ++i) p.y[(m0 + i) * p.n + n] = acc[i] + bias;
    }
  }
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even (finite inputs)
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// bf16 values are widened (they have no scales), codes multiplied by their scales.
template <Cpu24Values V, typename T>
void dequantize_rows(const Cpu24Problem& p, int64_t row0, int64_t row1, T* out) {
  constexpr bool kQuant = cpu24_quantized(V);
  const int64_t nvals = p.k / 2, per_group = p.group / 2, groups = p.k / p.group;
  for (int64_t n = row0; n < row1; ++n) {
    T* o = out + (n - row0) * nvals;
    for (int64_t j = 0; j < nvals; ++j) {
      const float v = value_at<V>(p.values, n * nvals + j) * (kQuant ? p.scales[n * groups + j / per_group] : 1.0f);
      if constexpr (sizeof(T) == 4) o[j] = v;
      else o[j] = float_to_bf16(v);
    }
  }
}

template <typename T>
void decompress_rows(const T* values, const uint8_t* meta, T* dense, int64_t rows, int64_t k) {
  const int64_t nvals = k / 2, nbytes = k / 8;
  for (int64_t r = 0; r < rows; ++r) {
    T* out = dense + r * k;
    std::memset(out, 0, sizeof(T) * k);
    const T* v = values + r * nvals;
    const uint8_t* mt = meta + r * nbytes;
    for (int64_t b = 0; b < nbytes; ++b) {
      const unsigned byte = mt[b];
      for (int t = 0; t < 4; ++t) out[8 * b + 4 * (t >> 1) + ((byte >> (2 * t)) & 3)] = v[4 * b + t];
    }
  }
}

struct Vec {
  using T = float;
  static constexpr int kLanes = 1, kVecs = 4, kRows = 4;
  static T zero() { return 0.0f; }
  static T load(const float* p) { return *p; }
  static void store(float* p, T v) { *p = v; }
  static T set1(float f) { return f; }
  static T fma(T a, T b, T c) { return a * b + c; }
};

#include "cpu24_gemm.h"

}  // namespace

void sr_cpu24_gemm_scalar(const Cpu24Gemm& g) { gemm_rows<Vec>(g); }
int64_t sr_cpu24_gemm_block_scalar() { return Vec::kLanes * Vec::kVecs; }

void sr_cpu24_scalar(const Cpu24Problem& p, int64_t row0, int64_t row1) {
  switch (p.kind) {
    case Cpu24Values::f32: return rows_scalar<Cpu24Values::f32>(p, row0, row1);
    case Cpu24Values::bf16: return rows_scalar<Cpu24Values::bf16>(p, row0, row1);
    case Cpu24Values::int8: return rows_scalar<Cpu24Values::int8>(p, row0, row1);
    case Cpu24Values::int4: return rows_scalar<Cpu24Values::int4>(p, row0, row1);
  }
}

void sr_cpu24_dequantize(const Cpu24Problem& p, int64_t row0, int64_t row1, void* out, int elem_bytes) {
  const bool int8 = p.kind == Cpu24Values::int8;
  if (elem_bytes == 4) {
    auto* o = static_cast<float*>(out);
    if (p.kind == Cpu24Values::bf16) dequantize_rows<Cpu24Values::bf16>(p, row0, row1, o);
    else if (int8) dequantize_rows<Cpu24Values::int8>(p, row0, row1, o);
    else dequantize_rows<Cpu24Values::int4>(p, row0, row1, o);
  } else {
    auto* o = static_cast<uint16_t*>(out);
    if (int8) dequantize_rows<Cpu24Values::int8>(p, row0, row1, o);
    else dequantize_rows<Cpu24Values::int4>(p, row0, row1, o);
  }
}

float sr_sum_scalar(const float* a, int64_t n) {
  // Independent partial sums, so the loop is not bound by one add's latency.
  float s[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += a[i + j];
  for (; i < n; ++i) s[0] += a[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

void sr_cpu24_decompress_scalar(const void* values, const uint8_t* meta, void* dense, int64_t rows, int64_t k,
                                int elem_bytes) {
  if (elem_bytes == 4)
    decompress_rows(static_cast<const float*>(values), meta, static_cast<float*>(dense), rows, k);
  else
    decompress_rows(static_cast<const uint16_t*>(values), meta, static_cast<uint16_t*>(dense), rows, k);
}
