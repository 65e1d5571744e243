// Greedy MAP inference for the relevance-weighted DPP: cosine kernel in feature space, RBF kernel on the fly.
//
// Cosine kernel: L = diag(r) (Xn Xn^T + ridge I) diag(r), Xn the L2-normalised rows of X (N x D).
// Chen et al. (NeurIPS 2018) grow an incremental Cholesky factor: every candidate i keeps its
// residual d_i^2 (the conditional variance given the picks) and a row c_i of the factor, a k x N
// workspace. Here the same quantities come from feature space: with y_i = r_i xn_i, extended by
// sqrt(ridge) r_i on a private coordinate, the factor's new column is e_i = y_i . q with q the
// Gram-Schmidt direction of the pick. So a pick costs at most one N x D matrix-vector product (the
// sweep; the lazy strategy updates only the candidates that can still win, see dpp_cosine.h), the
// workspace is k x (D + k), and the picks are Chen et al.'s (argmax residual, ties to lowest index).
//
// RBF kernel: L = diag(r) (K + ridge I) diag(r), K_ij = exp(-gamma ||xn_i - xn_j||^2) (full rank).
// No feature-space shortcut exists, so this is Chen et al.'s algorithm as written: each pick j
// computes the kernel row K[j, :] from X on the fly (O(N D)) and updates the Cholesky factor
// (O(N t)). The factor is kept k x N as in the paper (row s = c_s over the pool); a task takes a block
// of 2K-16K candidates and streams the t row segments of its block into a cache-resident accumulator
// (vectorisable, no gathers). The caller checks that the k N 8 bytes fit before building it.
//
// Storage: X is read in place in float32, float64, float16 or bfloat16 (the 16-bit types arrive as
// uint16 views, converted in the inner loop: bfloat16 by a 16-bit shift, float16 by F16C's vcvtph2ps
// where the CPU has it (checked at run time; the build stays portable), else through a 64K-entry float
// table (256 KiB, stays in L2)); so a float16 memmap is never copied to float32. All storage types
// share one summation order (dpp_dot.h), so equal values give bit-identical picks and residuals.
// The class keeps the state so that Python can drive the loop in chunks (progress bar, Ctrl-C).
// Arithmetic: everything but the storage of X is float64.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif

#ifdef METAMOE_OPENMP
#include <omp.h>
#endif

#include "dpp_cosine.h"
#include "dpp_dot.h"
#include "dpp_state.h"
#include "metamoe/common.h"

namespace py = pybind11;

namespace metamoe {
namespace {

using dpp::BFloat16;
using dpp::Best;
using dpp::better;
using dpp::DppBase;
using dpp::DppGreedyCosine;
using dpp::dot_row;
using dpp::Elem;
using dpp::Half;
using dpp::kParallelWork;
using dpp::Loader;

template <typename S>
class DppGreedyRbf : public DppBase<S> {
  using Base = DppBase<S>;
  using Base::D_;
  using Base::K_;
  using Base::N_;
  using Base::t_;

 public:
  DppGreedyRbf(py::array_t<typename Base::E, py::array::c_style> X,
               py::array_t<double, py::array::c_style | py::array::forcecast> relevance, double ridge, int64_t max_picks,
               double gamma)
      : Base(X, relevance, ridge, max_picks), gamma_(gamma) {
    METAMOE_CHECK(gamma > 0 && std::isfinite(gamma), "gamma must be finite and > 0, got ", gamma);
    C_.assign(static_cast<size_t>(K_) * N_, 0.0);  // K x N Cholesky rows c_s; the caller checked the memory
    xj_.resize(D_);
    cj_.resize(K_);
  }

 protected:
  Best pick(int64_t j, double dj2) override {
    const Loader ld;
    const S* xj = this->x_ + j * D_;
    for (int64_t d = 0; d < D_; ++d) xj_[d] = ld(xj[d]) * this->inv_norm_[j];  // xn_j in float64
    this->selected_[j] = 1;
    this->d2_[j] = -std::numeric_limits<double>::infinity();
    const double* q = xj_.data();
    const int64_t N = N_, D = D_, t = t_;
    double* C = C_.data();
    for (int64_t s = 0; s < t; ++s) cj_[s] = C[static_cast<size_t>(s) * N + j];  // column j of the factor
    const double* cj = cj_.data();
    const double inv_dj = 1.0 / std::sqrt(dj2);
    const double rj = this->rel_[j];
    const double gamma = gamma_;
    const S* x = this->x_;
    const uint8_t* selected = this->selected_.data();
    const double* rel = this->rel_.data();
    const double* inv_norm = this->inv_norm_.data();
    double* d2 = this->d2_.data();
    double* ct = C + static_cast<size_t>(t) * N;  // the new row c_t
    // Block of candidates per task: large enough that each of the t row segments is a long stream
    // (8K rows measured 1.2x faster than 2K, 1.4x faster than 512, single thread, N = 20K, k = 400),
    // small enough that every thread gets about two tasks. The sums do not depend on the block size.
#ifdef METAMOE_OPENMP
    const int64_t threads = this->parallel_ ? omp_get_max_threads() : 1;
#else
    const int64_t threads = 1;
#endif
    const int64_t block = std::clamp<int64_t>(N / (2 * threads), 2048, 16384);
    const int64_t blocks = (N + block - 1) / block;
    Best best{-std::numeric_limits<double>::infinity(), -1};
#pragma omp parallel if (this->parallel_)
    {
      const Loader ld2;
      std::vector<double> acc(block);
      Best local{-std::numeric_limits<double>::infinity(), -1};
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t a = blk * block, len = std::min(block, N - a);
        // acc_i = sum_s c_s[i] c_s[j]: t contiguous row segments streamed (Chen et al.'s c^T c_j)
        std::fill(acc.begin(), acc.begin() + len, 0.0);
        for (int64_t s = 0; s < t; ++s) {
          const double* cs = C + static_cast<size_t>(s) * N + a;
          const double w = cj[s];
          for (int64_t i = 0; i < len; ++i) acc[i] += cs[i] * w;
        }
        for (int64_t ii = 0; ii < len; ++ii) {
          const int64_t i = a + ii;
          if (selected[i]) continue;
          // ||xn_i - xn_j||^2 = 2 - 2 cos_ij for unit rows
          const double cosv = inv_norm[i] * dot_row(x + i * D, q, D, ld2);
          const double dist2 = std::max(0.0, 2.0 - 2.0 * cosv);
          const double lij = rj * rel[i] * std::exp(-gamma * dist2);
          const double e = (lij - acc[ii]) * inv_dj;
          ct[i] = e;
          const double v = d2[i] - e * e;
          d2[i] = v;
          if (better(v, i, local)) local = {v, i};
        }
      }
#pragma omp critical
      if (local.index >= 0 && better(local.value, local.index, best)) best = local;
    }
    return best;
  }

 private:
  double gamma_;
  std::vector<double> C_, xj_, cj_;
};

template <typename S>
void bind_dpp(py::module_& m, const std::string& suffix) {
  using E = typename Elem<S>::type;
  using Arr = py::array_t<E, py::array::c_style>;
  using Rel = py::array_t<double, py::array::c_style | py::array::forcecast>;
  const std::string base_name = "DppGreedyBase" + suffix;
  py::class_<DppBase<S>>(m, base_name.c_str(), "Greedy MAP state shared by the DPP kernels.")
      .def("run", &DppBase<S>::run, py::arg("n"), py::arg("eps"),
           "Up to n more picks; returns (indices int64, residuals float64); stops early below eps.")
      .def_property_readonly("picked", &DppBase<S>::picked)
      .def_property_readonly("exhausted", &DppBase<S>::exhausted)
      .def_property_readonly("best_residual", &DppBase<S>::best_residual);
  const std::string cos_name = "DppGreedyCosine" + suffix;
  py::class_<DppGreedyCosine<S>, DppBase<S>>(
      m, cos_name.c_str(),
      "Greedy MAP state for the relevance-weighted cosine DPP (feature space); strategy 'sweep', 'lazy' or 'auto'.")
      .def(py::init<Arr, Rel, double, int64_t, std::string>(), py::arg("X"), py::arg("relevance"), py::arg("ridge"),
           py::arg("max_picks"), py::arg("strategy") = "auto")
      .def_property_readonly("lazy", &DppGreedyCosine<S>::lazy, "True while the lazy strategy runs.")
      .def_property_readonly("row_updates", &DppGreedyCosine<S>::row_updates,
                             "Candidates brought up to date by the lazy strategy (its switch included).")
      .def_property_readonly("row_dots", &DppGreedyCosine<S>::row_dots,
                             "Row . direction products so far (a sweep makes N - t per pick).")
      .def_property_readonly("switched_at", &DppGreedyCosine<S>::switched_at,
                             "Picks made when auto switched to the sweep; -1 if it did not.")
      .def_property_readonly("refreshes", &DppGreedyCosine<S>::refreshes,
                             "Picks at which the lazy strategy brought every candidate up to date at once.");
  const std::string rbf_name = "DppGreedyRbf" + suffix;
  py::class_<DppGreedyRbf<S>, DppBase<S>>(
      m, rbf_name.c_str(), "Greedy MAP state for the relevance-weighted RBF DPP (Chen et al., kernel rows on the fly).")
      .def(py::init<Arr, Rel, double, int64_t, double>(), py::arg("X"), py::arg("relevance"), py::arg("ridge"),
           py::arg("max_picks"), py::arg("gamma"));
}

}  // namespace

void register_dpp_greedy(py::module_& m) {
  m.def("dpp_simd", &dpp::simd_path,
        "The DPP dot-product path in use: 'avx512', 'avx' or 'generic' (METAMOE_CPU_SIMD caps it).");
  bind_dpp<float>(m, "F32");
  bind_dpp<double>(m, "F64");
  bind_dpp<Half>(m, "F16");
  bind_dpp<BFloat16>(m, "BF16");
}

}  // namespace metamoe
