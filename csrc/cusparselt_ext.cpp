// sparse_runtime._C: a thin pybind11 layer over cuSPARSELt.
//
// Tensors cross the boundary as device pointers (Python ints) plus shapes and dtype names, and the CUDA
// stream as an int, so this module never touches torch's C++ ABI and builds against any torch (even the CPU
// one). Nothing here calls CUDA at import: a machine without a GPU can import it and gets a RuntimeError
// naming the failing call on first use.
//
// Layout (what torch._cslt_sparse_mm uses for F.linear): y[M, N] = x[M, K] @ W[N, K]^T is computed as
// D = A * op(B) with A = W (structured, row-major N x K), B = x described row-major M x K with op = T, and
// D = y^T, column-major N x M (ld N), which is y row-major. Bias is per row of D, i.e. per output feature.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>
#include <cusparseLt.h>

#include <map>
#include <memory>
#include <string>
#include <tuple>

#include "cslt_version.h"
#include "sr_common.h"

namespace py = pybind11;

namespace {

void check_cslt(cusparseStatus_t status, const char* call) {
  if (status != CUSPARSE_STATUS_SUCCESS) {
    throw_error(std::string(call) + " failed: " + cusparseLtGetErrorName(status) + " (" +
                cusparseLtGetErrorString(status) + ")");
  }
}
#define CSLT(fn, ...) check_cslt(fn(__VA_ARGS__), #fn)
#define CUDA(fn, ...) sr_check_cuda(fn(__VA_ARGS__), #fn)

template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }
cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// Sets the current device for the scope; a no-op when it already is (the matmul hot path).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    CUDA(cudaGetDevice, &prev_);
    if (prev_ != device) CUDA(cudaSetDevice, device);
    changed_ = prev_ != device;
  }
  ~DeviceGuard() { if (changed_) cudaSetDevice(prev_); }
 private:
  int prev_ = 0;
  bool changed_ = false;
};

struct DType {
  cudaDataType type;
  int bytes;
  int align;  // cuSPARSELt needs rows/cols of the structured matrix to be multiples of this
};

DType parse_dtype(const std::string& name) {
  if (name == "float16") return {CUDA_R_16F, 2, 16};
  if (name == "bfloat16") return {CUDA_R_16BF, 2, 16};
  if (name == "int8") return {CUDA_R_8I, 1, 32};
  throw_error("unsupported dtype '" + name + "' (cuSPARSELt path takes float16, bfloat16, int8)");
}

cusparseComputeType compute_type(const DType& in) {
  if (in.type == CUDA_R_8I) return CUSPARSE_COMPUTE_32I;
#if SR_CSLT_AT_LEAST(0, 5, 2)
  return CUSPARSE_COMPUTE_32F;  // fp32 accumulation, as cuBLAS does for F.linear
#else
  return CUSPARSE_COMPUTE_16F;  // before 0.5.2 this name meant "at least 16-bit", with fp32 accumulation
#endif
}

// One handle per device, created on first use. Never destroyed: at interpreter exit the CUDA context may
// already be gone, and cusparseLtDestroy would then fail or crash.
cusparseLtHandle_t* get_handle(int device) {
  static std::map<int, std::unique_ptr<cusparseLtHandle_t>> handles;
  auto it = handles.find(device);
  if (it != handles.end()) return it->second.get();
  int count = 0;
  CUDA(cudaGetDeviceCount, &count);
  if (device < 0 || device >= count) {
    throw_error("cuda device " + std::to_string(device) + " does not exist (" + std::to_string(count) + " visible)");
  }
  DeviceGuard guard(device);
  auto h = std::make_unique<cusparseLtHandle_t>();
  CSLT(cusparseLtInit, h.get());
  return (handles[device] = std::move(h)).get();
}

// The structured (weight) descriptor, shared by compression and matmul: row-major N x K.
struct SparseDesc {
  cusparseLtHandle_t* handle;
  cusparseLtMatDescriptor_t desc;
  SparseDesc(int device, int64_t n, int64_t k, const DType& dt) : handle(get_handle(device)) {
    if (n % dt.align || k % dt.align) {
      throw_error("cuSPARSELt needs the weight's rows and columns to be multiples of " + std::to_string(dt.align) +
                  ", got " + std::to_string(n) + " x " + std::to_string(k) + " (pad before calling)");
    }
    CSLT(cusparseLtStructuredDescriptorInit, handle, &desc, n, k, k, 16, dt.type, CUSPARSE_ORDER_ROW,
         CUSPARSELT_SPARSITY_50_PERCENT);
  }
  ~SparseDesc() { cusparseLtMatDescriptorDestroy(&desc); }
};

py::tuple compressed_size(int device, int64_t n, int64_t k, const std::string& dtype) {
  DeviceGuard guard(device);
  SparseDesc a(device, n, k, parse_dtype(dtype));
  size_t size = 0, buffer = 0;
  CSLT(cusparseLtSpMMACompressedSize2, a.handle, &a.desc, &size, &buffer);
  return py::make_tuple(size, buffer);
}

void compress(int device, int64_t n, int64_t k, const std::string& dtype, uintptr_t dense, uintptr_t out,
              uintptr_t buffer, uintptr_t stream) {
  DeviceGuard guard(device);
  SparseDesc a(device, n, k, parse_dtype(dtype));
  CSLT(cusparseLtSpMMACompress2, a.handle, &a.desc, 1, CUSPARSE_OPERATION_NON_TRANSPOSE, ptr<const void>(dense),
       ptr<void>(out), ptr<void>(buffer), as_stream(stream));
}

void expand24(int device, uintptr_t values, uintptr_t meta, uintptr_t out, int64_t rows, int64_t k, int elem_bytes,
              uintptr_t stream) {
  DeviceGuard guard(device);
  if (k % 4) throw_error("expand24: in_features must be a multiple of 4, got " + std::to_string(k));
  sr_expand24(ptr<const void>(values), ptr<const void>(meta), ptr<void>(out), rows, k, elem_bytes,
              as_stream(stream));
}

// Everything cusparseLtMatmul needs for one (M, N, K, dtype, bias pointer, algorithm): built once, reused.
// The output has the input's dtype; alpha is 1 and beta 0 (D = A * op(B) + bias).
class Plan {
 public:
  Plan(int device, int64_t m, int64_t n, int64_t k, const std::string& dtype, uintptr_t bias, int alg_id,
       int split_k)
      : device_(device), m_(m), n_(n), k_(k), bias_(bias) {
    try {
      init(dtype, alg_id, split_k);
    } catch (...) {
      release();  // a throwing constructor gets no destructor call
      throw;
    }
  }

  ~Plan() { release(); }

  void matmul(uintptr_t a, uintptr_t b, uintptr_t d, uintptr_t workspace, uintptr_t stream) {
    DeviceGuard guard(device_);
    cudaStream_t s = as_stream(stream);
    CSLT(cusparseLtMatmul, handle_, &plan_, &kAlpha, ptr<const void>(a), ptr<const void>(b), &kBeta,
         ptr<const void>(d), ptr<void>(d), ptr<void>(workspace), &s, 1);
  }

  // cuSPARSELt's own search: runs every configuration, keeps the fastest in this plan.
  py::tuple search(uintptr_t a, uintptr_t b, uintptr_t d, uintptr_t workspace, uintptr_t stream) {
    DeviceGuard guard(device_);
    cudaStream_t s = as_stream(stream);
    CSLT(cusparseLtMatmulSearch, handle_, &plan_, &kAlpha, ptr<const void>(a), ptr<const void>(b), &kBeta,
         ptr<const void>(d), ptr<void>(d), ptr<void>(workspace), &s, 1);
    return py::make_tuple(alg_attr(CUSPARSELT_MATMUL_ALG_CONFIG_ID), alg_attr(CUSPARSELT_MATMUL_SPLIT_K));
  }

  size_t workspace_size() const { return workspace_; }
  int max_alg_id() { return alg_attr(CUSPARSELT_MATMUL_ALG_CONFIG_MAX_ID); }

 private:
  static constexpr float kAlpha = 1.0f, kBeta = 0.0f;

  void init(const std::string& dtype, int alg_id, int split_k) {
    DeviceGuard guard(device_);
    const DType in = parse_dtype(dtype);
    if (m_ <= 0) throw_error("Plan: M must be positive, got " + std::to_string(m_));
    if (m_ % 8 || (in.bytes == 1 && m_ % 16)) {
      throw_error("Plan: M=" + std::to_string(m_) + " must be padded to a multiple of " +
                  std::to_string(in.bytes == 1 ? 16 : 8));
    }
    a_ = std::make_unique<SparseDesc>(device_, n_, k_, in);
    handle_ = a_->handle;
    CSLT(cusparseLtDenseDescriptorInit, handle_, &b_, m_, k_, k_, 16, in.type, CUSPARSE_ORDER_ROW);
    b_init_ = true;
    CSLT(cusparseLtDenseDescriptorInit, handle_, &d_, n_, m_, n_, 16, in.type, CUSPARSE_ORDER_COL);
    d_init_ = true;
    CSLT(cusparseLtMatmulDescriptorInit, handle_, &matmul_, CUSPARSE_OPERATION_NON_TRANSPOSE,
         CUSPARSE_OPERATION_TRANSPOSE, &a_->desc, &b_, &d_, &d_, compute_type(in));
    if (bias_ != 0) {  // the plan copies the pointer at init: plans are cached per bias pointer
      void* p = ptr<void>(bias_);
      CSLT(cusparseLtMatmulDescSetAttribute, handle_, &matmul_, CUSPARSELT_MATMUL_BIAS_POINTER, &p, sizeof(p));
    }
    CSLT(cusparseLtMatmulAlgSelectionInit, handle_, &alg_, &matmul_, CUSPARSELT_MATMUL_ALG_DEFAULT);
    alg_init_ = true;
    if (alg_id >= 0) {
      CSLT(cusparseLtMatmulAlgSetAttribute, handle_, &alg_, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &alg_id, sizeof(alg_id));
    }
    if (split_k > 0) {
      CSLT(cusparseLtMatmulAlgSetAttribute, handle_, &alg_, CUSPARSELT_MATMUL_SPLIT_K, &split_k, sizeof(split_k));
    }
    CSLT(cusparseLtMatmulPlanInit, handle_, &plan_, &matmul_, &alg_);
    plan_init_ = true;
    CSLT(cusparseLtMatmulGetWorkspace, handle_, &plan_, &workspace_);
  }

  void release() {
    if (plan_init_) cusparseLtMatmulPlanDestroy(&plan_);
    if (alg_init_) cusparseLtMatmulAlgSelectionDestroy(&alg_);
    if (d_init_) cusparseLtMatDescriptorDestroy(&d_);
    if (b_init_) cusparseLtMatDescriptorDestroy(&b_);
    plan_init_ = alg_init_ = d_init_ = b_init_ = false;
  }

  int alg_attr(cusparseLtMatmulAlgAttribute_t attr) {
    int value = 0;
    CSLT(cusparseLtMatmulAlgGetAttribute, handle_, &alg_, attr, &value, sizeof(value));
    return value;
  }

  int device_;
  int64_t m_, n_, k_;
  uintptr_t bias_;
  cusparseLtHandle_t* handle_ = nullptr;
  std::unique_ptr<SparseDesc> a_;
  cusparseLtMatDescriptor_t b_{}, d_{};
  cusparseLtMatmulDescriptor_t matmul_{};
  cusparseLtMatmulAlgSelection_t alg_{};
  cusparseLtMatmulPlan_t plan_{};
  bool b_init_ = false, d_init_ = false, alg_init_ = false, plan_init_ = false;
  size_t workspace_ = 0;
};

py::tuple library_version() {
  int major = 0, minor = 0, patch = 0;
  CSLT(cusparseLtGetProperty, MAJOR_VERSION, &major);
  CSLT(cusparseLtGetProperty, MINOR_VERSION, &minor);
  CSLT(cusparseLtGetProperty, PATCH_LEVEL, &patch);
  return py::make_tuple(major, minor, patch);
}

int runtime_version() {
  int v = 0;
  CUDA(cudaRuntimeGetVersion, &v);
  return v;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cuSPARSELt bindings for sparse_runtime: pointers, shapes and streams as Python ints";
  m.attr("header_version") = py::make_tuple(SR_CSLT_MAJOR, SR_CSLT_MINOR, SR_CSLT_PATCH);
  m.attr("cuda_header_version") = CUDART_VERSION;
  m.def("library_version", &library_version, "cuSPARSELt version of the loaded library (major, minor, patch)");
  m.def("runtime_version", &runtime_version, "CUDA runtime version this module runs (statically linked)");
  m.def("compressed_size", &compressed_size, py::arg("device"), py::arg("n"), py::arg("k"), py::arg("dtype"),
        "(compressed bytes, temporary buffer bytes) for an N x K structured weight");
  m.def("compress", &compress, py::arg("device"), py::arg("n"), py::arg("k"), py::arg("dtype"), py::arg("dense"),
        py::arg("out"), py::arg("buffer"), py::arg("stream"));
  m.def("expand24", &expand24, py::arg("device"), py::arg("values"), py::arg("meta"), py::arg("out"),
        py::arg("rows"), py::arg("k"), py::arg("elem_bytes"), py::arg("stream"),
        "Canonical 2:4 values/meta -> dense row-major weight, on the device");
  py::class_<Plan>(m, "Plan")
      .def(py::init<int, int64_t, int64_t, int64_t, const std::string&, uintptr_t, int, int>(),
           py::arg("device"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("dtype"), py::arg("bias") = 0,
           py::arg("alg_id") = -1, py::arg("split_k") = -1)
      .def("matmul", &Plan::matmul, py::arg("a"), py::arg("b"), py::arg("d"), py::arg("workspace"),
           py::arg("stream"))
      .def("search", &Plan::search, py::arg("a"), py::arg("b"), py::arg("d"), py::arg("workspace"),
           py::arg("stream"))
      .def_property_readonly("workspace_size", &Plan::workspace_size)
      .def_property_readonly("max_alg_id", &Plan::max_alg_id);
}
