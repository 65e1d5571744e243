// Greedy MAP for the relevance-weighted cosine DPP in feature space, two exact strategies.
//
// Both keep, for every candidate i, the residual d_i^2 = r_i^2 (1 + ridge) - sum_s e_is^2 with
// e_is = r_i xn_i . q_s over the Gram-Schmidt directions q_s of the picks, and pick the largest residual
// (ties to the lowest index). The arithmetic of one candidate is the same in both (the same dots in the
// same order, the same subtractions in pick order), so they give bit-identical picks and residuals.
//
// sweep: after each pick, one pass over the whole pool applies the new direction to every candidate
//   (an N x D matrix-vector product; memory-bound: the pool is streamed once per pick).
// lazy:  a residual never increases as picks are added, so a candidate's last computed residual is an
//   upper bound on its current one. A max-heap holds those bounds; each pick brings only the top of
//   the heap up to date (all the directions added since that candidate's last update, at once: the
//   row is read once for many directions, so the work is compute-bound instead of memory-bound) until
//   the top is current. The top is then the argmax: every other bound is below it, or equal with a
//   larger index, and bounds are never below the residuals they bound. Candidates whose bound stays
//   below the best residual are never read again.
// auto:  lazy, switching for good to the sweep (after bringing every candidate up to date) once the lazy
//   updates so far have cost more than the sweeps of as many picks would have (a cost model in element
//   operations; which strategy ran changes the time, never the picks).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#ifdef METAMOE_OPENMP
#include <omp.h>
#endif

#include "dpp_state.h"

namespace metamoe {
namespace dpp {

enum class Strategy { kSweep, kLazy, kAuto };

inline Strategy parse_strategy(const std::string& s) {
  if (s == "sweep") return Strategy::kSweep;
  if (s == "lazy") return Strategy::kLazy;
  if (s == "auto") return Strategy::kAuto;
  fail("strategy must be 'auto', 'lazy' or 'sweep', got '", s, "'");
}

// The auto strategy's cost model, in units of one element streamed by the sweep (fitted to timings of
// both strategies on a 2-core x86 CPU, N = 200,000, D = 32..768): the sweep costs D + kSweepPerRow per
// candidate and pick; the lazy strategy kUpdateCost per candidate update (heap pop and push, the row
// fetched; a row brought up to date by a refresh of every candidate costs what a sweep's row does),
// kDotCost per row . direction product plus kDotPerElement per element of it.
constexpr double kSweepPerRow = 22.0;
constexpr double kUpdateCost = 570.0;
constexpr double kDotCost = 59.0;
constexpr double kDotPerElement = 0.33;
constexpr int64_t kAutoMinPicks = 4;  // picks before auto may switch
// Lazy updates: directions per group (8 float64 rows of D: 48 KiB at D = 768, L1-sized) and rows per
// span (a thread's unit of work; 16 float32 rows of 768 are 48 KiB, L2-resident across the groups).
constexpr int64_t kGroup = 4;
constexpr int64_t kSpanRows = 16;
// A pick that has updated max(kBulkMin, heap size / kBulkShare) candidates refreshes them all at once.
constexpr int64_t kBulkShare = 16;
constexpr int64_t kBulkMin = 4096;

template <typename S>
class DppGreedyCosine : public DppBase<S> {
  using Base = DppBase<S>;
  using Base::D_;
  using Base::K_;
  using Base::N_;
  using Base::t_;

  struct Bound {
    double value;
    int64_t index;
  };
  // Heap order: std::*_heap keep the largest first; larger value, then lower index, is larger.
  static bool lower(const Bound& a, const Bound& b) {
    return a.value < b.value || (a.value == b.value && a.index > b.index);
  }

 public:
  DppGreedyCosine(py::array_t<typename Base::E, py::array::c_style> X,
                  py::array_t<double, py::array::c_style | py::array::forcecast> relevance, double ridge,
                  int64_t max_picks, const std::string& strategy)
      : Base(X, relevance, ridge, max_picks), strategy_(parse_strategy(strategy)) {
    Qd_.assign(static_cast<size_t>(K_) * D_, 0.0);
    Qe_.assign(static_cast<size_t>(K_) * K_, 0.0);
    if (strategy_ != Strategy::kSweep) start_lazy();
  }

  bool lazy() const { return lazy_; }
  int64_t row_updates() const { return row_updates_; }
  int64_t row_dots() const { return row_dots_; }
  int64_t switched_at() const { return switched_at_; }
  int64_t refreshes() const { return refreshes_; }

 protected:
  Best pick(int64_t j, double dj2) override {
    if (lazy_) {  // j is the current top of the heap
      std::pop_heap(heap_.begin(), heap_.end(), lower);
      heap_.pop_back();
    }
    add_direction(j, dj2);
    this->selected_[j] = 1;
    this->d2_[j] = -std::numeric_limits<double>::infinity();
    if (!lazy_) {
      row_dots_ += N_ - t_ - 1;
      return update_and_argmax();
    }
    const int64_t T = t_ + 1;  // directions that exist now
    const int64_t updates0 = row_updates_, dots0 = row_dots_, bulk0 = bulk_updates_;
    const Best best = lazy_top(T);
    const int64_t updates = row_updates_ - updates0;
    batch_ = std::clamp<int64_t>(updates / 16, 8, 256);
    if (strategy_ == Strategy::kAuto) {
      const double dots = static_cast<double>(row_dots_ - dots0);
      const double bulk = static_cast<double>(bulk_updates_ - bulk0);
      lazy_cost_ += (updates - bulk) * kUpdateCost + bulk * (kSweepPerRow + D_) + dots * (kDotCost + kDotPerElement * D_);
      sweep_cost_ += static_cast<double>(N_ - T) * (kSweepPerRow + D_);
      if (T >= kAutoMinPicks && lazy_cost_ > sweep_cost_) return switch_to_sweep(T);
    }
    return best;
  }

 private:
  void start_lazy() {
    lazy_ = true;
    last_.assign(N_, 0);
    heap_.resize(N_);
    for (int64_t i = 0; i < N_; ++i) heap_[i] = {this->d2_[i], i};
    std::make_heap(heap_.begin(), heap_.end(), lower);
  }

  // Modified Gram-Schmidt of the pick's extended feature vector against the earlier directions.
  void add_direction(int64_t j, double dj2) {
    const Loader ld;
    const S* xj = this->x_ + j * D_;
    const double sj = this->rel_[j] * this->inv_norm_[j];
    double* qd = &Qd_[static_cast<size_t>(t_) * D_];
    double* qe = &Qe_[static_cast<size_t>(t_) * K_];
    for (int64_t d = 0; d < D_; ++d) qd[d] = sj * ld(xj[d]);
    for (int64_t s = 0; s < t_; ++s) {
      const double* qsd = &Qd_[static_cast<size_t>(s) * D_];
      const double* qse = &Qe_[static_cast<size_t>(s) * K_];
      double c = 0.0;
      for (int64_t d = 0; d < D_; ++d) c += qsd[d] * qd[d];
      for (int64_t u = 0; u <= s; ++u) c += qse[u] * qe[u];
      for (int64_t d = 0; d < D_; ++d) qd[d] -= c * qsd[d];
      for (int64_t u = 0; u <= s; ++u) qe[u] -= c * qse[u];
    }
    qe[t_] = std::sqrt(this->ridge_) * this->rel_[j];
    const double inv = 1.0 / std::sqrt(dj2);
    for (int64_t d = 0; d < D_; ++d) qd[d] *= inv;
    for (int64_t u = 0; u <= t_; ++u) qe[u] *= inv;
  }

  // sweep: one pass over the pool: e_i = y_i . q, d_i^2 -= e_i^2, and the next argmax.
  Best update_and_argmax() {
    const double* q = &Qd_[static_cast<size_t>(t_) * D_];
    const S* x = this->x_;
    const uint8_t* selected = this->selected_.data();
    const double* rel = this->rel_.data();
    const double* inv_norm = this->inv_norm_.data();
    double* d2 = this->d2_.data();
    const int64_t N = N_, D = D_;
    Best best{-std::numeric_limits<double>::infinity(), -1};
#pragma omp parallel if (this->parallel_)
    {
      const Loader ld;
      Best local{-std::numeric_limits<double>::infinity(), -1};
#pragma omp for schedule(dynamic, kRowsPerTask) nowait
      for (int64_t i = 0; i < N; ++i) {
        if (selected[i]) continue;
        const double e = rel[i] * inv_norm[i] * dot_row(x + i * D, q, D, ld);
        const double v = d2[i] - e * e;
        d2[i] = v;
        if (better(v, i, local)) local = {v, i};
      }
#pragma omp critical
      if (local.index >= 0 && better(local.value, local.index, best)) best = local;
    }
    return best;
  }

  // lazy: brings the candidates rows[0..n) from last_[i] to T directions. The directions go in groups of
  // kGroup, each group applied to every row of the span before the next (the group's directions stay in
  // L1 while the rows, held in L2, pass); a row's subtractions stay in pick order and its dots are
  // dot_row's (dots_many is bit-identical), so the result is that of T - last_[i] sweeps.
  void update_span(const int64_t* rows, int64_t n, int64_t T) {
    const Loader ld;
    double dots[2][kGroup];
    int64_t first = T;
    for (int64_t b = 0; b < n; ++b) first = std::min<int64_t>(first, last_[rows[b]]);
    for (int64_t g = first; g < T; g += kGroup) {
      const int64_t end = std::min(g + kGroup, T);
      const double* q = &Qd_[static_cast<size_t>(g) * D_];
      int64_t pending = -1;  // a row that needs the whole group, waiting for a second one
      for (int64_t b = 0; b < n; ++b) {
        const int64_t i = rows[b];
        const int64_t a = std::max<int64_t>(g, last_[i]);
        if (a >= end) continue;
        if (a == g && end - g == kGroup) {
          if (pending < 0) {
            pending = i;
            continue;
          }
          dots_many2(this->x_ + pending * D_, this->x_ + i * D_, q, kGroup, D_, dots[0], dots[1], ld);
          subtract(pending, dots[0], kGroup);
          subtract(i, dots[1], kGroup);
          pending = -1;
          continue;
        }
        dots_many(this->x_ + i * D_, &Qd_[static_cast<size_t>(a) * D_], end - a, D_, dots[0], ld);
        subtract(i, dots[0], end - a);
      }
      if (pending >= 0) {
        dots_many(this->x_ + pending * D_, q, kGroup, D_, dots[0], ld);
        subtract(pending, dots[0], kGroup);
      }
    }
    for (int64_t b = 0; b < n; ++b) last_[rows[b]] = static_cast<int32_t>(T);
  }

  // d_i^2 -= (scale_i dot_u)^2 for the m dots of consecutive directions, in order.
  void subtract(int64_t i, const double* dots, int64_t m) {
    const double scale = this->rel_[i] * this->inv_norm_[i];
    double v = this->d2_[i];
    for (int64_t u = 0; u < m; ++u) {
      const double e = scale * dots[u];
      v = v - e * e;
    }
    this->d2_[i] = v;
  }

  // Spans of kSpanRows rows shared out among the threads.
  void update_rows(const std::vector<int64_t>& rows, int64_t T) {
    int64_t work = 0;
    for (const int64_t i : rows) work += T - last_[i];
    row_updates_ += static_cast<int64_t>(rows.size());
    row_dots_ += work;
    const int64_t n = static_cast<int64_t>(rows.size());
    const int64_t spans = (n + kSpanRows - 1) / kSpanRows;
#pragma omp parallel for schedule(dynamic, 1) if (this->parallel_ && spans > 1 && work * D_ >= kParallelWork)
    for (int64_t sp = 0; sp < spans; ++sp) {
      const int64_t a = sp * kSpanRows;
      update_span(rows.data() + a, std::min(kSpanRows, n - a), T);
    }
  }

  // The exact argmax with T directions: update the top of the heap (a batch of the stale bounds at the
  // top, in parallel) until a current residual is on top. Once a pick has updated 1/kBulkShare of the
  // heap, the rest of the stale candidates are brought up to date in one pass and the heap is rebuilt
  // (O(N)), cheaper than popping and pushing them one at a time.
  Best lazy_top(int64_t T) {
    const int64_t bulk = std::max<int64_t>(kBulkMin, static_cast<int64_t>(heap_.size()) / kBulkShare);
    int64_t updated = 0;
    for (;;) {
      if (heap_.empty()) return {-std::numeric_limits<double>::infinity(), -1};
      if (last_[heap_.front().index] == T) return {heap_.front().value, heap_.front().index};
      if (updated >= bulk) {
        refresh_all(T);
        continue;
      }
      rows_.clear();
      while (static_cast<int64_t>(rows_.size()) < batch_ && !heap_.empty() && last_[heap_.front().index] != T) {
        rows_.push_back(heap_.front().index);
        std::pop_heap(heap_.begin(), heap_.end(), lower);
        heap_.pop_back();
      }
      update_rows(rows_, T);
      updated += static_cast<int64_t>(rows_.size());
      for (const int64_t i : rows_) {
        heap_.push_back({this->d2_[i], i});
        std::push_heap(heap_.begin(), heap_.end(), lower);
      }
    }
  }

  // Every candidate not yet picked brought up to T directions, in index order.
  void update_stale(int64_t T) {
    rows_.clear();
    for (int64_t i = 0; i < N_; ++i)
      if (!this->selected_[i] && last_[i] < T) rows_.push_back(i);
    update_rows(rows_, T);
    bulk_updates_ += static_cast<int64_t>(rows_.size());
  }

  void refresh_all(int64_t T) {
    update_stale(T);
    heap_.clear();
    for (int64_t i = 0; i < N_; ++i)
      if (!this->selected_[i]) heap_.push_back({this->d2_[i], i});
    std::make_heap(heap_.begin(), heap_.end(), lower);
    ++refreshes_;
  }

  // auto: every candidate up to date, then the sweep for the remaining picks.
  Best switch_to_sweep(int64_t T) {
    update_stale(T);
    lazy_ = false;
    switched_at_ = T;
    std::vector<Bound>().swap(heap_);
    std::vector<int32_t>().swap(last_);
    return this->argmax();
  }

  Strategy strategy_;
  bool lazy_ = false;
  std::vector<double> Qd_, Qe_;
  std::vector<Bound> heap_;
  std::vector<int32_t> last_;  // directions applied to each candidate's residual
  std::vector<int64_t> rows_;
  int64_t batch_ = 8;
  int64_t row_updates_ = 0, row_dots_ = 0, switched_at_ = -1, refreshes_ = 0, bulk_updates_ = 0;
  double lazy_cost_ = 0.0, sweep_cost_ = 0.0;  // auto: modelled cost of the picks so far, both ways
};

}  // namespace dpp
}  // namespace metamoe
