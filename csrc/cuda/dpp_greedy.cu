// Feature-space greedy MAP for the relevance-weighted cosine DPP, on the GPU.
//
// The candidates' residuals are those of csrc/cpu/dpp_cosine.h's sweep: e_i = y_i . q_t, d_i^2 -= e_i^2,
// with y_i = r_i xn_i. The new direction is built as in Chen et al. (NeurIPS 2018):
// q_t = (y_j - sum_s c_s q_s) / d_j with c_s = y_j . q_s. Only the feature part of the directions is
// kept: the ridge's private coordinate of a pick is orthogonal to every earlier direction and to every
// candidate, so it enters only through d_j (no k x k block, no O(k^2) work per pick).
// Everything stays on the device; the host launches a chunk of picks without synchronising. Per pick:
//   select  -> (1 block)  the argmax of the per-block bests (ties to the lowest index), record it or stop
//   coef    -> warp per earlier direction: c_s = y_j . q_s                         (t > 0)
//   partial -> block per (256 coordinates, 64 directions): sum_s c_s q_s[c]         (t > 0)
//   finish  -> q_t[c] = (y_j[c] - sum of the partials, in a fixed order) / d_j
//   update  -> warp per row, 16-byte loads of X in its storage type: e_i, d2_i, per-block argmax
// The update streams X once per pick (1M x 768 float32: 3 GB, about 0.7 ms at 4.8 TB/s); the others read
// the t x D directions twice (61 MB at t = 10,000). Sums are deterministic: no atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "metamoe/cuda_argmax.cuh"
#include "metamoe/cuda_ops.h"

namespace metamoe {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxBlocks = 1024;
constexpr int kChunk = 64;  // directions per block of the partial sums

__device__ __forceinline__ double load(const float* p, int64_t i) { return static_cast<double>(p[i]); }
__device__ __forceinline__ double load(const __half* p, int64_t i) { return static_cast<double>(__half2float(p[i])); }
__device__ __forceinline__ double load(const __nv_bfloat16* p, int64_t i) {
  return static_cast<double>(__bfloat162float(p[i]));
}

// 16 bytes of storage as floats: 4 float32, or 8 float16 / bfloat16.
template <typename T>
struct Pack;
template <>
struct Pack<float> {
  static constexpr int kValues = 4;
  __device__ __forceinline__ static void unpack(uint4 raw, float* f) {
    f[0] = __uint_as_float(raw.x);
    f[1] = __uint_as_float(raw.y);
    f[2] = __uint_as_float(raw.z);
    f[3] = __uint_as_float(raw.w);
  }
};
template <>
struct Pack<__half> {
  static constexpr int kValues = 8;
  __device__ __forceinline__ static void unpack(uint4 raw, float* f) {
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const float2 v = __half22float2(h[u]);
      f[2 * u] = v.x;
      f[2 * u + 1] = v.y;
    }
  }
};
template <>
struct Pack<__nv_bfloat16> {
  static constexpr int kValues = 8;
  __device__ __forceinline__ static void unpack(uint4 raw, float* f) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const float2 v = __bfloat1622float2(h[u]);
      f[2 * u] = v.x;
      f[2 * u + 1] = v.y;
    }
  }
};

template <typename T>
__global__ void init_kernel(const T* __restrict__ x, int64_t n, int64_t d, const double* __restrict__ rel,
                            double ridge, DppWorkspace ws) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t i = warp; i < n; i += nwarps) {
    const T* xi = x + i * d;
    double ss = 0.0;
    for (int64_t c = lane; c < d; c += 32) {
      const double v = load(xi, c);
      ss += v * v;
    }
    ss = warp_sum(ss);
    if (lane == 0) {
      const double r = rel[i];
      if (!(ss > 0.0) || !isfinite(ss)) atomicMin(ws.bad_row, static_cast<int32_t>(i < INT32_MAX ? i : INT32_MAX - 1));
      ws.scale[i] = r * rsqrt(ss);
      ws.d2[i] = r * r * (1.0 + ridge);
    }
  }
}

__global__ void argmax_partial_kernel(const double* __restrict__ d2, int64_t n, DppWorkspace ws) {
  double bv = -INFINITY;
  int64_t bi = -1;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double v = d2[i];
    if (v != -INFINITY) arg_better(bv, bi, v, i);
  }
  block_argmax(bv, bi);
  if (threadIdx.x == 0) {
    ws.block_val[blockIdx.x] = bv;
    ws.block_idx[blockIdx.x] = bi;
  }
}

// The argmax over the per-block bests; records it as pick t, or stops when it is <= eps.
__global__ void select_kernel(int64_t t, double eps, DppWorkspace ws, int64_t* out_idx, double* out_resid) {
  if (*ws.stopped) return;
  double bv = -INFINITY;
  int64_t bi = -1;
  for (int b = threadIdx.x; b < ws.num_blocks; b += blockDim.x) arg_better(bv, bi, ws.block_val[b], ws.block_idx[b]);
  block_argmax(bv, bi);
  if (threadIdx.x == 0) {
    if (bi < 0 || !(bv > eps)) {
      *ws.stopped = 1;
      return;
    }
    *ws.best_idx = bi;
    *ws.best_val = bv;
    out_idx[t] = bi;
    out_resid[t] = bv;
    ws.d2[bi] = -INFINITY;
  }
}

// coef[s] = y_j . q_s for s < t, one warp per direction (y_j = scale_j x_j, read in place).
template <typename T>
__global__ void coef_kernel(const T* __restrict__ x, int64_t d, int64_t t, DppWorkspace ws) {
  if (*ws.stopped) return;
  const int lane = threadIdx.x & 31;
  const int64_t s = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (s >= t) return;
  const int64_t j = *ws.best_idx;
  const double sj = ws.scale[j];
  const T* xj = x + j * d;
  const double* qs = ws.qd + s * d;
  double acc = 0.0;
  for (int64_t c = lane; c < d; c += 32) acc += qs[c] * (sj * load(xj, c));
  acc = warp_sum(acc);
  if (lane == 0) ws.coef[s] = acc;
}

// partial[p][c] = sum_{s in chunk p} coef[s] q_s[c]: block (coordinate block, chunk p), thread per c.
__global__ void partial_kernel(int64_t d, int64_t t, DppWorkspace ws) {
  if (*ws.stopped) return;
  __shared__ double coef[kChunk];
  const int64_t s0 = static_cast<int64_t>(blockIdx.y) * kChunk;
  const int64_t s1 = min(s0 + kChunk, t);
  if (threadIdx.x < s1 - s0) coef[threadIdx.x] = ws.coef[s0 + threadIdx.x];
  __syncthreads();
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= d) return;
  double acc = 0.0;
  for (int64_t s = s0; s < s1; ++s) acc += coef[s - s0] * ws.qd[s * d + c];
  ws.partial[blockIdx.y * d + c] = acc;
}

// q_t[c] = (y_j[c] - sum_p partial[p][c]) / d_j, the chunks summed in order.
template <typename T>
__global__ void finish_kernel(const T* __restrict__ x, int64_t d, int64_t t, DppWorkspace ws) {
  if (*ws.stopped) return;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= d) return;
  const int64_t j = *ws.best_idx;
  const int64_t chunks = (t + kChunk - 1) / kChunk;
  double sub = 0.0;
  for (int64_t p = 0; p < chunks; ++p) sub += ws.partial[p * d + c];
  ws.qd[t * d + c] = (ws.scale[j] * load(x + j * d, c) - sub) * rsqrt(*ws.best_val);
}

// d2_i -= (scale_i x_i . q_t)^2 for every unpicked row, warp per row, and the per-block argmax. kVector:
// 16-byte loads (the caller checked that rows start 16-byte aligned and D is a multiple of the pack).
template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads) update_kernel(const T* __restrict__ x, int64_t n, int64_t d, int64_t t,
                                                           DppWorkspace ws) {
  if (*ws.stopped) return;
  const double* __restrict__ q = ws.qd + t * d;
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  double bv = -INFINITY;
  int64_t bi = -1;
  for (int64_t i = warp; i < n; i += nwarps) {
    const double cur = ws.d2[i];
    if (cur == -INFINITY) continue;  // already picked (uniform across the warp)
    const T* xi = x + i * d;
    double acc = 0.0;
    if constexpr (kVector) {
      constexpr int V = Pack<T>::kValues;
      const uint4* xv = reinterpret_cast<const uint4*>(xi);
      const int64_t packs = d / V;
#pragma unroll 4
      for (int64_t u = lane; u < packs; u += 32) {
        float f[V];
        Pack<T>::unpack(__ldg(xv + u), f);
        const double* qq = q + u * V;
#pragma unroll
        for (int e = 0; e < V; ++e) acc += static_cast<double>(f[e]) * qq[e];
      }
    } else {
      for (int64_t c = lane; c < d; c += 32) acc += load(xi, c) * q[c];
    }
    acc = warp_sum(acc);
    const double e = ws.scale[i] * acc;
    const double v = cur - e * e;
    if (lane == 0) {
      ws.d2[i] = v;
      arg_better(bv, bi, v, i);
    }
  }
  block_argmax(bv, bi);
  if (threadIdx.x == 0) {
    ws.block_val[blockIdx.x] = bv;
    ws.block_idx[blockIdx.x] = bi;
  }
}

template <typename T>
int init_impl(const T* x, int64_t n, int64_t d, const double* rel, double ridge, DppWorkspace ws, cudaStream_t st) {
  init_kernel<T><<<ws.num_blocks, kThreads, 0, st>>>(x, n, d, rel, ridge, ws);
  argmax_partial_kernel<<<ws.num_blocks, kThreads, 0, st>>>(ws.d2, n, ws);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int picks_impl(const T* x, int64_t n, int64_t d, int64_t k_max, double eps, int64_t t0, int64_t count,
               DppWorkspace ws, int64_t* out_idx, double* out_resid, cudaStream_t st) {
  const bool vector = reinterpret_cast<uintptr_t>(x) % 16 == 0 && d % Pack<T>::kValues == 0;
  const int col_blocks = static_cast<int>((d + kThreads - 1) / kThreads);
  for (int64_t t = t0; t < t0 + count && t < k_max; ++t) {
    select_kernel<<<1, 1024, 0, st>>>(t, eps, ws, out_idx, out_resid);
    if (t > 0) {
      coef_kernel<T><<<static_cast<int>((t + kWarps - 1) / kWarps), kThreads, 0, st>>>(x, d, t, ws);
      partial_kernel<<<dim3(col_blocks, static_cast<unsigned>((t + kChunk - 1) / kChunk)), kThreads, 0, st>>>(d, t, ws);
    }
    finish_kernel<T><<<col_blocks, kThreads, 0, st>>>(x, d, t, ws);
    if (vector)
      update_kernel<T, true><<<ws.num_blocks, kThreads, 0, st>>>(x, n, d, t, ws);
    else
      update_kernel<T, false><<<ws.num_blocks, kThreads, 0, st>>>(x, n, d, t, ws);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int dpp_num_blocks(int64_t n) {
  const int64_t want = (n + kWarps - 1) / kWarps;
  return static_cast<int>(want < kMaxBlocks ? (want > 0 ? want : 1) : kMaxBlocks);
}

int64_t dpp_partial_chunks(int64_t k_max) { return k_max > 1 ? (k_max - 1 + kChunk - 1) / kChunk : 1; }

int dpp_init(const void* x, DType dtype, int64_t n, int64_t d, const double* relevance, double ridge,
             DppWorkspace ws, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return init_impl(static_cast<const float*>(x), n, d, relevance, ridge, ws, st);
    case DType::kFloat16: return init_impl(static_cast<const __half*>(x), n, d, relevance, ridge, ws, st);
    case DType::kBFloat16: return init_impl(static_cast<const __nv_bfloat16*>(x), n, d, relevance, ridge, ws, st);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int dpp_picks(const void* x, DType dtype, int64_t n, int64_t d, int64_t k_max, double eps, int64_t t0,
              int64_t count, DppWorkspace ws, int64_t* out_idx, double* out_resid, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return picks_impl(static_cast<const float*>(x), n, d, k_max, eps, t0, count, ws, out_idx, out_resid, st);
    case DType::kFloat16:
      return picks_impl(static_cast<const __half*>(x), n, d, k_max, eps, t0, count, ws, out_idx, out_resid, st);
    case DType::kBFloat16:
      return picks_impl(static_cast<const __nv_bfloat16*>(x), n, d, k_max, eps, t0, count, ws, out_idx, out_resid, st);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace cuda
}  // namespace metamoe
