// Greedy MAP inference for the relevance-weighted cosine DPP, solved in feature space.
//
// Kernel: L = diag(r) (Xn Xn^T + ridge I) diag(r), Xn the L2-normalised rows of X (N x D).
// Chen et al. (NeurIPS 2018) grow an incremental Cholesky factor: every candidate i keeps its
// residual d_i^2 (the conditional variance given the picks) and a row c_i of the factor, a k x N
// workspace. Here the same quantities come from feature space: with y_i = r_i xn_i, extended by
// sqrt(ridge) r_i on a private coordinate, the factor's new column is e_i = y_i . q with q the
// Gram-Schmidt direction of the pick. So each pick costs one N x D matrix-vector product, the
// workspace is k x (D + k), and the picks are Chen et al.'s (argmax residual, ties to lowest index).
//
// The class keeps the state so that Python can drive the loop in chunks (progress bar, Ctrl-C).
// Arithmetic: X is read in its storage type, everything else is float64.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <limits>
#include <vector>

#ifdef METAMOE_OPENMP
#include <omp.h>
#endif

#include "metamoe/common.h"

namespace py = pybind11;

namespace metamoe {
namespace {

struct Best {
  double value;
  int64_t index;
};

// Larger residual wins; equal residuals go to the lower index.
inline bool better(double v, int64_t i, const Best& b) {
  return v > b.value || (v == b.value && i < b.index);
}

template <typename T>
class DppGreedyCosine {
 public:
  DppGreedyCosine(py::array_t<T, py::array::c_style> X, py::array_t<double, py::array::c_style | py::array::forcecast> relevance,
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
    scale_.resize(N_);
    d2_.resize(N_);
    rel_.resize(N_);
    selected_.assign(N_, 0);
    Qd_.assign(static_cast<size_t>(K_) * D_, 0.0);
    Qe_.assign(static_cast<size_t>(K_) * K_, 0.0);
    const T* x = X_.data();
    const double* r = relevance.data();
    int64_t bad_row = -1, bad_rel = -1;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N_; ++i) {
      const T* xi = x + i * D_;
      double ss = 0.0;
      for (int64_t d = 0; d < D_; ++d) ss += static_cast<double>(xi[d]) * static_cast<double>(xi[d]);
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
      scale_[i] = ri / std::sqrt(ss);
      d2_[i] = ri * ri * (1.0 + ridge);
    }
    METAMOE_CHECK(bad_row < 0, "X row ", bad_row, " has zero or non-finite norm; cosine similarity needs non-zero finite rows");
    METAMOE_CHECK(bad_rel < 0, "relevance[", bad_rel, "] must be in [0, 1]");
    best_ = argmax();
  }

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
        add_direction(j, dj2);
        selected_[j] = 1;
        d2_[j] = -std::numeric_limits<double>::infinity();
        ++t_;
        best_ = update_and_argmax();
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

 private:
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

  // Modified Gram-Schmidt of the pick's extended feature vector against the earlier directions.
  void add_direction(int64_t j, double dj2) {
    const T* xj = X_.data() + j * D_;
    double* qd = &Qd_[static_cast<size_t>(t_) * D_];
    double* qe = &Qe_[static_cast<size_t>(t_) * K_];
    for (int64_t d = 0; d < D_; ++d) qd[d] = scale_[j] * static_cast<double>(xj[d]);
    for (int64_t s = 0; s < t_; ++s) {
      const double* qsd = &Qd_[static_cast<size_t>(s) * D_];
      const double* qse = &Qe_[static_cast<size_t>(s) * K_];
      double c = 0.0;
      for (int64_t d = 0; d < D_; ++d) c += qsd[d] * qd[d];
      for (int64_t u = 0; u <= s; ++u) c += qse[u] * qe[u];
      for (int64_t d = 0; d < D_; ++d) qd[d] -= c * qsd[d];
      for (int64_t u = 0; u <= s; ++u) qe[u] -= c * qse[u];
    }
    qe[t_] = std::sqrt(ridge_) * rel_[j];
    const double inv = 1.0 / std::sqrt(dj2);
    for (int64_t d = 0; d < D_; ++d) qd[d] *= inv;
    for (int64_t u = 0; u <= t_; ++u) qe[u] *= inv;
  }

  // One pass over the pool: e_i = y_i . q, d_i^2 -= e_i^2, and the next argmax.
  Best update_and_argmax() {
    const double* q = &Qd_[static_cast<size_t>(t_ - 1) * D_];
    const T* x = X_.data();
    Best best{-std::numeric_limits<double>::infinity(), -1};
#pragma omp parallel
    {
      Best local{-std::numeric_limits<double>::infinity(), -1};
#pragma omp for schedule(static) nowait
      for (int64_t i = 0; i < N_; ++i) {
        if (selected_[i]) continue;
        const T* xi = x + i * D_;
        double acc0 = 0.0, acc1 = 0.0, acc2 = 0.0, acc3 = 0.0;
        int64_t d = 0;
        for (; d + 4 <= D_; d += 4) {
          acc0 += static_cast<double>(xi[d]) * q[d];
          acc1 += static_cast<double>(xi[d + 1]) * q[d + 1];
          acc2 += static_cast<double>(xi[d + 2]) * q[d + 2];
          acc3 += static_cast<double>(xi[d + 3]) * q[d + 3];
        }
        for (; d < D_; ++d) acc0 += static_cast<double>(xi[d]) * q[d];
        const double e = scale_[i] * ((acc0 + acc1) + (acc2 + acc3));
        const double v = d2_[i] - e * e;
        d2_[i] = v;
        if (better(v, i, local)) local = {v, i};
      }
#pragma omp critical
      if (local.index >= 0 && better(local.value, local.index, best)) best = local;
    }
    return best;
  }

  py::array_t<T, py::array::c_style> X_;
  double ridge_;
  int64_t N_ = 0, D_ = 0, K_ = 0, t_ = 0;
  bool exhausted_ = false;
  std::vector<double> scale_, d2_, rel_, Qd_, Qe_;
  std::vector<uint8_t> selected_;
  Best best_{0.0, -1};
};

template <typename T>
void bind_dpp(py::module_& m, const char* name) {
  py::class_<DppGreedyCosine<T>>(m, name, "Greedy MAP state for the relevance-weighted cosine DPP (feature space).")
      .def(py::init<py::array_t<T, py::array::c_style>, py::array_t<double, py::array::c_style | py::array::forcecast>,
                    double, int64_t>(),
           py::arg("X"), py::arg("relevance"), py::arg("ridge"), py::arg("max_picks"))
      .def("run", &DppGreedyCosine<T>::run, py::arg("n"), py::arg("eps"),
           "Up to n more picks; returns (indices int64, residuals float64); stops early below eps.")
      .def_property_readonly("picked", &DppGreedyCosine<T>::picked)
      .def_property_readonly("exhausted", &DppGreedyCosine<T>::exhausted)
      .def_property_readonly("best_residual", &DppGreedyCosine<T>::best_residual);
}

}  // namespace

void register_dpp_greedy(py::module_& m) {
  bind_dpp<float>(m, "DppGreedyCosineF32");
  bind_dpp<double>(m, "DppGreedyCosineF64");
}

}  // namespace metamoe
