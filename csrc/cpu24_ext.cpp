// sparse_runtime._cpu24: y = x @ W^T + b on the CPU with W in the canonical 2:4 format, fp32 or bf16.
//
// M <= 16 (decode): the SIMD kernels stream values + meta once (17/32 of the dense fp32 bytes) and rebuild the
// kept x entries in registers; beyond that while x is small (see stream()). Otherwise (prefill): decompress panels
// of W into a dense buffer and run torch's GEMM on each, so prefill costs what dense does plus the decompression.
// Built without -m flags: the ISA kernels are in their own TUs (cpu24.h) and are picked here at run time.
// Threads: torch's pool.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cpu24.h"

namespace {

constexpr int64_t kDecodeMaxM = 16;                   // always streamed (decode)
constexpr int64_t kStreamMaxXBytes = 8 * 1024 * 1024;  // beyond decode, stream while fp32 x fits in an L3 share
constexpr int64_t kRowAlign = 8;                       // thread chunks start on a multiple of the row tiles
constexpr int64_t kMinChunkBytes = 64 * 1024;          // of weights per thread chunk: below, a fork costs more
constexpr int64_t kPanelBytes = 16 * 1024 * 1024;      // dense prefill panel (see prefill)

using Kernel = void (*)(const Cpu24Problem&, int64_t, int64_t);
using SumFn = float (*)(const float*, int64_t);
using DecompressFn = void (*)(const void*, const uint8_t*, void*, int64_t, int64_t, int);

struct Isa {
  const char* name;
  Kernel kernel;
  DecompressFn decompress;
  SumFn sum;
  bool (*runs_here)();
};

bool always() { return true; }

#if defined(SR_CPU24_X86)
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
}

bool has_avx512bf16() { return has_avx512() && __builtin_cpu_supports("avx512bf16"); }

bool has_native_bf16() { return has_avx512bf16(); }  // torch's bf16 GEMM (oneDNN) runs at twice the fp32 rate

const Isa kIsas[] = {{"scalar", sr_cpu24_scalar, sr_cpu24_decompress_scalar, sr_sum_scalar, always},
                     {"avx2", sr_cpu24_avx2, sr_cpu24_decompress_avx2, sr_sum_avx2, has_avx2},
                     {"avx512", sr_cpu24_avx512, sr_cpu24_decompress_avx512, sr_sum_avx512, has_avx512},
                     // bf16 weights: x stays bf16, vdpbf16ps; fp32 weights: the avx512 kernel
                     {"avx512bf16", sr_cpu24_avx512bf16, sr_cpu24_decompress_avx512, sr_sum_avx512, has_avx512bf16}};
#else
bool has_native_bf16() { return false; }

const Isa kIsas[] = {{"scalar", sr_cpu24_scalar, sr_cpu24_decompress_scalar, sr_sum_scalar, always}};
#endif

std::vector<std::string> isas() {
  std::vector<std::string> out;
  for (const Isa& i : kIsas)
    if (i.runs_here()) out.emplace_back(i.name);
  return out;
}

const Isa& pick(const std::string& name) {
  const Isa* best = nullptr;
  for (const Isa& i : kIsas) {
    if (!i.runs_here()) continue;
    if (name.empty()) best = &i;  // kIsas is ordered worst to best
    else if (name == i.name) return i;
  }
  if (best) return *best;
  std::string have;
  for (const std::string& s : isas()) have += (have.empty() ? "" : ", ") + s;
  TORCH_CHECK_VALUE(false, "cpu24: isa '", name, "' is not built or this CPU cannot run it (available: ", have, ")");
  return kIsas[0];  // unreachable
}

void check_inputs(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                  const std::optional<at::Tensor>& bias) {
  // The Python wrapper gives the friendly errors; these keep a direct call from reading out of bounds.
  for (const at::Tensor* t : {&x, &values, &meta})
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "cpu24: tensors must be contiguous CPU tensors");
  TORCH_CHECK_TYPE(values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16,
                   "cpu24: values must be float32 or bfloat16, got ", values.scalar_type());
  TORCH_CHECK_TYPE(x.scalar_type() == values.scalar_type(), "cpu24: x and values dtypes differ");
  TORCH_CHECK_TYPE(meta.scalar_type() == at::kByte, "cpu24: meta must be uint8");
  TORCH_CHECK_VALUE(x.dim() == 2 && values.dim() == 2 && meta.dim() == 2, "cpu24: x, values, meta must be 2-D");
  const int64_t k = x.size(1), n = values.size(0);
  TORCH_CHECK_VALUE(k > 0 && k % 8 == 0 && values.size(1) * 2 == k && meta.size(0) == n && meta.size(1) * 8 == k,
                    "cpu24: shapes do not match: x ", x.sizes(), ", values ", values.sizes(), ", meta ",
                    meta.sizes(), " (need K > 0, K % 8 == 0, values [N, K/2], meta [N, K/8])");
  if (bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->is_contiguous(), "cpu24: bias must be a contiguous CPU tensor");
    TORCH_CHECK_TYPE(bias->scalar_type() == values.scalar_type(), "cpu24: bias and values dtypes differ");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, "cpu24: bias must be [N]");
  }
}

void decode(const Isa& isa, const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
            const std::optional<at::Tensor>& bias, at::Tensor& y) {
  const bool bf16 = values.scalar_type() == at::kBFloat16;
  // The kernels take fp32 x, bias and y: widening M*K inputs and narrowing M*N outputs is cheap next to N*K.
  const at::Tensor x32 = bf16 ? x.to(at::kFloat) : x;
  const at::Tensor b32 = bias ? (bf16 ? bias->to(at::kFloat) : *bias) : at::Tensor();
  at::Tensor y32 = bf16 || !y.is_contiguous() ? at::empty(y.sizes(), x32.options()) : y;
  const Cpu24Problem p{x32.data_ptr<float>(), bf16 ? static_cast<const uint16_t*>(x.data_ptr()) : nullptr,
                       values.data_ptr(), meta.data_ptr<uint8_t>(),
                       bias ? b32.data_ptr<float>() : nullptr, y32.data_ptr<float>(),
                       x.size(0), values.size(0), x.size(1), bf16};
  const int64_t row_bytes = p.k / 2 * values.element_size() + p.k / 8;
  const int64_t blocks = (p.n + kRowAlign - 1) / kRowAlign;
  const int64_t grain = std::max<int64_t>(1, kMinChunkBytes / (row_bytes * kRowAlign));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    isa.kernel(p, b0 * kRowAlign, std::min(b1 * kRowAlign, p.n));
  });
  if (!y32.is_same(y)) y.copy_(y32);
}

void prefill(const Isa& isa, const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
             const std::optional<at::Tensor>& bias, at::Tensor& y) {
  // Panels one after the other, each decompressed by all threads and multiplied by torch's threaded GEMM. (One
  // panel per thread with a serial GEMM inside parallel_for was measured far slower: the GEMM opens nested
  // thread teams.) 16 MiB panels: few GEMM calls (each re-packs x), L3-resident, and below glibc's mmap
  // threshold, so later calls reuse the block instead of faulting fresh pages in.
  const int64_t n = values.size(0), k = x.size(1), elem = values.element_size();
  const int64_t panel_rows = std::min(n, std::max<int64_t>(16, kPanelBytes / (k * elem) / 16 * 16));
  const at::Tensor dense = at::empty({panel_rows, k}, values.options());
  const auto* vbytes = static_cast<const uint8_t*>(values.data_ptr());
  const uint8_t* mbytes = meta.data_ptr<uint8_t>();
  auto* dbytes = static_cast<uint8_t*>(dense.data_ptr());
  for (int64_t n0 = 0; n0 < n; n0 += panel_rows) {
    const int64_t rows = std::min(panel_rows, n - n0);
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      isa.decompress(vbytes + (n0 + r0) * (k / 2) * elem, mbytes + (n0 + r0) * (k / 8), dbytes + r0 * k * elem,
                     r1 - r0, k, static_cast<int>(elem));
    });
    const at::Tensor w = dense.narrow(0, 0, rows).t();
    at::Tensor out = y.narrow(1, n0, rows);
    if (bias) at::addmm_out(out, bias->narrow(0, n0, rows), x, w);
    else at::mm_out(out, x, w);
  }
}

// Streaming beats decompress + GEMM while x is small: its compute per row of x matches a dense GEMM's on 2:4
// (half the multiplies, plus a permute each; measured on Zen 4) and it reads W compressed. The kernels keep a
// block of x rows in L2 and reread W once per block, so a large x (large M * K) rereads W too often. bf16 GEMMs
// on CPUs with AVX512-BF16 run at twice the fp32 rate, which the streaming kernel does not reach beyond decode.
bool stream(const at::Tensor& x, bool bf16) {
  const int64_t m = x.size(0);
  if (m <= kDecodeMaxM) return true;
  if (bf16 && has_native_bf16()) return false;
  return m * x.size(1) * 4 <= kStreamMaxXBytes;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                  const std::optional<at::Tensor>& bias, const std::string& isa_name,
                  const std::optional<at::Tensor>& out, const std::string& path) {
  check_inputs(x, values, meta, bias);
  TORCH_CHECK_VALUE(path.empty() || path == "stream" || path == "panels",
                    "cpu24: path must be '', 'stream' or 'panels', got '", path, "'");
  const Isa& isa = pick(isa_name);
  at::Tensor y;
  if (out) {
    TORCH_CHECK_VALUE(out->device().is_cpu() && out->scalar_type() == x.scalar_type() && out->dim() == 2 &&
                          out->size(0) == x.size(0) && out->size(1) == values.size(0),
                      "cpu24: out must be a CPU tensor [M, N] of x's dtype");
    y = *out;
  } else {
    y = at::empty({x.size(0), values.size(0)}, x.options());
  }
  if (x.size(0) == 0 || values.size(0) == 0) return y.zero_();
  if (path.empty() ? stream(x, x.scalar_type() == at::kBFloat16) : path == "stream") decode(isa, x, values, meta, bias, y);
  else prefill(isa, x, values, meta, bias, y);
  return y;
}

double read_bandwidth_probe(const at::Tensor& buffer) {
  TORCH_CHECK(buffer.device().is_cpu() && buffer.is_contiguous() && buffer.scalar_type() == at::kFloat,
              "read_bandwidth_probe: buffer must be a contiguous fp32 CPU tensor");
  const SumFn sum = pick("").sum;
  const float* a = buffer.data_ptr<float>();
  return at::parallel_reduce(
      int64_t{0}, buffer.numel(), int64_t{1} << 16, 0.0,
      [&](int64_t i0, int64_t i1, double acc) { return acc + sum(a + i0, i1 - i0); },
      [](double u, double v) { return u + v; });
}

// The op torch.compile graphs call (sparse_runtime::cpu24_linear): registered here, in C++, so that inductor's
// compiled decode step reaches the kernel through the dispatcher with no Python in between (a Python custom op
// costs ~25 us per call, more than the kernel at decode sizes). x [..., K]; its fake lives in ops/cpu24.py.
at::Tensor linear_op(const at::Tensor& values, const at::Tensor& meta, const std::optional<at::Tensor>& bias,
                     const at::Tensor& x, c10::string_view isa, c10::string_view path) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "cpu24_linear: x must have at least one dimension");
  const at::Tensor x2 = x.reshape({-1, x.size(-1)}).contiguous();
  at::Tensor y = linear(x2, values.contiguous(), meta.contiguous(),
                        bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt, std::string(isa),
                        std::nullopt, std::string(path));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = values.size(0);
  return y.view(shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparse_runtime, m) {
  m.def("cpu24_linear(Tensor values, Tensor meta, Tensor? bias, Tensor x, str isa=\"\", str path=\"\") -> Tensor");
}

TORCH_LIBRARY_IMPL(sparse_runtime, CPU, m) { m.impl("cpu24_linear", &linear_op); }

PYBIND11_MODULE(_cpu24, m) {
  m.doc() = "2:4 sparse linear on the CPU (AVX-512 BF16 / AVX-512 / AVX2 / scalar, picked at run time)";
  m.def("linear", &linear, py::arg("x"), py::arg("values"), py::arg("meta"), py::arg("bias") = py::none(),
        py::arg("isa") = "", py::arg("out") = py::none(), py::arg("path") = "",
        "y[M, N] = x[M, K] @ W^T (+ bias), W as canonical 2:4 values [N, K/2] + meta [N, K/8]; fp32 or bf16. "
        "isa '' picks the best this CPU runs; path 'stream' or 'panels' forces one, '' picks by the size of x.");
  m.def("isas", &isas, "ISAs built in and runnable on this CPU, worst to best");
  m.def("read_bandwidth_probe", &read_bandwidth_probe, py::arg("buffer"),
        "sum of an fp32 buffer with torch's threads and the best ISA (a streaming read, for bandwidth)");
}
