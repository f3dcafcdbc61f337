// Shared by the pybind11 module and the CUDA kernels: error helpers that name the failing call.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include <stdexcept>
#include <string>

[[noreturn]] inline void throw_error(const std::string& msg) { throw std::runtime_error(msg); }

inline void sr_check_cuda(cudaError_t err, const char* call) {
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // reset a non-sticky error so the next call starts clean
    throw_error(std::string(call) + " failed: " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }
}

void sr_expand24(const void* values, const void* meta, void* out, int64_t rows, int64_t k, int elem_bytes,
                 cudaStream_t stream);
