// Raw-pointer CPU kernels of sparse_runtime._cpu24: y = x @ W^T + b with W in the canonical 2:4 format
// (sparse_runtime/format.py): values [N, K/2], meta [N, K/8] uint8, 2 bits per kept value.
//
// Each ISA lives in its own translation unit compiled with its own -m flags (cpu24_scalar.cpp, cpu24_avx2.cpp,
// cpu24_avx512.cpp, cpu24_avx512bf16.cpp). Those TUs include no torch (or other library) headers and keep everything but the entry
// points below in an anonymous namespace: an inline function instantiated there with AVX-512 code must never be
// the copy the linker keeps for the other TUs. cpu24_ext.cpp picks the entry points at run time.
#pragma once

#include <cstdint>

struct Cpu24Problem {
  const float* x;         // [M, K] fp32, contiguous (bf16 inputs are widened once by the caller)
  const uint16_t* x16;    // [M, K] bf16 as raw uint16 when bf16 is set (the avx512bf16 kernel reads x as is)
  const void* values;     // [N, K/2] fp32, or bf16 as raw uint16 when bf16 is set
  const uint8_t* meta;    // [N, K/8]
  const float* bias;      // [N] fp32, or nullptr
  float* y;               // [M, N] fp32, contiguous
  int64_t m, n, k;        // K % 8 == 0
  bool bf16;
};

// Output rows [row0, row1) for every row of x; values and meta are read once per call.
void sr_cpu24_scalar(const Cpu24Problem& p, int64_t row0, int64_t row1);
void sr_cpu24_avx2(const Cpu24Problem& p, int64_t row0, int64_t row1);
void sr_cpu24_avx512(const Cpu24Problem& p, int64_t row0, int64_t row1);
void sr_cpu24_avx512bf16(const Cpu24Problem& p, int64_t row0, int64_t row1);  // fp32 weights: sr_cpu24_avx512

// Sum of a[0..n): a streaming read, for measuring the machine's read bandwidth.
float sr_sum_scalar(const float* a, int64_t n);
float sr_sum_avx2(const float* a, int64_t n);
float sr_sum_avx512(const float* a, int64_t n);

// `rows` rows of W (values/meta pointing at the first) to dense [rows, K] (elem_bytes 4: fp32, 2: bf16), for the
// prefill GEMM.
void sr_cpu24_decompress_scalar(const void* values, const uint8_t* meta, void* dense, int64_t rows, int64_t k,
                                int elem_bytes);
void sr_cpu24_decompress_avx2(const void* values, const uint8_t* meta, void* dense, int64_t rows, int64_t k,
                              int elem_bytes);
void sr_cpu24_decompress_avx512(const void* values, const uint8_t* meta, void* dense, int64_t rows, int64_t k,
                                int elem_bytes);
