// Canonical 2:4 (values [N, K/2] + meta [N, ceil(K/8)] uint8) -> dense row-major [N, K] on the device,
// so cuSPARSELt can compress it without a round trip through the host or a chain of torch ops.
#include <cuda_runtime.h>
#include <cstdint>

#include "sr_common.h"

namespace {

// One thread per group of 4 columns. Elements are moved as raw bits, so one kernel serves every dtype of a size.
template <typename T>
__global__ void expand24_kernel(const T* __restrict__ values, const uint8_t* __restrict__ meta, T* __restrict__ out,
                                int64_t rows, int64_t k) {
  const int64_t groups = k / 4;
  const int64_t meta_cols = (k + 7) / 8;
  const int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (g >= rows * groups) return;
  const int64_t r = g / groups, c = g % groups;
  const uint8_t byte = meta[r * meta_cols + c / 2];
  const uint8_t nib = (c % 2) ? (byte >> 4) : (byte & 0xF);
  const int i0 = nib & 0x3, i1 = (nib >> 2) & 0x3;
  T group[4] = {T(0), T(0), T(0), T(0)};
  group[i0] = values[r * (k / 2) + 2 * c];
  group[i1] = values[r * (k / 2) + 2 * c + 1];
  T* dst = out + r * k + 4 * c;
#pragma unroll
  for (int j = 0; j < 4; ++j) dst[j] = group[j];
}

template <typename T>
void launch(const void* values, const void* meta, void* out, int64_t rows, int64_t k, cudaStream_t stream) {
  const int64_t total = rows * (k / 4);
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  expand24_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      static_cast<const T*>(values), static_cast<const uint8_t*>(meta), static_cast<T*>(out), rows, k);
}

}  // namespace

void sr_expand24(const void* values, const void* meta, void* out, int64_t rows, int64_t k, int elem_bytes,
                 cudaStream_t stream) {
  if (rows <= 0 || k <= 0) return;
  switch (elem_bytes) {
    case 1: launch<uint8_t>(values, meta, out, rows, k, stream); break;
    case 2: launch<uint16_t>(values, meta, out, rows, k, stream); break;
    case 4: launch<uint32_t>(values, meta, out, rows, k, stream); break;
    default: throw_error("expand24: unsupported element size " + std::to_string(elem_bytes));
  }
  sr_check_cuda(cudaGetLastError(), "expand24 kernel launch");
}
