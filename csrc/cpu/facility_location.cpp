// Greedy facility location on a sparse similarity graph, with exact incremental gains (C++/OpenMP).
//
// Objective: f(A) = sum_i w_i max(0, max_{j in A} s_ij) over ground points i, candidates j.
// Input: the graph as CSR "ground point -> candidates" (row i holds (j, s_ij), e.g. i's kNN among the
// pool). FacilityLocationTranspose builds, once per graph, the transpose "candidate -> ground points",
// keeping only entries with s_ij > 0 (the others never contribute), each row in increasing ground index,
// so that the gain
//     gain_j = sum_{(i, s_ij) in T_j} w_i max(0, s_ij - cur_i),   cur_i = current coverage of i,
// is always summed in the same order (the same float64 value whenever it is evaluated). The transpose does
// not depend on the weights: a ground point with w_i = 0 adds w_i * d = +0.0 to a gain (the same float64
// sum as leaving it out) and its coverage is never raised, so one transpose serves every weight vector.
// It is a parallel counting sort: each thread counts the candidates of a contiguous range of ground rows
// (its own histogram), the histograms give every (thread, candidate) a start offset, and each thread
// scatters its rows in increasing order: the rows of T come out in increasing ground index, exactly as a
// serial pass would lay them. Entries are packed (ground index int32 where M < 2^31, similarity float32)
// in one buffer with transparent huge pages requested (fewer page faults and TLB misses on the random
// writes). The transpose references the graph's arrays (no copy; the greedy reads them to mark candidates
// dirty) and keeps a checksum of their bytes, so that a caller can check that a cached transpose still
// belongs to the arrays it is given (matches()).
// Picking j raises cur_i only for the ground points j covers (T_j); only candidates that share one of
// those ground points (G_i) can lose gain, so they are marked dirty: about K^2 work per pick on a
// K-NN graph instead of a pass over the pool.
//   naive:      recompute every gain each pick (OpenMP), argmax (ties to the lowest index); for tests.
//   lazy:       max-priority queue of gains, ordered (gain desc, index asc), a strict total order, so the
//               top is the same whatever the queue's layout (BucketQueue: buckets by the gain's top bits,
//               the highest drained into a small heap; dirty tops refreshed 16 at a time). A clean
//               top holds its exact gain and is the naive argmax (gains only decrease: every other entry's
//               key bounds its gain); a dirty top is recomputed and re-inserted. Same picks as naive.
//   stochastic: Mirzasoleiman et al. (AAAI 2015): each pick evaluates a uniform sample (without
//               replacement, partial Fisher-Yates, mt19937_64 seeded) of the unpicked candidates and
//               takes its best; cached gains are reused unless dirty.
// Coverage cur_i is always 0 or one of the float32 similarities, so it is held as float32 (exact); with
// equal weights (w_i = c for every i) the gain reads c instead of w_i. Neither changes a float64 value.
// The gain sum is written without fused multiply-add (the default x86-64 build has no FMA), so its
// float64 values match the CUDA kernels' (__dmul_rn/__dadd_rn) bit for bit; a -march=native build may
// contract them and differ in the last bit (picks then agree except on near-exact ties).
// The greedy class keeps the state so that Python can drive the loop in chunks (progress bar, Ctrl-C).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <random>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#ifdef METAMOE_OPENMP
#include <omp.h>
#endif

#include "metamoe/common.h"

namespace py = pybind11;

namespace metamoe {
namespace {

enum Optimizer : int { kNaive = 0, kLazy = 1, kStochastic = 2 };
constexpr int64_t kLazyBatch = 16;  // dirty tops refreshed together by the lazy greedy

inline int max_threads() {
#ifdef METAMOE_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline int thread_id() {
#ifdef METAMOE_OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// An uninitialised array of trivially copyable T, 2 MiB aligned, with transparent huge pages requested
// (Linux) when it spans at least one huge page.
template <class T>
class BigBuffer {
 public:
  BigBuffer() = default;
  explicit BigBuffer(size_t n) { reset(n); }
  BigBuffer(const BigBuffer&) = delete;
  BigBuffer& operator=(const BigBuffer&) = delete;
  ~BigBuffer() { std::free(p_); }

  void reset(size_t n) {
    std::free(p_);
    p_ = nullptr;
    n_ = n;
    if (n == 0) return;
    constexpr size_t kAlign = size_t(1) << 21;
    const size_t bytes = (n * sizeof(T) + kAlign - 1) / kAlign * kAlign;
    void* p = nullptr;
    if (posix_memalign(&p, kAlign, bytes) != 0 || p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, bytes, MADV_HUGEPAGE);
#endif
    p_ = static_cast<T*>(p);
  }
  T* data() { return p_; }
  const T* data() const { return p_; }
  T& operator[](size_t i) { return p_[i]; }
  const T& operator[](size_t i) const { return p_[i]; }
  size_t size() const { return n_; }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

// 64-bit checksum of a byte range: sum over 8-byte words w_k of (w_k ^ (k * A)) * B mod 2^64 (B odd: a
// change to any single word always changes the sum), plus the tail bytes. Parallel, order-free.
uint64_t checksum_bytes(const void* data, size_t bytes, uint64_t salt) {
  constexpr uint64_t A = 0x9E3779B97F4A7C15ull, B = 0xD6E8FEB86659FD93ull;
  const unsigned char* p = static_cast<const unsigned char*>(data);
  const int64_t nw = static_cast<int64_t>(bytes / 8);
  uint64_t acc = 0;
#pragma omp parallel for reduction(+ : acc) schedule(static)
  for (int64_t k = 0; k < nw; ++k) {
    uint64_t w;
    std::memcpy(&w, p + 8 * k, 8);
    acc += (w ^ (static_cast<uint64_t>(k) * A + salt)) * B;
  }
  uint64_t tail = 0;
  std::memcpy(&tail, p + 8 * nw, bytes % 8);
  acc += (tail ^ (static_cast<uint64_t>(nw) * A + salt)) * B;
  return acc ^ (static_cast<uint64_t>(bytes) * A);
}

template <class R>
struct TEntry {
  R row;      // ground index i
  float sim;  // s_ij > 0
};

// The graph's CSR arrays as given (references keep them alive; nothing is copied).
struct GraphRef {
  py::array indptr, indices, sims;
  const int64_t* ip = nullptr;
  const void* ix = nullptr;
  const float* sv = nullptr;
  bool ix64 = false;
  int64_t M = 0, N = 0, nnz = 0;
};

GraphRef graph_ref(py::array indptr, py::array indices, py::array sims, int64_t n_candidates) {
  GraphRef g;
  METAMOE_CHECK(indptr.dtype().is(py::dtype::of<int64_t>()) && (indptr.flags() & py::array::c_style),
                "indptr must be a C-contiguous int64 array");
  METAMOE_CHECK(indptr.ndim() == 1 && indptr.shape(0) >= 2, "indptr must be 1-D with M + 1 >= 2 entries");
  const bool i32 = indices.dtype().is(py::dtype::of<int32_t>());
  const bool i64 = indices.dtype().is(py::dtype::of<int64_t>());
  METAMOE_CHECK((i32 || i64) && (indices.flags() & py::array::c_style),
                "indices must be a C-contiguous int32 or int64 array");
  METAMOE_CHECK(sims.dtype().is(py::dtype::of<float>()) && (sims.flags() & py::array::c_style),
                "similarities must be a C-contiguous float32 array");
  METAMOE_CHECK(n_candidates > 0, "n_candidates must be >= 1, got ", n_candidates);
  g.indptr = indptr;
  g.indices = indices;
  g.sims = sims;
  g.ip = static_cast<const int64_t*>(indptr.data());
  g.ix = indices.data();
  g.sv = static_cast<const float*>(sims.data());
  g.ix64 = i64;
  g.M = indptr.shape(0) - 1;
  g.N = n_candidates;
  g.nnz = g.ip[g.M];
  METAMOE_CHECK(g.ip[0] == 0 && g.nnz >= 0, "indptr must start at 0 and end at nnz >= 0");
  for (int64_t i = 0; i < g.M; ++i)
    METAMOE_CHECK(g.ip[i] <= g.ip[i + 1], "indptr must be non-decreasing (row ", i, ")");
  METAMOE_CHECK(indices.ndim() == 1 && indices.shape(0) == g.nnz, "indices must have shape (", g.nnz, ",)");
  METAMOE_CHECK(sims.ndim() == 1 && sims.shape(0) == g.nnz, "similarities must have shape (", g.nnz, ",)");
  return g;
}

uint64_t graph_checksum(const GraphRef& g) {
  const size_t isz = g.ix64 ? 8 : 4;
  uint64_t h = checksum_bytes(g.ip, sizeof(int64_t) * (g.M + 1), 1);
  h += checksum_bytes(g.ix, isz * g.nnz, 2) * 3;
  h += checksum_bytes(g.sv, sizeof(float) * g.nnz, 3) * 5;
  return h ^ (static_cast<uint64_t>(g.N) * 0x94D049BB133111EBull) ^ (g.ix64 ? 0x5555ull : 0);
}

class FacilityLocationTranspose {
 public:
  FacilityLocationTranspose(py::array indptr, py::array indices, py::array sims, int64_t n_candidates)
      : g_(graph_ref(indptr, indices, sims, n_candidates)) {
    rows64_ = g_.M > static_cast<int64_t>(std::numeric_limits<int32_t>::max());
    py::gil_scoped_release nogil;
    checksum_ = graph_checksum(g_);
    if (g_.ix64) {
      if (rows64_) build<int64_t, int64_t>(); else build<int32_t, int64_t>();
    } else {
      if (rows64_) build<int64_t, int32_t>(); else build<int32_t, int32_t>();
    }
  }

  // Whether this transpose was built from these very arrays (same buffers, shapes, dtypes, n_candidates)
  // and their bytes are unchanged since (checksum).
  bool matches(py::array indptr, py::array indices, py::array sims, int64_t n_candidates) const {
    if (indptr.data() != g_.indptr.data() || indices.data() != g_.indices.data() || sims.data() != g_.sims.data())
      return false;
    if (!indptr.dtype().is(g_.indptr.dtype()) || !indices.dtype().is(g_.indices.dtype()) ||
        !sims.dtype().is(g_.sims.dtype()) || n_candidates != g_.N)
      return false;
    if (indptr.ndim() != 1 || indptr.shape(0) != g_.M + 1 || indices.ndim() != 1 || indices.shape(0) != g_.nnz ||
        sims.ndim() != 1 || sims.shape(0) != g_.nnz)
      return false;
    py::gil_scoped_release nogil;
    return graph_checksum(g_) == checksum_;
  }

  const GraphRef& graph() const { return g_; }
  bool rows64() const { return rows64_; }
  // Whether every ground row lists its candidates by non-increasing similarity (as a kNN search does).
  bool sorted_rows() const { return sorted_rows_; }
  int64_t nnz() const { return t_ptr_[g_.N]; }
  int64_t n_ground() const { return g_.M; }
  int64_t n_candidates() const { return g_.N; }
  const int64_t* t_ptr() const { return t_ptr_.data(); }
  const TEntry<int32_t>* entries32() const { return e32_.data(); }
  const TEntry<int64_t>* entries64() const { return e64_.data(); }
  size_t bytes() const {
    return t_ptr_.size() * sizeof(int64_t) + e32_.size() * sizeof(TEntry<int32_t>) +
           e64_.size() * sizeof(TEntry<int64_t>);
  }

  // The transpose as NumPy arrays (t_ptr int64 (N + 1,), t_row int64, t_sim float32).
  py::tuple to_numpy() const {
    const int64_t nnz = this->nnz();
    py::array_t<int64_t> ptr(static_cast<py::ssize_t>(g_.N + 1));
    py::array_t<int64_t> row(static_cast<py::ssize_t>(nnz));
    py::array_t<float> sim(static_cast<py::ssize_t>(nnz));
    std::copy(t_ptr_.begin(), t_ptr_.end(), ptr.mutable_data());
    int64_t* r = row.mutable_data();
    float* s = sim.mutable_data();
    for (int64_t e = 0; e < nnz; ++e) {
      r[e] = rows64_ ? e64_[e].row : e32_[e].row;
      s[e] = rows64_ ? e64_[e].sim : e32_[e].sim;
    }
    return py::make_tuple(ptr, row, sim);
  }

 private:
  template <class R, class C>
  void build() {
    const int64_t M = g_.M, N = g_.N, nnz = g_.nnz;
    const int64_t* ip = g_.ip;
    const C* ix = static_cast<const C*>(g_.ix);
    const float* sv = g_.sv;
    // Threads: one histogram of N counters each; at most 1 GiB of them, and one thread per 2^16 entries.
    int64_t P = std::max(1, max_threads());
    P = std::min<int64_t>(P, std::max<int64_t>(1, nnz >> 16));
    while (P > 1 && P * N * static_cast<int64_t>(sizeof(int64_t)) > (int64_t(1) << 30)) --P;
    // Contiguous ground-row ranges with about nnz / P entries each.
    std::vector<int64_t> rb(P + 1, M);
    rb[0] = 0;
    for (int64_t p = 1; p < P; ++p)
      rb[p] = std::lower_bound(ip, ip + M + 1, nnz / P * p) - ip;
    for (int64_t p = 1; p <= P; ++p) rb[p] = std::max(rb[p], rb[p - 1]);
    BigBuffer<int64_t> hist(static_cast<size_t>(P * N));
    std::vector<int64_t> bad_idx(P, -1), bad_sim(P, -1);
    std::vector<uint8_t> unsorted(P, 0);
#pragma omp parallel num_threads(static_cast<int>(P))
    {
      const int64_t p = thread_id();
      int64_t* h = hist.data() + p * N;
      std::fill(h, h + N, int64_t(0));
      int64_t bi = -1, bs = -1;
      bool sorted = true;
      for (int64_t i = rb[p]; i < rb[p + 1] && sorted; ++i)
        for (int64_t e = ip[i] + 1; e < ip[i + 1]; ++e)
          if (!(sv[e] <= sv[e - 1])) {
            sorted = false;
            break;
          }
      unsorted[p] = !sorted;
      for (int64_t e = ip[rb[p]]; e < ip[rb[p + 1]]; ++e) {
        const int64_t j = static_cast<int64_t>(ix[e]);
        const float s = sv[e];
        if (j < 0 || j >= N) {
          if (bi < 0) bi = e;
          continue;
        }
        if (!std::isfinite(s)) {
          if (bs < 0) bs = e;
          continue;
        }
        if (s > 0.0f) ++h[j];
      }
      bad_idx[p] = bi;
      bad_sim[p] = bs;
    }
    sorted_rows_ = std::none_of(unsorted.begin(), unsorted.end(), [](uint8_t u) { return u != 0; });
    for (int64_t p = 0; p < P; ++p) {
      METAMOE_CHECK(bad_idx[p] < 0, "graph index at entry ", bad_idx[p], " is outside [0, ", N, ")");
      METAMOE_CHECK(bad_sim[p] < 0, "graph similarity at entry ", bad_sim[p], " is NaN or inf");
    }
    // t_ptr, and each thread's start offset in every candidate row (threads in ground order).
    t_ptr_.assign(N + 1, 0);
    int64_t run = 0;
    for (int64_t j = 0; j < N; ++j) {
      t_ptr_[j] = run;
      for (int64_t p = 0; p < P; ++p) {
        int64_t& c = hist[p * N + j];
        const int64_t cnt = c;
        c = run;
        run += cnt;
      }
    }
    t_ptr_[N] = run;
    BigBuffer<TEntry<R>>& out = entries<R>();
    out.reset(static_cast<size_t>(run));
    TEntry<R>* ent = out.data();
#pragma omp parallel num_threads(static_cast<int>(P))
    {
      const int64_t p = thread_id();
      int64_t* h = hist.data() + p * N;
      for (int64_t i = rb[p]; i < rb[p + 1]; ++i)
        for (int64_t e = ip[i]; e < ip[i + 1]; ++e) {
          const float s = sv[e];
          if (s > 0.0f) ent[h[ix[e]]++] = TEntry<R>{static_cast<R>(i), s};
        }
    }
  }

  template <class R>
  BigBuffer<TEntry<R>>& entries();

  GraphRef g_;
  uint64_t checksum_ = 0;
  bool rows64_ = false, sorted_rows_ = false;
  std::vector<int64_t> t_ptr_;
  BigBuffer<TEntry<int32_t>> e32_;
  BigBuffer<TEntry<int64_t>> e64_;
};

template <>
BigBuffer<TEntry<int32_t>>& FacilityLocationTranspose::entries<int32_t>() {
  return e32_;
}
template <>
BigBuffer<TEntry<int64_t>>& FacilityLocationTranspose::entries<int64_t>() {
  return e64_;
}

struct HeapItem {
  double gain;
  int64_t idx;
};

// Larger gain first, then lower index first.
inline bool before(const HeapItem& a, const HeapItem& b) {
  return a.gain > b.gain || (a.gain == b.gain && a.idx < b.idx);
}

// Max-priority queue of the lazy greedy under before(), for keys that only decrease (a re-keyed top is
// never above its old key). Candidates sit in buckets by the top kBucketBits bits of their gain (for
// gains >= 0 the bit pattern orders as the value, so a lower bucket holds only smaller gains), each bucket
// a singly linked list; the highest non-empty bucket is drained into a small binary heap. A dirty top whose
// fresh gain falls into a lower bucket is a list insert, O(1), instead of a sift down a heap of N entries
// (a cache miss per level); the top is the same item as a heap's.
class BucketQueue {
 public:
  static constexpr int kBucketBits = 20;  // sign, 11 exponent bits, 8 mantissa bits: 256 buckets per octave

  void build(const double* gain, int64_t n) {
    head_.assign(size_t(1) << kBucketBits, -1);
    next_.resize(n);
    key_.assign(gain, gain + n);
    n_ = n;
    top_bucket_ = 0;
    for (int64_t j = n - 1; j >= 0; --j) {
      const uint32_t b = bucket(gain[j]);
      link(b, j);
      top_bucket_ = std::max(top_bucket_, b);
    }
    refill();
  }
  bool empty() const { return n_ == 0; }
  const HeapItem& top() const { return small_.front(); }
  void pop() {
    std::pop_heap(small_.begin(), small_.end(), after);
    small_.pop_back();
    --n_;
    if (small_.empty()) refill();
  }
  // x's gain must not exceed the gain it had when it left the queue (keys only decrease).
  void push(HeapItem x) {
    ++n_;
    const uint32_t b = bucket(x.gain);
    if (b >= top_bucket_) {
      small_.push_back(x);
      std::push_heap(small_.begin(), small_.end(), after);
    } else {
      key_[x.idx] = x.gain;
      link(b, x.idx);
      if (small_.empty()) refill();  // the queue was empty: x's bucket becomes the top
    }
  }

 private:
  static bool after(const HeapItem& a, const HeapItem& b) { return before(b, a); }
  static uint32_t bucket(double g) {
    uint64_t bits;
    std::memcpy(&bits, &g, sizeof bits);
    return static_cast<uint32_t>(bits >> (64 - kBucketBits));  // gains are >= +0.0: the sign bit is 0
  }
  void link(uint32_t b, int64_t j) {
    next_[j] = head_[b];
    head_[b] = j;
  }
  // The highest non-empty bucket into the small heap.
  void refill() {
    if (n_ == 0) return;
    while (head_[top_bucket_] < 0) --top_bucket_;  // n_ > 0 items are listed: stops at a non-empty bucket
    for (int64_t j = head_[top_bucket_]; j >= 0; j = next_[j]) small_.push_back({key_[j], j});
    head_[top_bucket_] = -1;
    std::make_heap(small_.begin(), small_.end(), after);
  }

  std::vector<int64_t> head_, next_;
  std::vector<double> key_;
  std::vector<HeapItem> small_;
  uint32_t top_bucket_ = 0;
  int64_t n_ = 0;
};

inline bool better(double v, int64_t j, double bv, int64_t bj) {
  return bj < 0 || v > bv || (v == bv && j < bj);
}

class GreedyBase {
 public:
  virtual ~GreedyBase() = default;
  virtual py::tuple run(int64_t n) = 0;
  virtual int64_t picked() const = 0;
  virtual int64_t evaluations() const = 0;
  virtual int64_t transposed_nnz() const = 0;
  virtual double objective() const = 0;
  virtual py::array_t<double> coverage() const = 0;
};

template <class R, class C>
class Greedy final : public GreedyBase {
 public:
  Greedy(std::shared_ptr<const FacilityLocationTranspose> tr, const double* w, int64_t max_picks, int optimizer,
         int64_t sample_size, uint64_t seed)
      : tr_(std::move(tr)), rng_(seed) {
    const GraphRef& g = tr_->graph();
    M_ = g.M;
    N_ = g.N;
    K_ = max_picks;
    opt_ = optimizer;
    sample_ = sample_size;
    g_ptr_ = g.ip;
    g_idx_ = static_cast<const C*>(g.ix);
    g_sim_ = g.sv;
    t_ptr_ = tr_->t_ptr();
    t_ent_ = entries(*tr_);
    sorted_rows_ = tr_->sorted_rows();
    w_.assign(w, w + M_);
    uniform_ = true;
    for (int64_t i = 1; i < M_ && uniform_; ++i) uniform_ = w_[i] == w_[0];
    w0_ = M_ > 0 ? w_[0] : 0.0;
    py::gil_scoped_release nogil;
    cur_.assign(M_, 0.0f);
    gain_.assign(N_, 0.0);
    dirty_.assign(N_, 1);
    selected_.assign(N_, 0);
    if (opt_ == kLazy) {
      recompute_all();
      heap_.build(gain_.data(), N_);
    } else if (opt_ == kStochastic) {
      rem_.resize(N_);
      for (int64_t j = 0; j < N_; ++j) rem_[j] = j;
    }
  }

  py::tuple run(int64_t n) override {
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

  int64_t picked() const override { return t_; }
  int64_t evaluations() const override { return evals_; }
  int64_t transposed_nnz() const override { return tr_->nnz(); }

  // f(A) = sum_i w_i cur_i in float64.
  double objective() const override {
    double f = 0.0;
    for (int64_t i = 0; i < M_; ++i) f += w_[i] * static_cast<double>(cur_[i]);
    return f;
  }

  py::array_t<double> coverage() const override {
    py::array_t<double> out(static_cast<py::ssize_t>(M_));
    std::copy(cur_.begin(), cur_.end(), out.mutable_data());
    return out;
  }

 private:
  static const TEntry<R>* entries(const FacilityLocationTranspose& t);

  template <bool kUniform>
  double fresh_gain_impl(int64_t j) const {
    double g = 0.0;
    const TEntry<R>* e = t_ent_ + t_ptr_[j];
    const TEntry<R>* end = t_ent_ + t_ptr_[j + 1];
    for (; e != end; ++e) {
      const int64_t i = static_cast<int64_t>(e->row);
      // max(d, 0): a branch here is taken at random (about half the entries of a late gain are covered
      // already); adding w * +0.0 leaves the float64 sum unchanged (it starts at +0.0, its terms are >= 0)
      const double d = std::max(static_cast<double>(e->sim) - static_cast<double>(cur_[i]), 0.0);
      g += (kUniform ? w0_ : w_[i]) * d;
    }
    return g;
  }

  double fresh_gain(int64_t j) const { return uniform_ ? fresh_gain_impl<true>(j) : fresh_gain_impl<false>(j); }

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

  // A clean top is the pick. Dirty tops are refreshed kLazyBatch at a time (the dirty run at the top of
  // the queue, evaluated in parallel, their loads overlapping); refreshing a dirty candidate a serial loop
  // would have reached later, or not at all, changes no gain and so no pick.
  std::pair<int64_t, double> pick_lazy() {
    for (;;) {
      const HeapItem top = heap_.top();
      if (!dirty_[top.idx]) {
        heap_.pop();
        return {top.idx, top.gain};
      }
      batch_.clear();
      while (static_cast<int64_t>(batch_.size()) < kLazyBatch && !heap_.empty() && dirty_[heap_.top().idx]) {
        batch_.push_back(heap_.top().idx);
        heap_.pop();
      }
      const int64_t nb = static_cast<int64_t>(batch_.size());
#pragma omp parallel for schedule(static, 1) if (nb >= kLazyBatch / 2)
      for (int64_t b = 0; b < nb; ++b) {
        gain_[batch_[b]] = fresh_gain(batch_[b]);
        dirty_[batch_[b]] = 0;
      }
      evals_ += nb;
      for (const int64_t j : batch_) heap_.push({gain_[j], j});
    }
  }

  std::pair<int64_t, double> pick_stochastic() {
    const int64_t R_ = static_cast<int64_t>(rem_.size());
    const int64_t s = std::min(sample_, R_);
    for (int64_t a = 0; a < s && s < R_; ++a) {
      std::uniform_int_distribution<int64_t> dist(a, R_ - 1);
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

  // Adds j to the selection: raise the coverage of the ground points (w_i > 0) j covers, mark the
  // candidates that share them dirty.
  void commit(int64_t j) {
    selected_[j] = 1;
    for (int64_t e = t_ptr_[j]; e < t_ptr_[j + 1]; ++e) {
      const int64_t i = static_cast<int64_t>(t_ent_[e].row);
      const float s = t_ent_[e].sim;
      const float old = cur_[i];
      if (!(s > old) || !(w_[i] > 0.0)) continue;
      cur_[i] = s;
      if (opt_ == kNaive) continue;
      if (sorted_rows_) {  // a row's similarities decrease: the candidates above old come first
        for (int64_t f = g_ptr_[i]; f < g_ptr_[i + 1] && g_sim_[f] > old; ++f)
          dirty_[static_cast<int64_t>(g_idx_[f])] = 1;
      } else {
        for (int64_t f = g_ptr_[i]; f < g_ptr_[i + 1]; ++f)
          if (g_sim_[f] > old) dirty_[static_cast<int64_t>(g_idx_[f])] = 1;
      }
    }
    ++t_;
  }

  std::shared_ptr<const FacilityLocationTranspose> tr_;
  int64_t M_ = 0, N_ = 0, K_ = 0, t_ = 0, sample_ = 1, evals_ = 0;
  int opt_ = kLazy;
  const int64_t* g_ptr_ = nullptr;
  const C* g_idx_ = nullptr;
  const float* g_sim_ = nullptr;
  const int64_t* t_ptr_ = nullptr;
  const TEntry<R>* t_ent_ = nullptr;
  bool uniform_ = false, sorted_rows_ = false;
  double w0_ = 0.0;
  std::vector<double> w_, gain_;
  std::vector<float> cur_;
  std::vector<int64_t> rem_;
  std::vector<uint8_t> dirty_, selected_;
  std::vector<int64_t> batch_;
  BucketQueue heap_;
  std::mt19937_64 rng_;
};

template <>
const TEntry<int32_t>* Greedy<int32_t, int32_t>::entries(const FacilityLocationTranspose& t) {
  return t.entries32();
}
template <>
const TEntry<int32_t>* Greedy<int32_t, int64_t>::entries(const FacilityLocationTranspose& t) {
  return t.entries32();
}
template <>
const TEntry<int64_t>* Greedy<int64_t, int32_t>::entries(const FacilityLocationTranspose& t) {
  return t.entries64();
}
template <>
const TEntry<int64_t>* Greedy<int64_t, int64_t>::entries(const FacilityLocationTranspose& t) {
  return t.entries64();
}

// The Python-facing greedy: checks the arguments, then runs the instance for the transpose's index types.
class FacilityLocationGreedy {
 public:
  FacilityLocationGreedy(std::shared_ptr<FacilityLocationTranspose> transpose,
                         py::array_t<double, py::array::c_style | py::array::forcecast> weights, int64_t max_picks,
                         int optimizer, int64_t sample_size, uint64_t seed) {
    METAMOE_CHECK(transpose != nullptr, "transpose must be a FacilityLocationTranspose, got None");
    const int64_t M = transpose->n_ground(), N = transpose->n_candidates();
    METAMOE_CHECK(max_picks > 0 && max_picks <= N, "max_picks must be in [1, N=", N, "], got ", max_picks);
    METAMOE_CHECK(optimizer >= 0 && optimizer <= 2, "optimizer must be 0 (naive), 1 (lazy) or 2 (stochastic)");
    METAMOE_CHECK(weights.ndim() == 1 && weights.shape(0) == M, "weights must have shape (", M, ",)");
    METAMOE_CHECK(sample_size >= 1, "sample_size must be >= 1, got ", sample_size);
    const double* w = weights.data();
    for (int64_t i = 0; i < M; ++i)
      METAMOE_CHECK(std::isfinite(w[i]) && w[i] >= 0.0, "weights[", i, "] must be finite and >= 0, got ", w[i]);
    const bool r64 = transpose->rows64(), c64 = transpose->graph().ix64;
    if (r64 && c64)
      impl_ = std::make_unique<Greedy<int64_t, int64_t>>(transpose, w, max_picks, optimizer, sample_size, seed);
    else if (r64)
      impl_ = std::make_unique<Greedy<int64_t, int32_t>>(transpose, w, max_picks, optimizer, sample_size, seed);
    else if (c64)
      impl_ = std::make_unique<Greedy<int32_t, int64_t>>(transpose, w, max_picks, optimizer, sample_size, seed);
    else
      impl_ = std::make_unique<Greedy<int32_t, int32_t>>(transpose, w, max_picks, optimizer, sample_size, seed);
  }

  py::tuple run(int64_t n) { return impl_->run(n); }
  int64_t picked() const { return impl_->picked(); }
  int64_t evaluations() const { return impl_->evaluations(); }
  int64_t transposed_nnz() const { return impl_->transposed_nnz(); }
  double objective() const { return impl_->objective(); }
  py::array_t<double> coverage() const { return impl_->coverage(); }

 private:
  std::unique_ptr<GreedyBase> impl_;
};

}  // namespace

void register_facility_location(py::module_& m) {
  py::class_<FacilityLocationTranspose, std::shared_ptr<FacilityLocationTranspose>>(
      m, "FacilityLocationTranspose",
      "Candidate -> ground transpose of a CSR similarity graph (entries s > 0, rows in increasing ground index), "
      "built once per graph (parallel counting sort); references the graph's arrays.")
      .def(py::init<py::array, py::array, py::array, int64_t>(), py::arg("indptr"), py::arg("indices"),
           py::arg("similarities"), py::arg("n_candidates"))
      .def("matches", &FacilityLocationTranspose::matches, py::arg("indptr"), py::arg("indices"),
           py::arg("similarities"), py::arg("n_candidates"),
           "Whether it was built from these arrays (same buffers) and their bytes are unchanged (checksum).")
      .def("to_numpy", &FacilityLocationTranspose::to_numpy, "(t_ptr int64, t_row int64, t_sim float32).")
      .def_property_readonly("nnz", &FacilityLocationTranspose::nnz)
      .def_property_readonly("nbytes", &FacilityLocationTranspose::bytes)
      .def_property_readonly("n_ground", &FacilityLocationTranspose::n_ground)
      .def_property_readonly("n_candidates", &FacilityLocationTranspose::n_candidates)
      .def_property_readonly("int32_rows", [](const FacilityLocationTranspose& t) { return !t.rows64(); })
      .def_property_readonly("sorted_rows", &FacilityLocationTranspose::sorted_rows,
                             "Whether every graph row lists its candidates by non-increasing similarity.");
  py::class_<FacilityLocationGreedy>(m, "FacilityLocationGreedy",
                                     "Greedy facility location on a CSR similarity graph (exact incremental gains).")
      .def(py::init<std::shared_ptr<FacilityLocationTranspose>,
                    py::array_t<double, py::array::c_style | py::array::forcecast>, int64_t, int, int64_t, uint64_t>(),
           py::arg("transpose"), py::arg("weights"), py::arg("max_picks"), py::arg("optimizer"),
           py::arg("sample_size"), py::arg("seed"))
      .def("run", &FacilityLocationGreedy::run, py::arg("n"),
           "Up to n more picks; returns (indices int64, gains float64).")
      .def("objective", &FacilityLocationGreedy::objective, "f(A) = sum_i w_i cur_i (float64).")
      .def("coverage", &FacilityLocationGreedy::coverage, "cur_i = max(0, max_{j in A} s_ij) per ground point.")
      .def_property_readonly("picked", &FacilityLocationGreedy::picked)
      .def_property_readonly("evaluations", &FacilityLocationGreedy::evaluations)
      .def_property_readonly("transposed_nnz", &FacilityLocationGreedy::transposed_nnz);
}

}  // namespace metamoe
