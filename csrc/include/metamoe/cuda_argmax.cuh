// Device helpers shared by the CUDA kernels: warp sums and (value, index) argmax reductions with
// the library-wide tie rule (larger value wins; equal values go to the lower index; index -1 = none).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace metamoe {
namespace cuda {

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ void arg_better(double& bv, int64_t& bi, double v, int64_t i) {
  if (i < 0) return;
  if (bi < 0 || v > bv || (v == bv && i < bi)) {
    bv = v;
    bi = i;
  }
}

__device__ __forceinline__ void warp_argmax(double& v, int64_t& i) {
  for (int o = 16; o > 0; o >>= 1) {
    double ov = __shfl_xor_sync(0xffffffffu, v, o);
    int64_t oi = __shfl_xor_sync(0xffffffffu, i, o);
    arg_better(v, i, ov, oi);
  }
}

// Block-level argmax of one (v, i) per thread; thread 0 holds the result. Every thread must call it.
__device__ __forceinline__ void block_argmax(double& v, int64_t& i) {
  __shared__ double sv[32];
  __shared__ int64_t si[32];
  warp_argmax(v, i);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sv[warp] = v;
    si[warp] = i;
  }
  __syncthreads();
  const int nw = (blockDim.x + 31) / 32;
  if (warp == 0) {
    v = lane < nw ? sv[lane] : -INFINITY;
    i = lane < nw ? si[lane] : -1;
    warp_argmax(v, i);
  }
}

}  // namespace cuda
}  // namespace metamoe
