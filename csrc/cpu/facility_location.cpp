// Greedy facility location on a sparse similarity graph, with exact incremental gains (C++/OpenMP).
//
// Objective: f(A) = sum_i w_i max(0, max_{j in A} s_ij) over ground points i, candidates j.
// Input: the graph as CSR "ground point -> candidates" (row i holds (j, s_ij), e.g. i's kNN among the
// pool). The constructor builds the transpose "candidate -> ground points", keeping only entries with
// s_ij > 0 and w_i > 0 (the others never contribute), in increasing ground index, so that the gain
//     gain_j = sum_{(i, s_ij) in T_j} w_i max(0, s_ij - cur_i),   cur_i = current coverage of i,
// is always summed in the same order (the same float64 value whenever it is evaluated).
// Picking j raises cur_i only for the ground points j covers (T_j); only candidates that share one of
// those ground points (G_i) can lose gain, so they are marked dirty: about K^2 work per pick on a
// K-NN graph instead of a pass over the pool.
//   naive:      recompute every gain each pick (OpenMP), argmax (ties to the lowest index); for tests.
//   lazy:       max-heap of gains, ordered (gain desc, index asc). A clean top holds its exact gain and
//               is the naive argmax (gains only decrease: every other entry's key bounds its gain); a
//               dirty top is recomputed and pushed back. Same picks as naive.
//   stochastic: Mirzasoleiman et al. (AAAI 2015): each pick evaluates a uniform sample (without
//               replacement, partial Fisher-Yates, mt19937_64 seeded) of the unpicked candidates and
//               takes its best; cached gains are reused unless dirty.
// The gain sum is written without fused multiply-add (the default x86-64 build has no FMA), so its
// float64 values match the CUDA kernels' (__dmul_rn/__dadd_rn) bit for bit; a -march=native build may
// contract them and differ in the last bit (picks then agree except on near-exact ties).
// The class keeps the state so that Python can drive the loop in chunks (progress bar, Ctrl-C).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#ifdef METAMOE_OPENMP
#include <omp.h>
#endif

#include "metamoe/common.h"

namespace py = pybind11;

namespace metamoe {
namespace {

enum Optimizer : int { kNaive = 0, kLazy = 1, kStochastic = 2 };

using HeapItem = std::pair<double, int64_t>;

// std heap is a max-heap under this "less": larger gain first, then lower index first.
struct HeapLess {
  bool operator()(const HeapItem& a, const HeapItem& b) const {
    return a.first < b.first || (a.first == b.first && a.second > b.second);
  }
};

inline bool better(double v, int64_t j, double bv, int64_t bj) {
  return bj < 0 || v > bv || (v == bv && j < bj);
}

class FacilityLocationGreedy {
 public:
  FacilityLocationGreedy(py::array_t<int64_t, py::array::c_style | py::array::forcecast> indptr,
                         py::array_t<int64_t, py::array::c_style | py::array::forcecast> indices,
                         py::array_t<float, py::array::c_style | py::array::forcecast> sims,
                         py::array_t<double, py::array::c_style | py::array::forcecast> weights, int64_t n_candidates,
                         int64_t max_picks, int optimizer, int64_t sample_size, uint64_t seed)
      : rng_(seed) {
    METAMOE_CHECK(indptr.ndim() == 1 && indptr.shape(0) >= 2, "indptr must be 1-D with M + 1 >= 2 entries");
    M_ = indptr.shape(0) - 1;
    N_ = n_candidates;
    METAMOE_CHECK(N_ > 0, "n_candidates must be >= 1, got ", N_);
    METAMOE_CHECK(max_picks > 0 && max_picks <= N_, "max_picks must be in [1, N=", N_, "], got ", max_picks);
    METAMOE_CHECK(optimizer >= 0 && optimizer <= 2, "optimizer must be 0 (naive), 1 (lazy) or 2 (stochastic)");
    METAMOE_CHECK(weights.ndim() == 1 && weights.shape(0) == M_, "weights must have shape (", M_, ",)");
    METAMOE_CHECK(sample_size >= 1, "sample_size must be >= 1, got ", sample_size);
    K_ = max_picks;
    opt_ = optimizer;
    sample_ = sample_size;
    const int64_t* ip = indptr.data();
    const int64_t nnz = ip[M_];
    METAMOE_CHECK(ip[0] == 0 && nnz >= 0, "indptr must start at 0 and end at nnz >= 0");
    for (int64_t i = 0; i < M_; ++i) METAMOE_CHECK(ip[i] <= ip[i + 1], "indptr must be non-decreasing (row ", i, ")");
    METAMOE_CHECK(indices.ndim() == 1 && indices.shape(0) == nnz, "indices must have shape (", nnz, ",)");
    METAMOE_CHECK(sims.ndim() == 1 && sims.shape(0) == nnz, "similarities must have shape (", nnz, ",)");
    const int64_t* ix = indices.data();
    const float* sv = sims.data();
    const double* w = weights.data();
    for (int64_t i = 0; i < M_; ++i)
      METAMOE_CHECK(std::isfinite(w[i]) && w[i] >= 0.0, "weights[", i, "] must be finite and >= 0, got ", w[i]);
    int64_t bad_idx = -1, bad_sim = -1;
    for (int64_t e = 0; e < nnz; ++e) {
      if (ix[e] < 0 || ix[e] >= N_) bad_idx = e;
      if (!std::isfinite(sv[e])) bad_sim = e;
    }
    METAMOE_CHECK(bad_idx < 0, "graph index at entry ", bad_idx, " is outside [0, ", N_, ")");
    METAMOE_CHECK(bad_sim < 0, "graph similarity at entry ", bad_sim, " is NaN or inf");
    g_ptr_.assign(ip, ip + M_ + 1);
    g_idx_.assign(ix, ix + nnz);
    g_sim_.assign(sv, sv + nnz);
    w_.assign(w, w + M_);
    // Transpose, keeping s > 0 and w > 0; rows of T in increasing ground index (deterministic).
    t_ptr_.assign(N_ + 1, 0);
    for (int64_t i = 0; i < M_; ++i) {
      if (!(w_[i] > 0.0)) continue;
      for (int64_t e = ip[i]; e < ip[i + 1]; ++e)
        if (sv[e] > 0.0f) ++t_ptr_[ix[e] + 1];
    }
    for (int64_t j = 0; j < N_; ++j) t_ptr_[j + 1] += t_ptr_[j];
    t_row_.resize(t_ptr_[N_]);
    t_sim_.resize(t_ptr_[N_]);
    {
      std::vector<int64_t> fill(t_ptr_.begin(), t_ptr_.end() - 1);
      for (int64_t i = 0; i < M_; ++i) {
        if (!(w_[i] > 0.0)) continue;
        for (int64_t e = ip[i]; e < ip[i + 1]; ++e) {
          if (!(sv[e] > 0.0f)) continue;
          const int64_t p = fill[ix[e]]++;
          t_row_[p] = i;
          t_sim_[p] = static_cast<double>(sv[e]);
        }
      }
    }
    cur_.assign(M_, 0.0);
    gain_.assign(N_, 0.0);
    dirty_.assign(N_, 1);
    selected_.assign(N_, 0);
    if (opt_ == kLazy) {
      recompute_all();
      heap_.resize(N_);
      for (int64_t j = 0; j < N_; ++j) heap_[j] = {gain_[j], j};
      std::make_heap(heap_.begin(), heap_.end(), HeapLess());
    } else if (opt_ == kStochastic) {
      rem_.resize(N_);
      for (int64_t j = 0; j < N_; ++j) rem_[j] = j;
    }
  }

  // Up to n more picks; returns (indices int64, gains float64).
  py::tuple run(int64_t n) {
    METAMOE_CHECK(n >= 0, "n must be >= 0, got ", n);
    std::vector<int64_t> picks;
    std::vector<double> gains;
    {
      py::gil_scoped_release nogil;
      while (n-- > 0 && t_ < K_) {
        std::pair<int64_t, double> p = opt_ == kNaive ? pick_naive() : opt_ == kLazy ? pick_lazy() : pick_stochastic();
        picks.push_back(p.first);
        gains.push_back(p.second);
        commit(p.first);
      }
    }
    py::array_t<int64_t> idx(static_cast<py::ssize_t>(picks.size()));
    py::array_t<double> gn(static_cast<py::ssize_t>(gains.size()));
    std::copy(picks.begin(), picks.end(), idx.mutable_data());
    std::copy(gains.begin(), gains.end(), gn.mutable_data());
    return py::make_tuple(idx, gn);
  }

  int64_t picked() const { return t_; }
  int64_t evaluations() const { return evals_; }
  int64_t transposed_nnz() const { return t_ptr_[N_]; }

  // f(A) = sum_i w_i cur_i in float64.
  double objective() const {
    double f = 0.0;
    for (int64_t i = 0; i < M_; ++i) f += w_[i] * cur_[i];
    return f;
  }

  py::array_t<double> coverage() const {
    py::array_t<double> out(static_cast<py::ssize_t>(M_));
    std::copy(cur_.begin(), cur_.end(), out.mutable_data());
    return out;
  }

 private:
  double fresh_gain(int64_t j) const {
    double g = 0.0;
    for (int64_t e = t_ptr_[j]; e < t_ptr_[j + 1]; ++e) {
      const int64_t i = t_row_[e];
      const double d = t_sim_[e] - cur_[i];
      if (d > 0.0) g += w_[i] * d;
    }
    return g;
  }

  void recompute_all() {
#pragma omp parallel for schedule(dynamic, 1024)
    for (int64_t j = 0; j < N_; ++j) {
      if (!selected_[j]) gain_[j] = fresh_gain(j);
      dirty_[j] = 0;
    }
    evals_ += N_ - t_;
  }

  double gain_of(int64_t j) {
    if (dirty_[j]) {
      gain_[j] = fresh_gain(j);
      dirty_[j] = 0;
      ++evals_;
    }
    return gain_[j];
  }

  std::pair<int64_t, double> pick_naive() {
    recompute_all();
    int64_t best = -1;
    double bv = 0.0;
#pragma omp parallel
    {
      int64_t lb = -1;
      double lv = 0.0;
#pragma omp for schedule(static) nowait
      for (int64_t j = 0; j < N_; ++j)
        if (!selected_[j] && better(gain_[j], j, lv, lb)) {
          lv = gain_[j];
          lb = j;
        }
#pragma omp critical
      if (lb >= 0 && better(lv, lb, bv, best)) {
        bv = lv;
        best = lb;
      }
    }
    return {best, bv};
  }

  std::pair<int64_t, double> pick_lazy() {
    for (;;) {
      std::pop_heap(heap_.begin(), heap_.end(), HeapLess());
      HeapItem top = heap_.back();
      heap_.pop_back();
      const int64_t j = top.second;
      if (!dirty_[j]) return {j, top.first};
      heap_.push_back({gain_of(j), j});
      std::push_heap(heap_.begin(), heap_.end(), HeapLess());
    }
  }

  std::pair<int64_t, double> pick_stochastic() {
    const int64_t R = static_cast<int64_t>(rem_.size());
    const int64_t s = std::min(sample_, R);
    for (int64_t a = 0; a < s && s < R; ++a) {
      std::uniform_int_distribution<int64_t> dist(a, R - 1);
      std::swap(rem_[a], rem_[dist(rng_)]);
    }
    int64_t best = -1, pos = -1;
    double bv = 0.0;
    for (int64_t a = 0; a < s; ++a) {
      const int64_t j = rem_[a];
      const double g = gain_of(j);
      if (better(g, j, bv, best)) {
        bv = g;
        best = j;
        pos = a;
      }
    }
    rem_[pos] = rem_.back();
    rem_.pop_back();
    return {best, bv};
  }

  // Adds j to the selection: raise the coverage of the ground points j covers, mark the candidates
  // that share them dirty.
  void commit(int64_t j) {
    selected_[j] = 1;
    for (int64_t e = t_ptr_[j]; e < t_ptr_[j + 1]; ++e) {
      const int64_t i = t_row_[e];
      const double s = t_sim_[e];
      const double old = cur_[i];
      if (!(s > old)) continue;
      cur_[i] = s;
      if (opt_ == kNaive) continue;
      for (int64_t f = g_ptr_[i]; f < g_ptr_[i + 1]; ++f)
        if (static_cast<double>(g_sim_[f]) > old) dirty_[g_idx_[f]] = 1;
    }
    ++t_;
  }

  int64_t M_ = 0, N_ = 0, K_ = 0, t_ = 0, sample_ = 1, evals_ = 0;
  int opt_ = kLazy;
  std::vector<int64_t> g_ptr_, g_idx_, t_ptr_, t_row_, rem_;
  std::vector<float> g_sim_;
  std::vector<double> w_, t_sim_, cur_, gain_;
  std::vector<uint8_t> dirty_, selected_;
  std::vector<HeapItem> heap_;
  std::mt19937_64 rng_;
};

}  // namespace

void register_facility_location(py::module_& m) {
  py::class_<FacilityLocationGreedy>(m, "FacilityLocationGreedy",
                                     "Greedy facility location on a CSR similarity graph (exact incremental gains).")
      .def(py::init<py::array_t<int64_t, py::array::c_style | py::array::forcecast>,
                    py::array_t<int64_t, py::array::c_style | py::array::forcecast>,
                    py::array_t<float, py::array::c_style | py::array::forcecast>,
                    py::array_t<double, py::array::c_style | py::array::forcecast>, int64_t, int64_t, int, int64_t,
                    uint64_t>(),
           py::arg("indptr"), py::arg("indices"), py::arg("similarities"), py::arg("weights"),
           py::arg("n_candidates"), py::arg("max_picks"), py::arg("optimizer"), py::arg("sample_size"),
           py::arg("seed"))
      .def("run", &FacilityLocationGreedy::run, py::arg("n"),
           "Up to n more picks; returns (indices int64, gains float64).")
      .def("objective", &FacilityLocationGreedy::objective, "f(A) = sum_i w_i cur_i (float64).")
      .def("coverage", &FacilityLocationGreedy::coverage, "cur_i = max(0, max_{j in A} s_ij) per ground point.")
      .def_property_readonly("picked", &FacilityLocationGreedy::picked)
      .def_property_readonly("evaluations", &FacilityLocationGreedy::evaluations)
      .def_property_readonly("transposed_nnz", &FacilityLocationGreedy::transposed_nnz);
}

}  // namespace metamoe
