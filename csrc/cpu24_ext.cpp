// sparse_runtime._cpu24: y = x @ W^T + b on the CPU with W in the canonical 2:4 format, fp32 or bf16, or its
// values quantized (int8, int4 codes with scales in x's dtype; dequantized in registers, or into the panels).
//
// M <= 16 (decode): the SIMD kernels stream values + meta once (17/32 of the dense fp32 bytes) and rebuild the
// kept x entries in registers; beyond that while x is small (see default_path()). Otherwise (prefill): a sparse
// GEMM on the kept values (cpu24_gemm.h), or, for bf16 where the CPU multiplies bf16 natively, panels of W
// decompressed into a dense buffer for torch's GEMM.
// Built without -m flags: the ISA kernels are in their own TUs (cpu24.h) and are picked here at run time.
// Threads: torch's pool.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "cpu24.h"

namespace {

constexpr int64_t kDecodeMaxM = 16;                   // always streamed (decode)
constexpr int64_t kRowAlign = 8;                       // thread chunks start on a multiple of the row tiles
constexpr int64_t kMinChunkBytes = 64 * 1024;          // of weights per thread chunk: below, a fork costs more
constexpr int64_t kPanelBytes = 16 * 1024 * 1024;      // dense prefill panel (see prefill)
constexpr int64_t kGemmRows = 48;                      // weight rows per sparse-GEMM task: outputs [M, 48] in L2

using Kernel = void (*)(const Cpu24Problem&, int64_t, int64_t);
using SumFn = float (*)(const float*, int64_t);
using DecompressFn = void (*)(const void*, const uint8_t*, void*, int64_t, int64_t, int);
using GemmFn = void (*)(const Cpu24Gemm&);

struct Isa {
  const char* name;
  Kernel kernel;
  DecompressFn decompress;
  GemmFn gemm;
  int64_t (*gemm_block)();
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

#define SR_ISA(kernel, isa) kernel, sr_cpu24_decompress_##isa, sr_cpu24_gemm_##isa, sr_cpu24_gemm_block_##isa, sr_sum_##isa
const Isa kIsas[] = {{"scalar", SR_ISA(sr_cpu24_scalar, scalar), always},
                     {"avx2", SR_ISA(sr_cpu24_avx2, avx2), has_avx2},
                     {"avx512", SR_ISA(sr_cpu24_avx512, avx512), has_avx512},
                     // bf16 weights: x stays bf16, vdpbf16ps; otherwise the avx512 kernels
                     {"avx512bf16", SR_ISA(sr_cpu24_avx512bf16, avx512), has_avx512bf16}};
#undef SR_ISA
#else
bool has_native_bf16() { return false; }

const Isa kIsas[] = {{"scalar", sr_cpu24_scalar, sr_cpu24_decompress_scalar, sr_cpu24_gemm_scalar,
                      sr_cpu24_gemm_block_scalar, sr_sum_scalar, always}};
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

// What `values` holds: float values in x's dtype, int8 codes, or int4 codes packed in uint8 (docs/format.md).
Cpu24Values values_kind(const at::Tensor& values) {
  switch (values.scalar_type()) {
    case at::kFloat: return Cpu24Values::f32;
    case at::kBFloat16: return Cpu24Values::bf16;
    case at::kChar: return Cpu24Values::int8;
    case at::kByte: return Cpu24Values::int4;
    default: TORCH_CHECK_TYPE(false, "cpu24: values must be float32, bfloat16, int8 or uint8 (int4), got ",
                              values.scalar_type());
  }
  return Cpu24Values::f32;  // unreachable
}

void check_inputs(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scales) {
  // Every call runs these (they keep any call from reading out of bounds); the Python wrapper runs its friendlier
  // checks only after one of these refuses.
  for (const at::Tensor* t : {&x, &values, &meta})
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "cpu24: tensors must be contiguous CPU tensors");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
                   "cpu24: x must be float32 or bfloat16, got ", x.scalar_type());
  const Cpu24Values kind = values_kind(values);
  const bool quant = cpu24_quantized(kind);
  TORCH_CHECK_TYPE(quant || x.scalar_type() == values.scalar_type(), "cpu24: x and values dtypes differ");
  TORCH_CHECK_TYPE(meta.scalar_type() == at::kByte, "cpu24: meta must be uint8");
  TORCH_CHECK_VALUE(x.dim() == 2 && values.dim() == 2 && meta.dim() == 2, "cpu24: x, values, meta must be 2-D");
  const int64_t k = x.size(1), n = values.size(0);
  TORCH_CHECK_VALUE(k > 0 && k % 8 == 0 && values.size(1) * (kind == Cpu24Values::int4 ? 4 : 2) == k &&
                        meta.size(0) == n && meta.size(1) * 8 == k,
                    "cpu24: shapes do not match: x ", x.sizes(), ", values ", values.sizes(), ", meta ",
                    meta.sizes(), " (need K > 0, K % 8 == 0, values [N, K/2] (int4 [N, K/4]), meta [N, K/8])");
  if (bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->is_contiguous(), "cpu24: bias must be a contiguous CPU tensor");
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "cpu24: bias and x dtypes differ");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, "cpu24: bias must be [N]");
  }
  TORCH_CHECK_VALUE(quant == scales.has_value(), "cpu24: int8/int4 codes need scales, float values take none");
  if (scales) {
    TORCH_CHECK(scales->device().is_cpu() && scales->is_contiguous(), "cpu24: scales must be a contiguous CPU tensor");
    TORCH_CHECK_TYPE(scales->scalar_type() == x.scalar_type(), "cpu24: scales and x dtypes differ");
    const int64_t groups = scales->dim() == 2 ? scales->size(1) : 0;
    TORCH_CHECK_VALUE(scales->dim() == 2 && scales->size(0) == n && groups > 0 && k % groups == 0 &&
                          (k / groups) % 8 == 0,
                      "cpu24: scales must be [N, groups] with groups of a multiple of 8 columns dividing K, got ",
                      scales->sizes());
  }
}

// The weight's part of a problem: values, meta, scales (fp32) and their kind; the caller adds x, y and bias.
Cpu24Problem weight_problem(const at::Tensor& values, const at::Tensor& meta, const at::Tensor& scales32,
                            int64_t k) {
  Cpu24Problem p{};
  p.values = values.data_ptr();
  p.meta = meta.data_ptr<uint8_t>();
  p.n = values.size(0);
  p.k = k;
  p.kind = values_kind(values);
  p.scales = scales32.defined() ? scales32.data_ptr<float>() : nullptr;
  p.group = scales32.defined() ? k / scales32.size(1) : k;
  return p;
}

at::Tensor widened(const std::optional<at::Tensor>& t) {
  return t ? t->to(at::kFloat).contiguous() : at::Tensor();  // no copy when fp32 already
}

// The streaming and GEMM kernels take fp32 x, bias, scales and y: widening M*K inputs and narrowing M*N outputs is
// cheap next to N*K. run(x32, bias32, scales32, y32) on them (an absent bias or scales: undefined), then y gets
// y32 where the kernel could not write y in place.
template <class Run>
void in_fp32(const at::Tensor& x, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scales,
             at::Tensor& y, const Run& run) {
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const at::Tensor x32 = bf16 ? x.to(at::kFloat) : x, b32 = widened(bias), s32 = widened(scales);
  at::Tensor y32 = bf16 || !y.is_contiguous() ? at::empty(y.sizes(), x32.options()) : y;
  run(x32, b32, s32, y32);
  if (!y32.is_same(y)) y.copy_(y32);
}

// x: as given (a bf16 kernel reads it as is), the rest in fp32 (in_fp32).
void decode(const Isa& isa, const at::Tensor& x, const at::Tensor& x32, const at::Tensor& values,
            const at::Tensor& meta, const at::Tensor& b32, const at::Tensor& s32, at::Tensor& y32) {
  Cpu24Problem p = weight_problem(values, meta, s32, x.size(1));
  p.x = x32.data_ptr<float>();
  p.x16 = p.kind == Cpu24Values::bf16 ? static_cast<const uint16_t*>(x.data_ptr()) : nullptr;
  p.bias = b32.defined() ? b32.data_ptr<float>() : nullptr;
  p.y = y32.data_ptr<float>();
  p.m = x.size(0);
  // Groups that are not whole SIMD steps run on the scalar kernel (correct, not fast).
  const Kernel kernel = p.group < p.k && p.group % kCpu24SimdGroup ? sr_cpu24_scalar : isa.kernel;
  const int64_t row_bytes = values.size(1) * values.element_size() + p.k / 8;
  const int64_t blocks = (p.n + kRowAlign - 1) / kRowAlign;
  const int64_t grain = std::max<int64_t>(1, kMinChunkBytes / (row_bytes * kRowAlign));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    kernel(p, b0 * kRowAlign, std::min(b1 * kRowAlign, p.n));
  });
}

void prefill(const Isa& isa, const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scales, at::Tensor& y) {
  // Panels one after the other, each decompressed by all threads and multiplied by torch's threaded GEMM. (One
  // panel per thread with a serial GEMM inside parallel_for was measured far slower: the GEMM opens nested
  // thread teams.) 16 MiB panels: few GEMM calls (each re-packs x), L3-resident, and below glibc's mmap
  // threshold, so later calls reuse the block instead of faulting fresh pages in. Quantized codes: each
  // thread's rows are dequantized into `compressed` (x's dtype) first, then decompressed from there.
  const int64_t n = values.size(0), k = x.size(1), elem = x.element_size();
  const at::Tensor s32 = widened(scales);  // held: the problem points into it
  const Cpu24Problem w = weight_problem(values, meta, s32, k);
  const bool quant = cpu24_quantized(w.kind);
  const int64_t panel_rows = std::min(n, std::max<int64_t>(16, kPanelBytes / (k * elem) / 16 * 16));
  const at::Tensor dense = at::empty({panel_rows, k}, x.options());
  const at::Tensor compressed = quant ? at::empty({panel_rows, k / 2}, x.options()) : at::Tensor();
  const auto* vbytes = static_cast<const uint8_t*>(values.data_ptr());
  const uint8_t* mbytes = meta.data_ptr<uint8_t>();
  auto* dbytes = static_cast<uint8_t*>(dense.data_ptr());
  auto* cbytes = quant ? static_cast<uint8_t*>(compressed.data_ptr()) : nullptr;
  for (int64_t n0 = 0; n0 < n; n0 += panel_rows) {
    const int64_t rows = std::min(panel_rows, n - n0);
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      const uint8_t* src;
      if (quant) {
        sr_cpu24_dequantize(w, n0 + r0, n0 + r1, cbytes + r0 * (k / 2) * elem, static_cast<int>(elem));
        src = cbytes + r0 * (k / 2) * elem;
      } else {
        src = vbytes + (n0 + r0) * (k / 2) * elem;
      }
      isa.decompress(src, mbytes + (n0 + r0) * (k / 8), dbytes + r0 * k * elem, r1 - r0, k, static_cast<int>(elem));
    });
    const at::Tensor wt = dense.narrow(0, 0, rows).t();
    at::Tensor out = y.narrow(1, n0, rows);
    if (bias) at::addmm_out(out, bias->narrow(0, n0, rows), x, wt);
    else at::mm_out(out, x, wt);
  }
}

// x [M, K] as the GEMM's blocks of `block` rows, transposed: xp[b][c][i] = x[b * block + i, c], zero past M.
at::Tensor pack_x(const at::Tensor& x32, int64_t block) {
  const int64_t m = x32.size(0), k = x32.size(1), blocks = (m + block - 1) / block;
  at::Tensor xp = at::empty({blocks, k, block}, x32.options());
  const float* xs = x32.data_ptr<float>();
  float* xd = xp.data_ptr<float>();
  constexpr int64_t kCols = 16;  // per task: 16 columns of a block, a 64-byte run of each row of x
  const int64_t col_tasks = (k + kCols - 1) / kCols;
  at::parallel_for(0, blocks * col_tasks, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / col_tasks, c0 = (t % col_tasks) * kCols, c1 = std::min(k, c0 + kCols);
      for (int64_t i = 0; i < block; ++i) {
        const int64_t row = b * block + i;
        for (int64_t c = c0; c < c1; ++c) xd[(b * k + c) * block + i] = row < m ? xs[row * k + c] : 0.0f;
      }
    }
  });
  return xp;
}

// Prefill on the kept values (cpu24_gemm.h): chunks of kGemmRows weight rows per task, all of x packed once; all
// in fp32 (in_fp32), values other than fp32 widened or dequantized a chunk at a time.
void sparse_gemm(const Isa& isa, const at::Tensor& x32, const at::Tensor& values, const at::Tensor& meta,
                 const at::Tensor& b32, const at::Tensor& s32, at::Tensor& y32) {
  const int64_t m = x32.size(0), k = x32.size(1), n = values.size(0), block = isa.gemm_block();
  const int64_t work_floats = (m + block - 1) / block * block * kGemmRows;
  const at::Tensor xp = pack_x(x32, block);
  const Cpu24Problem w = weight_problem(values, meta, s32, k);
  const int64_t tasks = (n + kGemmRows - 1) / kGemmRows;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> work(work_floats), vpack(kGemmRows * kCpu24GemmKc / 2),
        wide(w.kind == Cpu24Values::f32 ? 0 : kGemmRows * k / 2);
    std::vector<uint8_t> mpack(kGemmRows * kCpu24GemmKc / 8);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kGemmRows, rows = std::min(kGemmRows, n - n0);
      const float* vals = static_cast<const float*>(w.values) + n0 * (k / 2);
      if (w.kind != Cpu24Values::f32) {
        sr_cpu24_dequantize(w, n0, n0 + rows, wide.data(), 4);
        vals = wide.data();
      }
      const Cpu24Gemm g{xp.data_ptr<float>(), vals, w.meta + n0 * (k / 8), b32.defined() ? b32.data_ptr<float>() + n0 : nullptr,
                        y32.data_ptr<float>() + n0, work.data(), vpack.data(), mpack.data(), m, k, rows, n};
      isa.gemm(g);
    }
  });
}

// Beyond decode, streaming still wins while x is a few blocks of rows (its compute per row of x matches a dense
// GEMM's on 2:4: half the multiplies, plus a permute each); from there the sparse GEMM (half the multiplies, no
// permute) does. bf16 GEMMs on CPUs with AVX512-BF16 run at twice the fp32 rate: those get torch's GEMM on
// decompressed panels. Measured on Zen 4, 2 threads, fp32 (benchmarks/cpu_kernels.py): M = 64 streams 1.4x
// dense, the GEMM 1.1x; M = 512 streams 0.7-1.1x dense, the GEMM 1.1-1.5x. The cpu backend times the paths
// per shape instead where it can (backends/cpu.py); this is the choice inside compiled graphs.
constexpr int64_t kStreamMaxM = 64;

const char* default_path(const at::Tensor& x) {
  const int64_t m = x.size(0);
  if (m <= kDecodeMaxM) return "stream";
  if (x.scalar_type() == at::kBFloat16 && has_native_bf16()) return "panels";
  return m <= kStreamMaxM ? "stream" : "gemm";
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                  const std::optional<at::Tensor>& bias, const std::string& isa_name,
                  const std::optional<at::Tensor>& out, const std::string& path,
                  const std::optional<at::Tensor>& scales) {
  check_inputs(x, values, meta, bias, scales);
  TORCH_CHECK_VALUE(path.empty() || path == "stream" || path == "panels" || path == "gemm",
                    "cpu24: path must be '', 'stream', 'panels' or 'gemm', got '", path, "'");
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
  const std::string how = path.empty() ? default_path(x) : path;
  if (how == "panels")
    prefill(isa, x, values, meta, bias, scales, y);
  else
    in_fp32(x, bias, scales, y, [&](const at::Tensor& x32, const at::Tensor& b32, const at::Tensor& s32, at::Tensor& y32) {
      if (how == "stream") decode(isa, x, x32, values, meta, b32, s32, y32);
      else sparse_gemm(isa, x32, values, meta, b32, s32, y32);
    });
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

// How many threads at::parallel_for runs here: the kernels' parallelism, which silently becomes 1 when this TU is
// built without OpenMP (the loop is header code).
int64_t parallel_for_threads() {
  std::atomic<int64_t> most{0};
  at::parallel_for(0, 1 << 10, 1, [&](int64_t, int64_t) {
    const int64_t id = at::get_thread_num() + 1;
    for (int64_t seen = most.load(); id > seen && !most.compare_exchange_weak(seen, id);) {
    }
  });
  return most.load();
}

// The op torch.compile graphs call (sparse_runtime::cpu24_linear): registered here, in C++, so that inductor's
// compiled decode step reaches the kernel through the dispatcher with no Python in between (a Python custom op
// costs ~25 us per call, more than the kernel at decode sizes). x [..., K]; its fake lives in ops/cpu24.py.
at::Tensor linear_op(const at::Tensor& values, const at::Tensor& meta, const std::optional<at::Tensor>& bias,
                     const at::Tensor& x, c10::string_view isa, c10::string_view path,
                     const std::optional<at::Tensor>& scales) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "cpu24_linear: x must have at least one dimension");
  const at::Tensor x2 = x.reshape({-1, x.size(-1)}).contiguous();
  at::Tensor y = linear(x2, values.contiguous(), meta.contiguous(),
                        bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt, std::string(isa),
                        std::nullopt, std::string(path),
                        scales ? std::optional<at::Tensor>(scales->contiguous()) : std::nullopt);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = values.size(0);
  return y.view(shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparse_runtime, m) {
  m.def("cpu24_linear(Tensor values, Tensor meta, Tensor? bias, Tensor x, str isa=\"\", str path=\"\", "
        "Tensor? scales=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparse_runtime, CPU, m) { m.impl("cpu24_linear", &linear_op); }

PYBIND11_MODULE(_cpu24, m) {
  m.doc() = "2:4 sparse linear on the CPU (AVX-512 BF16 / AVX-512 / AVX2 / scalar, picked at run time)";
  m.def("linear", &linear, py::arg("x"), py::arg("values"), py::arg("meta"), py::arg("bias") = py::none(),
        py::arg("isa") = "", py::arg("out") = py::none(), py::arg("path") = "", py::arg("scales") = py::none(),
        "y[M, N] = x[M, K] @ W^T (+ bias), W as canonical 2:4 values [N, K/2] + meta [N, K/8]; fp32 or bf16. "
        "Quantized: values int8 codes [N, K/2] or int4 codes packed in uint8 [N, K/4], scales [N, groups] in x's "
        "dtype. isa '' picks the best this CPU runs; path 'stream', 'gemm' or 'panels' forces one, '' picks by "
        "the size of x.");
  m.def("parallel_for_threads", &parallel_for_threads, "threads the kernels' at::parallel_for runs (torch's count)");
  m.def("isas", &isas, "ISAs built in and runnable on this CPU, worst to best");
  m.def("read_bandwidth_probe", &read_bandwidth_probe, py::arg("buffer"),
        "sum of an fp32 buffer with torch's threads and the best ISA (a streaming read, for bandwidth)");
}
