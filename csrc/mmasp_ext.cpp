// sparse_runtime._mmasp: the pybind11 layer over the mma.sp decode kernel (csrc/mmasp.cu).
//
// As in sparse_runtime._C, tensors cross as device pointers (Python ints) and the stream as an int, so the
// module builds against any torch and imports without a GPU; the first launch on a machine without one raises
// RuntimeError naming the failing call.
#include <pybind11/pybind11.h>

#include <string>

#include "mmasp.h"
#include "sr_common.h"

namespace py = pybind11;

namespace {

bool is_bf16(const std::string& dtype) {
  if (dtype != "float16" && dtype != "bfloat16") throw_error("mmasp takes float16 or bfloat16, got " + dtype);
  return dtype == "bfloat16";
}

// Runs fn with `device` current, restoring the caller's device after.
template <typename F>
auto on_device(int device, F fn) {
  int current = 0;
  sr_check_cuda(cudaGetDevice(&current), "cudaGetDevice");
  if (current != device) sr_check_cuda(cudaSetDevice(device), "cudaSetDevice");
  struct Restore {
    int current, device;
    ~Restore() { if (current != device) cudaSetDevice(current); }
  } restore{current, device};
  return fn();
}

void linear(int device, uintptr_t vals, uintptr_t meta, uintptr_t x, uintptr_t bias, uintptr_t y, uintptr_t ws,
            uintptr_t counters, int m, int n, int k, int split_chunks, const std::string& dtype, uintptr_t stream) {
  const bool bf16 = is_bf16(dtype);
  const MmaspArgs args{reinterpret_cast<const void*>(vals), reinterpret_cast<const void*>(meta),
                       reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(bias),
                       reinterpret_cast<void*>(y), reinterpret_cast<void*>(ws), reinterpret_cast<void*>(counters),
                       m, n, k, split_chunks};
  on_device(device, [&] { sr_mmasp(args, bf16, reinterpret_cast<cudaStream_t>(stream)); });
}

int ctas_per_sm(int device, int m, int split_chunks, const std::string& dtype) {
  const bool bf16 = is_bf16(dtype);
  return on_device(device, [&] { return sr_mmasp_ctas_per_sm(m, split_chunks, bf16); });
}

}  // namespace

PYBIND11_MODULE(_mmasp, m) {
  m.doc() = "2:4 decode GEMM on the sparse tensor cores (mma.sp), pointers and streams as Python ints";
  m.attr("warps") = SR_MMASP_WARPS;
  m.attr("max_split_columns") = SR_MMASP_MAX_KS;
  m.def("linear", &linear, py::arg("device"), py::arg("vals"), py::arg("meta"), py::arg("x"), py::arg("bias"),
        py::arg("y"), py::arg("ws"), py::arg("counters"), py::arg("m"), py::arg("n"), py::arg("k"),
        py::arg("split_chunks"), py::arg("dtype"), py::arg("stream"),
        "y[M, N] = x[M, K] @ W^T (+ bias) from the mma.sp fragment layout (sparse_runtime/ops/mmasp_layout.py)");
  m.def("ctas_per_sm", &ctas_per_sm, py::arg("device"), py::arg("m"), py::arg("split_chunks"), py::arg("dtype"),
        "CTAs per SM a launch of M rows with split_chunks 64-column chunks per CTA keeps resident on the device "
        "(cudaOccupancyMaxActiveBlocksPerMultiprocessor of the kernel variant M selects)");
}
