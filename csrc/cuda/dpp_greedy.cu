// Feature-space greedy MAP for the relevance-weighted cosine DPP, on the GPU.
//
// Same algorithm as csrc/cpu/dpp_greedy.cpp (see there): one N x D matrix-vector product per pick.
// Everything stays on the device, so the host launches a chunk of picks without synchronising:
//   record  -> (1 thread)   read the argmax, stop below eps, mark the pick (d2 = -inf)
//   build   -> vec = y_j (feature part) and 0 (private coordinates)
//   2 x CGS -> coef = Q^T vec; vec -= Q coef  (classical Gram-Schmidt twice: parallel and as stable as MGS)
//   finish  -> q_t = vec / d_j
//   update  -> warp per row: e_i = scale_i x_i . q_t, d2_i -= e_i^2, per-block argmax
//   reduce  -> global argmax (ties to the lowest index)
// The update pass reads X once per pick in its storage type (bf16/fp16/fp32); it is memory bound
// (1M x 768 bf16 = 1.5 GB, ~0.35 ms on an H200), all other passes are O(t D) and small.
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

__device__ __forceinline__ double load(const float* p, int64_t i) { return static_cast<double>(p[i]); }
__device__ __forceinline__ double load(const __half* p, int64_t i) { return static_cast<double>(__half2float(p[i])); }
__device__ __forceinline__ double load(const __nv_bfloat16* p, int64_t i) {
  return static_cast<double>(__bfloat162float(p[i]));
}

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

__global__ void argmax_final_kernel(DppWorkspace ws) {
  if (*ws.stopped) return;
  double bv = -INFINITY;
  int64_t bi = -1;
  for (int b = threadIdx.x; b < ws.num_blocks; b += blockDim.x) arg_better(bv, bi, ws.block_val[b], ws.block_idx[b]);
  block_argmax(bv, bi);
  if (threadIdx.x == 0) {
    *ws.best_idx = bi;
    *ws.best_val = bv;
  }
}

__global__ void record_kernel(int64_t t, double eps, DppWorkspace ws, int64_t* out_idx, double* out_resid) {
  if (*ws.stopped) return;
  const int64_t j = *ws.best_idx;
  const double v = *ws.best_val;
  if (j < 0 || !(v > eps)) {
    *ws.stopped = 1;
    return;
  }
  out_idx[t] = j;
  out_resid[t] = v;
  ws.d2[j] = -INFINITY;
}

template <typename T>
__global__ void build_kernel(const T* __restrict__ x, int64_t d, int64_t t, DppWorkspace ws) {
  if (*ws.stopped) return;
  const int64_t j = *ws.best_idx;
  const double s = ws.scale[j];
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < d + t;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x)
    ws.vec[c] = c < d ? s * load(x + j * d, c) : 0.0;
}

// coef[s] = q_s . vec, one warp per earlier direction s < t.
__global__ void gs_coef_kernel(int64_t d, int64_t k_max, int64_t t, bool use_e, DppWorkspace ws) {
  if (*ws.stopped) return;
  const int lane = threadIdx.x & 31;
  const int64_t s = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (s >= t) return;
  const double* qs = ws.qd + s * d;
  double acc = 0.0;
  for (int64_t c = lane; c < d; c += 32) acc += qs[c] * ws.vec[c];
  if (use_e) {
    const double* es = ws.qe + s * k_max;
    for (int64_t u = lane; u <= s; u += 32) acc += es[u] * ws.vec[d + u];
  }
  acc = warp_sum(acc);
  if (lane == 0) ws.coef[s] = acc;
}

// vec -= Q^T coef: thread per output coordinate (feature part, then private part).
__global__ void gs_sub_kernel(int64_t d, int64_t k_max, int64_t t, bool use_e, DppWorkspace ws) {
  if (*ws.stopped) return;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < d) {
    double acc = 0.0;
    for (int64_t s = 0; s < t; ++s) acc += ws.coef[s] * ws.qd[s * d + c];
    ws.vec[c] -= acc;
  } else if (use_e && c < d + t) {
    const int64_t u = c - d;
    double acc = 0.0;
    for (int64_t s = u; s < t; ++s) acc += ws.coef[s] * ws.qe[s * k_max + u];
    ws.vec[c] -= acc;
  }
}

__global__ void finish_kernel(int64_t d, int64_t k_max, int64_t t, bool use_e, double ridge,
                              const double* __restrict__ rel, DppWorkspace ws) {
  if (*ws.stopped) return;
  const double inv = rsqrt(*ws.best_val);
  const int64_t j = *ws.best_idx;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c <= d + t;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (c < d) {
      ws.qd[t * d + c] = ws.vec[c] * inv;
    } else if (use_e) {
      const int64_t u = c - d;
      ws.qe[t * k_max + u] = (u == t ? sqrt(ridge) * rel[j] : ws.vec[c]) * inv;
    }
  }
}

template <typename T>
__global__ void update_kernel(const T* __restrict__ x, int64_t n, int64_t d, int64_t t, DppWorkspace ws) {
  if (*ws.stopped) return;
  const double* q = ws.qd + t * d;
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
    for (int64_t c = lane; c < d; c += 32) acc += load(xi, c) * q[c];
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
  argmax_final_kernel<<<1, 1024, 0, st>>>(ws);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int picks_impl(const T* x, int64_t n, int64_t d, int64_t k_max, const double* rel, double ridge, double eps,
               int64_t t0, int64_t count, DppWorkspace ws, int64_t* out_idx, double* out_resid, cudaStream_t st) {
  const bool use_e = ridge > 0.0;
  for (int64_t t = t0; t < t0 + count && t < k_max; ++t) {
    record_kernel<<<1, 1, 0, st>>>(t, eps, ws, out_idx, out_resid);
    const int64_t len = d + t + 1;
    const int vec_blocks = static_cast<int>((len + kThreads - 1) / kThreads);
    build_kernel<T><<<vec_blocks, kThreads, 0, st>>>(x, d, t, ws);
    if (t > 0) {
      for (int pass = 0; pass < 2; ++pass) {
        const int coef_blocks = static_cast<int>((t + kWarps - 1) / kWarps);
        gs_coef_kernel<<<coef_blocks, kThreads, 0, st>>>(d, k_max, t, use_e, ws);
        gs_sub_kernel<<<vec_blocks, kThreads, 0, st>>>(d, k_max, t, use_e, ws);
      }
    }
    finish_kernel<<<vec_blocks, kThreads, 0, st>>>(d, k_max, t, use_e, ridge, rel, ws);
    update_kernel<T><<<ws.num_blocks, kThreads, 0, st>>>(x, n, d, t, ws);
    argmax_final_kernel<<<1, 1024, 0, st>>>(ws);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int dpp_num_blocks(int64_t n) {
  const int64_t want = (n + kWarps - 1) / kWarps;
  return static_cast<int>(want < kMaxBlocks ? (want > 0 ? want : 1) : kMaxBlocks);
}

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

int dpp_picks(const void* x, DType dtype, int64_t n, int64_t d, int64_t k_max, const double* relevance,
              double ridge, double eps, int64_t t0, int64_t count, DppWorkspace ws, int64_t* out_idx,
              double* out_resid, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return picks_impl(static_cast<const float*>(x), n, d, k_max, relevance, ridge, eps, t0, count, ws, out_idx, out_resid, st);
    case DType::kFloat16:
      return picks_impl(static_cast<const __half*>(x), n, d, k_max, relevance, ridge, eps, t0, count, ws, out_idx, out_resid, st);
    case DType::kBFloat16:
      return picks_impl(static_cast<const __nv_bfloat16*>(x), n, d, k_max, relevance, ridge, eps, t0, count, ws, out_idx,
                        out_resid, st);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace cuda
}  // namespace metamoe
