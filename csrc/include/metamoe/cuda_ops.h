// Launchers of the CUDA kernels, callable from host code that never includes CUDA device headers.
// Every pointer is a device pointer; every launcher is asynchronous on `stream` and returns the
// cudaError_t of its last launch (0 = success) so that the binding can raise with the error text.
#pragma once

#include <cstdint>

namespace metamoe {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Workspace of the feature-space DPP greedy; all buffers are allocated by the caller (torch).
struct DppWorkspace {
  double* scale;        // (N)  r_i / ||x_i||
  double* d2;           // (N)  residuals; -inf once picked
  double* qd;           // (K, D) the directions (feature part; the ridge's private part is never needed)
  double* coef;         // (K)  projection coefficients of the current pick
  double* partial;      // (dpp_partial_chunks(K), D) partial sums of the projection
  double* block_val;    // (num_blocks) per-block best residual
  int64_t* block_idx;   // (num_blocks) per-block best index
  int64_t* best_idx;    // (1) the current pick
  double* best_val;     // (1) its residual
  int32_t* bad_row;     // (1) first zero/non-finite row found by init (INT32_MAX if none)
  int32_t* stopped;     // (1) set once the best residual falls below eps
  int32_t num_blocks;   // blocks of the update kernel
};

int dpp_num_blocks(int64_t n);

// Rows of the workspace's partial sums for up to K picks.
int64_t dpp_partial_chunks(int64_t k_max);

// Initialises scale/d2 from X and relevance (float64, device) and the per-block argmax.
int dpp_init(const void* x, DType dtype, int64_t n, int64_t d, const double* relevance, double ridge,
             DppWorkspace ws, void* stream);

// Picks number t0 .. t0 + count - 1 (stops writing once the residual is <= eps; `stopped` tells).
// out_idx (K) int64 and out_resid (K) float64 receive the picks.
int dpp_picks(const void* x, DType dtype, int64_t n, int64_t d, int64_t k_max, double eps, int64_t t0,
              int64_t count, DppWorkspace ws, int64_t* out_idx, double* out_resid, void* stream);

// ---- facility location (csrc/cuda/facility_location.cu) -----------------------------------------

// The graph in both orientations, all device arrays (see csrc/cpu/facility_location.cpp):
// T: candidate -> ground points (entries with s > 0 and w > 0, rows in increasing ground index);
// G: ground point -> candidates (the kNN graph as built).
struct FlGraph {
  const int64_t* t_ptr;  // (N + 1)
  const int64_t* t_row;  // (nnz_T) ground point of each entry
  const float* t_sim;    // (nnz_T)
  const int64_t* g_ptr;  // (M + 1)
  const int64_t* g_idx;  // (nnz_G) candidate of each entry
  const float* g_sim;    // (nnz_G)
  const double* weight;  // (M) ground weights w_i >= 0
  int64_t n_candidates;  // N
  int64_t n_ground;      // M
};

struct FlWorkspace {
  double* cur;                      // (M) coverage cur_i, zero-initialised by the caller
  double* gain;                     // (N) exact gains
  int32_t* dirty;                   // (N) flags
  int32_t* selected;                // (N) flags
  int64_t* dirty_list;              // (N)
  unsigned long long* dirty_count;  // (1)
  double* block_val;                // (num_blocks)
  int64_t* block_idx;               // (num_blocks)
  int64_t* best_idx;                // (1)
  int32_t num_blocks;
};

int fl_num_blocks(int64_t n);

// Computes every gain (cur = 0) and the first per-block argmax.
int fl_init(FlGraph g, FlWorkspace ws, void* stream);

// Picks t0 .. t0 + count - 1 into out_idx (K) int64 and out_gain (K) float64; no host sync.
int fl_picks(FlGraph g, FlWorkspace ws, int64_t t0, int64_t count, int64_t* out_idx, double* out_gain,
             void* stream);

}  // namespace cuda
}  // namespace metamoe
