// State shared by the DPP greedy kernels (cosine and RBF): X read in place, relevance, residuals, inverse
// norms, the picked flags and the argmax bookkeeping; run() drives the picks in chunks for Python.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "dpp_dot.h"
#include "metamoe/common.h"

namespace metamoe {
namespace dpp {

namespace py = pybind11;

struct Best {
  double value;
  int64_t index;
};

// Per-pick passes: rows handed out in tasks of kRowsPerTask (dynamic, so that a thread that the OS
// descheduled on a busy machine does not hold the pick back; each row's arithmetic is the same
// whichever thread runs it, so the picks do not depend on the schedule). Pools with fewer than
// kParallelWork row-elements per pick run on one thread: the fork/join would cost more than the pass.
constexpr int64_t kRowsPerTask = 2048;
constexpr int64_t kParallelWork = int64_t(1) << 19;

// Larger residual wins; equal residuals go to the lower index.
inline bool better(double v, int64_t i, const Best& b) {
  return v > b.value || (v == b.value && i < b.index);
}


// State shared by both kernels: X, relevance, residuals, norms, argmax bookkeeping.
template <typename S>
class DppBase {
 public:
  using E = typename Elem<S>::type;

  DppBase(py::array_t<E, py::array::c_style> X, py::array_t<double, py::array::c_style | py::array::forcecast> relevance,
          double ridge, int64_t max_picks)
      : X_(X), ridge_(ridge) {
    METAMOE_CHECK(X.ndim() == 2, "X must be 2-D (N, D), got ", X.ndim(), " dimensions");
    N_ = X.shape(0);
    D_ = X.shape(1);
    METAMOE_CHECK(N_ > 0 && D_ > 0, "X must be non-empty, got shape (", N_, ", ", D_, ")");
    METAMOE_CHECK(relevance.ndim() == 1 && relevance.shape(0) == N_, "relevance must have shape (", N_,
                  ",), got ", relevance.ndim() == 1 ? std::to_string(relevance.shape(0)) : std::string("a non-1-D array"));
    METAMOE_CHECK(ridge >= 0 && std::isfinite(ridge), "ridge must be finite and >= 0, got ", ridge);
    METAMOE_CHECK(max_picks > 0 && max_picks <= N_, "max_picks must be in [1, N=", N_, "], got ", max_picks);
    K_ = max_picks;
    parallel_ = N_ * D_ >= kParallelWork;
    x_ = reinterpret_cast<const S*>(X_.data());
    inv_norm_.resize(N_);
    d2_.resize(N_);
    rel_.resize(N_);
    selected_.assign(N_, 0);
    const double* r = relevance.data();
    const Loader ld;
    int64_t bad_row = -1, bad_rel = -1;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N_; ++i) {
      const S* xi = x_ + i * D_;
      double ss = 0.0;
      for (int64_t d = 0; d < D_; ++d) {
        const double v = ld(xi[d]);
        ss += v * v;
      }
      const double ri = r[i];
      if (!(ss > 0.0) || !std::isfinite(ss)) {
#pragma omp critical
        if (bad_row < 0 || i < bad_row) bad_row = i;
      }
      if (!(ri >= 0.0 && ri <= 1.0)) {
#pragma omp critical
        if (bad_rel < 0 || i < bad_rel) bad_rel = i;
      }
      rel_[i] = ri;
      inv_norm_[i] = 1.0 / std::sqrt(ss);
      d2_[i] = ri * ri * (1.0 + ridge);
    }
    METAMOE_CHECK(bad_row < 0, "X row ", bad_row, " has zero or non-finite norm; the kernel needs non-zero finite rows");
    METAMOE_CHECK(bad_rel < 0, "relevance[", bad_rel, "] must be in [0, 1]");
    best_ = argmax();
  }
  virtual ~DppBase() = default;

  // Runs up to n more picks; stops early when the best residual is <= eps (returns fewer).
  // Returns (indices, residuals d_j^2 at pick time).
  py::tuple run(int64_t n, double eps) {
    METAMOE_CHECK(n >= 0, "n must be >= 0, got ", n);
    std::vector<int64_t> picks;
    std::vector<double> resid;
    {
      py::gil_scoped_release nogil;
      while (n-- > 0 && t_ < K_) {
        const int64_t j = best_.index;
        const double dj2 = best_.value;
        if (j < 0 || !(dj2 > eps)) {
          exhausted_ = true;
          break;
        }
        picks.push_back(j);
        resid.push_back(dj2);
        best_ = pick(j, dj2);
        ++t_;
      }
    }
    py::array_t<int64_t> idx(static_cast<py::ssize_t>(picks.size()));
    py::array_t<double> res(static_cast<py::ssize_t>(resid.size()));
    std::copy(picks.begin(), picks.end(), idx.mutable_data());
    std::copy(resid.begin(), resid.end(), res.mutable_data());
    return py::make_tuple(idx, res);
  }

  int64_t picked() const { return t_; }
  bool exhausted() const { return exhausted_; }
  double best_residual() const { return best_.index < 0 ? 0.0 : best_.value; }

 protected:
  // Adds pick number t_ (index j, residual dj2), updates every residual, returns the next argmax.
  virtual Best pick(int64_t j, double dj2) = 0;

  Best argmax() const {
    Best best{-std::numeric_limits<double>::infinity(), -1};
#pragma omp parallel
    {
      Best local{-std::numeric_limits<double>::infinity(), -1};
#pragma omp for schedule(static) nowait
      for (int64_t i = 0; i < N_; ++i)
        if (!selected_[i] && better(d2_[i], i, local)) local = {d2_[i], i};
#pragma omp critical
      if (local.index >= 0 && better(local.value, local.index, best)) best = local;
    }
    return best;
  }

  py::array_t<E, py::array::c_style> X_;
  const S* x_ = nullptr;
  double ridge_;
  int64_t N_ = 0, D_ = 0, K_ = 0, t_ = 0;
  bool exhausted_ = false;
  bool parallel_ = true;
  std::vector<double> inv_norm_, d2_, rel_;
  std::vector<uint8_t> selected_;
  Best best_{0.0, -1};
};

}  // namespace dpp
}  // namespace metamoe
