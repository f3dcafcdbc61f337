// 2:4 decode GEMM on the sparse tensor cores: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), M <= 16,
// fp16/bf16 in, fp32 accumulate, one mma.sp.m16n8k32 per 16 output features x 8 tokens x 32 input columns.
//
// W is the sparse A operand (16 rows of W per MMA), x^T the dense B operand (8 tokens per MMA; a second n-tile
// only when M > 8). At decode the weight bytes are the whole cost, so the weight is read in the order the
// fragments want it: sparse_runtime/mmasp_layout.py derives, at load time, from the canonical values/meta,
//   vals [N/16, K/32, 32 lanes] x 16 bytes: lane's four A registers for one k-step (one LDG.128 per lane),
//   meta [N/16, K/64, 32 lanes] x 4 bytes:  lane's metadata word for one 64-column chunk: lanes with
//        (lane & 2) == 0 carry the first k-step's metadata (sparsity selector 0), the others the second's (1).
// x is copied once per CTA into shared memory and read with ldmatrix (4 B registers per instruction).
// Grid: (N tiles of WARPS * 16 rows, split over K); each warp owns 16 rows and the CTA's K range. With split > 1
// every CTA writes fp32 partials; the last CTA of an N tile (a counter per tile, reset by that CTA) sums them in
// split order, so the result does not depend on which CTA finishes last.
//
// Index arithmetic tagged "mirror:" is restated, expression for expression, by the CPU emulator in
// sparse_runtime/mmasp_layout.py (tests/test_mmasp_layout.py checks that every tagged expression appears there).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "mmasp.h"
#include "sr_common.h"

namespace {

constexpr int WARPS = SR_MMASP_WARPS;
constexpr int K_CHUNK = 64;  // two k-steps of 32: one metadata word per lane
constexpr int X_PAD = 8;     // halves of padding per shared x row: ldmatrix rows land in distinct banks

template <typename T> struct MmaType;
template <> struct MmaType<__half> { static constexpr bool bf16 = false; };
template <> struct MmaType<__nv_bfloat16> { static constexpr bool bf16 = true; };

__device__ __forceinline__ uint4 ld_stream128(const uint4* p) {  // read once: do not keep it in L1
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t ld_stream32(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&b)[4], const void* smem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3]) : "r"(s));
}

// d += A(sparse, 16x32) * B(32x8). The canonical format keeps each group's indices increasing, which is what
// ::ordered_metadata asks for (PTX 8.5, CUDA 12.5); older toolkits get the plain form, same result here.
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 5))
#define SR_MMA_SP "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32."
#else
#define SR_MMA_SP "mma.sp.sync.aligned.m16n8k32.row.col.f32."
#endif
template <bool BF16, int SEL>
__device__ __forceinline__ void mma_sp(float (&d)[4], const uint4& a, const uint32_t (&b)[4], uint32_t e) {
  if constexpr (BF16) {
    asm volatile(SR_MMA_SP "bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, "
                 "{%0, %1, %2, %3}, %12, %13;"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e),
                   "n"(SEL));
  } else {
    asm volatile(SR_MMA_SP "f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, "
                 "{%0, %1, %2, %3}, %12, %13;"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e),
                   "n"(SEL));
  }
}

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ __half from_f32(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32(float v) { return __float2bfloat16_rn(v); }

// Register prefetch depth, in 64-column chunks: 2 x 16 B of values + 4 B of metadata per lane each, so a warp
// keeps STAGES x 1152 bytes of weight in flight.
constexpr int STAGES = 4;

template <typename T, int NT>
__global__ void __launch_bounds__(WARPS * 32)
mmasp_kernel(const uint4* __restrict__ vals, const uint32_t* __restrict__ meta, const T* __restrict__ x,
             const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ ws, int* __restrict__ counters,
             int m, int n, int k, int split_chunks) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tiles = (n + 15) / 16, steps = k / 32, chunks = k / K_CHUNK;
  const int tile = blockIdx.x * WARPS + warp;
  const int chunk0 = blockIdx.y * split_chunks;
  const int nchunks = min(split_chunks, chunks - chunk0);
  const int ks = split_chunks * K_CHUNK, xs_stride = ks + X_PAD;
  const bool active = tile < tiles;  // warp-uniform: a warp past the last tile only helps with x and the barrier

  // Weight prefetch first (nothing depends on x), then x -> shared memory, zeros for rows >= M and past K.
  const uint4* vp = vals + (static_cast<int64_t>(tile) * steps + 2 * chunk0) * 32 + lane;  // mirror: (tile * steps + s) * 32 + lane
  const uint32_t* mp = meta + (static_cast<int64_t>(tile) * chunks + chunk0) * 32 + lane;  // mirror: (tile * chunks + c) * 32 + lane
  uint4 va[STAGES][2];
  uint32_t me[STAGES];
#pragma unroll
  for (int st = 0; st < STAGES; ++st) {
    if (active && st < nchunks) {
      va[st][0] = ld_stream128(vp + (2 * st) * 32);
      va[st][1] = ld_stream128(vp + (2 * st + 1) * 32);
      me[st] = ld_stream32(mp + st * 32);
    }
  }
  const int rows = NT * 8, row_vecs = ks / 8;  // 16-byte vectors per shared row
  for (int i = threadIdx.x; i < rows * row_vecs; i += WARPS * 32) {
    const int r = i / row_vecs, v = i % row_vecs;
    T* dst = xs + r * xs_stride + v * 8;
    const int kk = chunk0 * K_CHUNK + v * 8;
    if (r < m && v < nchunks * (K_CHUNK / 8)) {
      cp_async16(dst, x + static_cast<int64_t>(r) * k + kk);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    }
  }
  asm volatile("cp.async.wait_all;" ::: "memory");
  __syncthreads();

  float acc[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;

  // ldmatrix: lane supplies row (lane % 8) of matrix (lane / 8); matrix j holds k columns 8j..8j+7 of the step.
  const T* xl = xs + (lane % 8) * xs_stride + 8 * (lane / 8);  // mirror: token = nt * 8 + lane % 8, col = kk + 8 * (lane // 8)
  if (active) {
    for (int c0 = 0; c0 < nchunks; c0 += STAGES) {
#pragma unroll
      for (int st = 0; st < STAGES; ++st) {
        const int c = c0 + st;
        if (c < nchunks) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {  // k-step 2c + h uses sparsity selector h
            const int kk = c * K_CHUNK + h * 32;
#pragma unroll
            for (int t = 0; t < NT; ++t) {
              uint32_t b[4];
              ldmatrix_x4(b, xl + t * 8 * xs_stride + kk);
              if (h == 0) mma_sp<MmaType<T>::bf16, 0>(acc[t], va[st][0], b, me[st]);  // mirror: sel = h
              else mma_sp<MmaType<T>::bf16, 1>(acc[t], va[st][1], b, me[st]);
            }
          }
          if (c + STAGES < nchunks) {
            va[st][0] = ld_stream128(vp + (2 * (c + STAGES)) * 32);
            va[st][1] = ld_stream128(vp + (2 * (c + STAGES) + 1) * 32);
            me[st] = ld_stream32(mp + (c + STAGES) * 32);
          }
        }
      }
    }
  }

  // Accumulator i of lane: feature row g + 8 * (i >> 1) of the tile, token 2 * (lane % 4) + (i & 1) of the n-tile.
  const int g = lane / 4, tq = lane % 4;
  const int split = gridDim.y;
  if (split == 1) {
    if (!active) return;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = tile * 16 + g + 8 * (i >> 1), tok = t * 8 + 2 * tq + (i & 1);  // mirror: row = tile * 16 + g + 8 * (i >> 1), tok = nt * 8 + 2 * tq + (i & 1)
        if (row < n && tok < m) {
          const float b = bias ? to_f32(bias[row]) : 0.f;
          y[static_cast<int64_t>(tok) * n + row] = from_f32<T>(acc[t][i] + b);
        }
      }
    }
    return;
  }
  // Partials ws[split][M][N] (fp32), then the last CTA of this N tile reduces them in split order.
  if (active) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = tile * 16 + g + 8 * (i >> 1), tok = t * 8 + 2 * tq + (i & 1);
        if (row < n && tok < m) ws[(static_cast<int64_t>(blockIdx.y) * m + tok) * n + row] = acc[t][i];
      }
    }
  }
  __threadfence();
  __syncthreads();
  __shared__ int last;
  if (threadIdx.x == 0) last = atomicAdd(&counters[blockIdx.x], 1) == split - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int row0 = blockIdx.x * WARPS * 16, nrows = min(WARPS * 16, n - row0);
  for (int i = threadIdx.x; i < nrows * m; i += WARPS * 32) {
    const int tok = i / nrows, row = row0 + i % nrows;
    float s = 0.f;
    for (int sp = 0; sp < split; ++sp) s += __ldcg(&ws[(static_cast<int64_t>(sp) * m + tok) * n + row]);  // mirror: for sp in range(split)
    const float b = bias ? to_f32(bias[row]) : 0.f;
    y[static_cast<int64_t>(tok) * n + row] = from_f32<T>(s + b);
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0;  // ready for the next launch (and for graph replays)
}

template <typename T, int NT>
size_t smem_bytes(int split_chunks) {  // the CTA's x slice: NT * 8 token rows of the K slice, padded
  return static_cast<size_t>(NT * 8) * (split_chunks * K_CHUNK + X_PAD) * sizeof(T);
}
static_assert(2 * 8 * (SR_MMASP_MAX_KS + X_PAD) * 2 <= 48 * 1024,
              "the largest x slice must fit the dynamic shared memory a launch gets without opting in");

template <typename T, int NT>
void launch(const MmaspArgs& a, cudaStream_t stream) {
  const int tiles = (a.n + 15) / 16;
  const int chunks = a.k / K_CHUNK;
  dim3 grid((tiles + WARPS - 1) / WARPS, (chunks + a.split_chunks - 1) / a.split_chunks);
  mmasp_kernel<T, NT><<<grid, WARPS * 32, smem_bytes<T, NT>(a.split_chunks), stream>>>(
      static_cast<const uint4*>(a.vals), static_cast<const uint32_t*>(a.meta), static_cast<const T*>(a.x),
      static_cast<const T*>(a.bias), static_cast<T*>(a.y), static_cast<float*>(a.ws), static_cast<int*>(a.counters),
      a.m, a.n, a.k, a.split_chunks);
}

template <typename T, int NT>
int ctas_per_sm(int split_chunks) {
  int blocks = 0;
  sr_check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, mmasp_kernel<T, NT>, WARPS * 32,
                                                              smem_bytes<T, NT>(split_chunks)),
                "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  return blocks;
}

template <typename T>
void launch_nt(const MmaspArgs& a, cudaStream_t stream) {
  if (a.m <= 8) launch<T, 1>(a, stream);  // one n-tile: the second would multiply zeros
  else launch<T, 2>(a, stream);
}

template <typename T>
int ctas_per_sm_nt(int m, int split_chunks) {  // the variant launch_nt picks for M
  return m <= 8 ? ctas_per_sm<T, 1>(split_chunks) : ctas_per_sm<T, 2>(split_chunks);
}

void check_m(int m) {
  if (m < 1 || m > 16) throw_error("mmasp: M must be in 1..16, got " + std::to_string(m));
}

void check_split(int split_chunks) {
  if (split_chunks < 1 || split_chunks * K_CHUNK > SR_MMASP_MAX_KS) {
    throw_error("mmasp: split_chunks " + std::to_string(split_chunks) + " out of range");
  }
}

}  // namespace

void sr_mmasp(const MmaspArgs& a, bool bf16, cudaStream_t stream) {
  check_m(a.m);
  if (a.n < 1 || a.k < K_CHUNK || a.k % K_CHUNK) {
    throw_error("mmasp: needs N >= 1 and K a positive multiple of 64, got N=" + std::to_string(a.n) +
                " K=" + std::to_string(a.k));
  }
  check_split(a.split_chunks);
  if (bf16) launch_nt<__nv_bfloat16>(a, stream);
  else launch_nt<__half>(a, stream);
  sr_check_cuda(cudaGetLastError(), "mmasp kernel launch");
}

int sr_mmasp_ctas_per_sm(int m, int split_chunks, bool bf16) {
  check_m(m);
  check_split(split_chunks);
  return bf16 ? ctas_per_sm_nt<__nv_bfloat16>(m, split_chunks) : ctas_per_sm_nt<__half>(m, split_chunks);
}
