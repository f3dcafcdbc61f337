// The mma.sp decode kernel's launch interface (csrc/mmasp.cu), shared with its pybind11 module.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#define SR_MMASP_WARPS 8  // warps per CTA, each on its own 16 output features
// Most input columns one CTA takes: its x slice lives in shared memory, 16 rows x (1472 + 8 pad) halves = 47,360 B
// at M > 8, under the 48 KB of dynamic shared memory a launch gets without opting in (mmasp.cu asserts it).
#define SR_MMASP_MAX_KS 1472

// Device pointers as the Python side passes them. ws (fp32 [split, M, N]) and counters (int32, one per CTA
// column, zero between launches) are needed only when the grid splits K (split_chunks * 64 < K).
struct MmaspArgs {
  const void* vals;
  const void* meta;
  const void* x;
  const void* bias;  // nullptr: no bias
  void* y;
  void* ws;
  void* counters;
  int m, n, k, split_chunks;
};

void sr_mmasp(const MmaspArgs& args, bool bf16, cudaStream_t stream);

// CTAs per SM that a launch of M rows with this K slice keeps resident on the current device (registers and
// shared memory of the kernel variant M selects, from cudaOccupancyMaxActiveBlocksPerMultiprocessor).
int sr_mmasp_ctas_per_sm(int m, int split_chunks, bool bf16);
