// Raw-pointer CPU kernels of sparse_runtime._cpu24: y = x @ W^T + b with W in the canonical 2:4 format
// (sparse_runtime/format/codec.py): values [N, K/2] (or quantized codes, see Cpu24Values), meta [N, K/8] uint8,
// 2 bits per kept value.
//
// Each ISA lives in its own translation unit compiled with its own -m flags (cpu24_scalar.cpp, cpu24_avx2.cpp,
// cpu24_avx512.cpp, cpu24_avx512bf16.cpp). Those TUs include no torch (or other library) headers and keep everything but the entry
// points below in an anonymous namespace: an inline function instantiated there with AVX-512 code must never be
// the copy the linker keeps for the other TUs. cpu24_ext.cpp picks the entry points at run time.
#pragma once

#include <cstdint>

// What `values` holds. Quantized codes (docs/format.md) come with fp32 scales: W = code * scale.
enum class Cpu24Values : uint8_t {
  f32,   // [N, K/2] fp32
  bf16,  // [N, K/2] bf16 as raw uint16
  int8,  // [N, K/2] int8 codes
  int4,  // [N, K/4] uint8, two codes per byte: kept value 2i in the low nibble of byte i, each stored as code + 8
};

// static: each TU keeps its own copy (see above)
static constexpr bool cpu24_quantized(Cpu24Values v) { return v == Cpu24Values::int8 || v == Cpu24Values::int4; }

// Bits of one stored kept value.
static constexpr int cpu24_value_bits(Cpu24Values v) {
  return v == Cpu24Values::f32 ? 32 : v == Cpu24Values::bf16 ? 16 : v == Cpu24Values::int8 ? 8 : 4;
}

// How far ahead the streaming kernels prefetch each weight row's values and meta (the next rows follow in memory):
// at decode a thread runs 2R streams that the hardware prefetchers serve too late, so a cold weight read is
// latency-bound. Measured on Zen 5 (int8, fp32, bf16; cold, M = 1): 1 KiB ahead beat 512 B and 2 KiB.
constexpr int kCpu24ValueAhead = 1024, kCpu24MetaAhead = 256;

// step(s) for s in [s0, s1) of R weight rows (values from kept value vrow[r], meta from meta[r]), each step reading
// kPerStep kept values and their kPerStep / 4 meta bytes per row; both streams of each row are prefetched once per
// cache line of its values (more would cost issue slots when the weight is already cached), and once for a run of
// steps shorter than a line (int4's groups).
template <Cpu24Values V, int R, int kPerStep, class Step>
static inline void cpu24_steps(const void* values, const int64_t* vrow, const uint8_t* const* meta, int64_t s0,
                               int64_t s1, const Step& step) {
  constexpr int kStepBytes = kPerStep * cpu24_value_bits(V) / 8;
  constexpr int64_t kEvery = kStepBytes >= 64 ? 1 : 64 / kStepBytes;
  // The prefetches are written out here, not in a helper: GCC deems a function of nothing but prefetches free of
  // side effects and deletes its calls (GCC 12, -O1 and up).
  for (int64_t s = s0; s < s1;) {
    for (int r = 0; r < R; ++r) {
      __builtin_prefetch(meta[r] + kPerStep / 4 * s + kCpu24MetaAhead);
      __builtin_prefetch(static_cast<const char*>(values) + (vrow[r] + kPerStep * s) * cpu24_value_bits(V) / 8 +
                         kCpu24ValueAhead);
    }
    const int64_t end = s + kEvery < s1 ? s + kEvery : s1;
#pragma GCC unroll 1  // unrolled, the steps' code outgrows the op cache
    for (; s < end; ++s) step(s);
  }
}

// Grouped scales (group < K): the SIMD kernels need groups of a multiple of this many dense columns (whole
// AVX-512 steps); the caller runs other groups on the scalar kernel.
constexpr int64_t kCpu24SimdGroup = 32;

struct Cpu24Problem {
  const float* x;         // [M, K] fp32, contiguous (bf16 inputs are widened once by the caller)
  const uint16_t* x16;    // [M, K] bf16 as raw uint16 for bf16 values (the avx512bf16 kernel reads x as is)
  const void* values;     // see Cpu24Values
  const uint8_t* meta;    // [N, K/8]
  const float* bias;      // [N] fp32, or nullptr
  float* y;               // [M, N] fp32, contiguous
  int64_t m, n, k;        // K % 8 == 0
  Cpu24Values kind;
  const float* scales;    // quantized: [N, K / group] fp32 (bf16 scales are widened by the caller); else nullptr
  int64_t group;          // dense columns per scale, a multiple of 8 dividing K (K: one scale per row)
};

// Output rows [row0, row1) for every row of x; values and meta are read once per call.
void sr_cpu24_scalar(const Cpu24Problem& p, int64_t row0, int64_t row1);
void sr_cpu24_avx2(const Cpu24Problem& p, int64_t row0, int64_t row1);
void sr_cpu24_avx512(const Cpu24Problem& p, int64_t row0, int64_t row1);
void sr_cpu24_avx512bf16(const Cpu24Problem& p, int64_t row0, int64_t row1);  // others: sr_cpu24_avx512

// The sparse GEMM of prefill (cpu24_gemm.h): weight rows [0, rows) of a chunk against all of x, packed.
constexpr int64_t kCpu24GemmKc = 64;  // columns of K per slice: 64 x 64 fp32 of packed x = 16 KiB, half an L1
struct Cpu24Gemm {
  const float* xp;       // x packed: [ceil(M / block)][K][block] fp32, rows past M zero (block: sr_cpu24_gemm_block_*)
  const float* values;   // [rows, K/2] fp32 kept values (other kinds widened or dequantized by the caller)
  const uint8_t* meta;   // [rows, K/8]
  const float* bias;     // [rows] or nullptr
  float* y;              // y[i * ldy + r] for row i of x, weight row r
  float* work;           // ceil(M / block) * block * rows floats
  float* vpack;          // rows * kCpu24GemmKc / 2 floats: a slice of the values, packed tile by tile
  uint8_t* mpack;        // rows * kCpu24GemmKc / 8 bytes: its meta
  int64_t m, k, rows, ldy;
};

void sr_cpu24_gemm_scalar(const Cpu24Gemm& g);
void sr_cpu24_gemm_avx2(const Cpu24Gemm& g);
void sr_cpu24_gemm_avx512(const Cpu24Gemm& g);
// Rows of x per packed block of each ISA's GEMM.
int64_t sr_cpu24_gemm_block_scalar();
int64_t sr_cpu24_gemm_block_avx2();
int64_t sr_cpu24_gemm_block_avx512();

// Sum of a[0..n): a streaming read, for measuring the machine's read bandwidth.
float sr_sum_scalar(const float* a, int64_t n);
float sr_sum_avx2(const float* a, int64_t n);
float sr_sum_avx512(const float* a, int64_t n);

// Rows [row0, row1) of quantized values (p.values, p.scales) as float values [row1 - row0, K/2], the layout the
// decompression below reads: fp32 (elem_bytes 4) or bf16 (2; code * scale rounded to nearest even, as torch
// rounds the dequantized weight). bf16 values (no scales) widen to fp32 (elem_bytes 4 only).
void sr_cpu24_dequantize(const Cpu24Problem& p, int64_t row0, int64_t row1, void* out, int elem_bytes);

// `rows` rows of W (values/meta pointing at the first) to dense [rows, K] (elem_bytes 4: fp32, 2: bf16), for the
// prefill GEMM.
void sr_cpu24_decompress_scalar(const void* values, const uint8_t* meta, void* dense, int64_t rows, int64_t k,
                                int elem_bytes);
void sr_cpu24_decompress_avx2(const void* values, const uint8_t* meta, void* dense, int64_t rows, int64_t k,
                              int elem_bytes);
void sr_cpu24_decompress_avx512(const void* values, const uint8_t* meta, void* dense, int64_t rows, int64_t k,
                                int elem_bytes);
