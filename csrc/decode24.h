// The mma.sp decode kernel's launch interface (csrc/decode24.cu), shared with its pybind11 module.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#define SR_DECODE24_WARPS 8      // warps per CTA, each on its own 16 output features
// Most input columns one CTA takes: its x slice lives in shared memory, 16 rows x (1472 + 8 pad) halves = 47,360 B
// at M > 8, under the 48 KB of dynamic shared memory a launch gets without opting in (decode24.cu asserts it).
#define SR_DECODE24_MAX_KS 1472

// Device pointers as the Python side passes them. ws (fp32 [split, M, N]) and counters (int32, one per CTA
// column, zero between launches) are needed only when the grid splits K (split_chunks * 64 < K).
struct Decode24Args {
  const void* vals;
  const void* meta;
  const void* x;
  const void* bias;  // nullptr: no bias
  void* y;
  void* ws;
  void* counters;
  int m, n, k, split_chunks;
};

void sr_decode24(const Decode24Args& args, bool bf16, cudaStream_t stream);

// CTAs per SM that a launch of M rows with this K slice keeps resident on the current device (registers and
// shared memory of the kernel variant M selects, from cudaOccupancyMaxActiveBlocksPerMultiprocessor).
int sr_decode24_ctas_per_sm(int m, int split_chunks, bool bf16);
