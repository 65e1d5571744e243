// Storage types and dot products of the DPP greedy: a pool row (float32, float64, float16 or bfloat16 in
// place) against float64 directions, in one summation order for every storage type and code path.
//
// The order: eight lane accumulators a[l] += x[d + l] q[d + l] over blocks of 8 (a multiply, then an add:
// the build compiles with -ffp-contract=off, so no path fuses them), combined as
// ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)), plus the tail summed in order. The AVX paths hold
// the lanes in two 4-wide registers, the AVX-512 paths in one 8-wide register; all give bit-identical
// results, so equal values in any storage give the same picks and residuals, and so do the sweep (one
// direction per row) and the lazy greedy (many directions per row, dots_many).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif

namespace metamoe {
namespace dpp {

// 16-bit storage tags (same layout as uint16_t).
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

// The pybind11 element type through which each storage type arrives.
template <typename S>
struct Elem {
  using type = S;
};
template <>
struct Elem<Half> {
  using type = uint16_t;
};
template <>
struct Elem<BFloat16> {
  using type = uint16_t;
};

float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

const float* half_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t h = 0; h < 65536; ++h) t[h] = half_bits_to_float(static_cast<uint16_t>(h));
    return t;
  }();
  return table.data();
}

struct Loader {
  const float* half = half_table();
  inline double operator()(float v) const { return static_cast<double>(v); }
  inline double operator()(double v) const { return v; }
  inline double operator()(Half v) const { return static_cast<double>(half[v.bits]); }
  inline double operator()(BFloat16 v) const {
    const uint32_t bits = static_cast<uint32_t>(v.bits) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return static_cast<double>(f);
  }
};

// x . q over D entries, q in float64. One summation order for every storage type and code path: eight
// lane accumulators a[l] += x[d + l] q[d + l] over blocks of 8, combined as
// ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)), plus the tail summed in order. The AVX paths
// (float32, bfloat16, and float16 through F16C's vcvtph2ps) do the same operations in two 4-wide
// registers, so float16 storage gives bit-identical results to float32 storage holding the same values.
inline double combine8(const double* a) { return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7])); }

template <typename S>
inline double dot_row_generic(const S* xi, const double* q, int64_t D, const Loader& ld) {
  double a[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int l = 0; l < 8; ++l) a[l] += ld(xi[d + l]) * q[d + l];
  double tail = 0.0;
  for (; d < D; ++d) tail += ld(xi[d]) * q[d];
  return combine8(a) + tail;
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define METAMOE_DPP_X86 1

struct CpuFeatures {
  bool avx = false, f16c = false, avx512 = false;
  // METAMOE_CPU_SIMD=avx or =generic caps the paths used (they all give the same bits; the tests run each).
  CpuFeatures() {
    __builtin_cpu_init();
    const char* cap = std::getenv("METAMOE_CPU_SIMD");
    const std::string level = cap ? cap : "";
    const bool any = level != "generic", wide = any && level != "avx";
    avx = any && __builtin_cpu_supports("avx");
    f16c = avx && __builtin_cpu_supports("f16c");
    // libgcc's check includes the OS saving the 512-bit state (XCR0)
    avx512 = wide && f16c && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avx512f");
  }
};
const CpuFeatures& cpu() {
  static const CpuFeatures f;
  return f;
}

__attribute__((target("avx"))) inline void fma8(__m256 f, const double* q, __m256d& lo, __m256d& hi) {
  lo = _mm256_add_pd(lo, _mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(f)), _mm256_loadu_pd(q)));
  hi = _mm256_add_pd(hi, _mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)), _mm256_loadu_pd(q + 4)));
}

__attribute__((target("avx"))) inline double hsum8(__m256d lo, __m256d hi) {
  const __m256d s = _mm256_add_pd(lo, hi);  // (a0+a4, a1+a5, a2+a6, a3+a7)
  const __m128d c = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));  // (.. + (a2+a6), .. + (a3+a7))
  return _mm_cvtsd_f64(c) + _mm_cvtsd_f64(_mm_unpackhi_pd(c, c));
}

__attribute__((target("avx"))) double dot_f32_avx(const float* xi, const double* q, int64_t D) {
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) fma8(_mm256_loadu_ps(xi + d), q + d, lo, hi);
  double tail = 0.0;
  for (; d < D; ++d) tail += static_cast<double>(xi[d]) * q[d];
  return hsum8(lo, hi) + tail;
}

__attribute__((target("avx"))) double dot_bf16_avx(const uint16_t* xi, const double* q, int64_t D, const Loader& ld) {
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  const __m128i zero = _mm_setzero_si128();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xi + d));
    const __m128 f0 = _mm_castsi128_ps(_mm_unpacklo_epi16(zero, h));  // bf16 bits into the high half
    const __m128 f1 = _mm_castsi128_ps(_mm_unpackhi_epi16(zero, h));
    fma8(_mm256_set_m128(f1, f0), q + d, lo, hi);
  }
  double tail = 0.0;
  for (; d < D; ++d) tail += ld(BFloat16{xi[d]}) * q[d];
  return hsum8(lo, hi) + tail;
}

__attribute__((target("avx,f16c"))) double dot_f16_f16c(const uint16_t* xi, const double* q, int64_t D, const Loader& ld) {
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    fma8(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xi + d))), q + d, lo, hi);
  double tail = 0.0;
  for (; d < D; ++d) tail += ld(Half{xi[d]}) * q[d];
  return hsum8(lo, hi) + tail;
}

// ------------------------------------------------------------------ AVX-512: one row, G directions
#define METAMOE_AVX512 __attribute__((target("avx512f,avx2,f16c,fma")))

// Eight stored values as eight doubles (every conversion is exact).
METAMOE_AVX512 inline __m512d load8(const float* x) { return _mm512_cvtps_pd(_mm256_loadu_ps(x)); }
METAMOE_AVX512 inline __m512d load8(const double* x) { return _mm512_loadu_pd(x); }
METAMOE_AVX512 inline __m512d load8(const Half* x) {
  return _mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))));
}
METAMOE_AVX512 inline __m512d load8(const BFloat16* x) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  return _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
}

// ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)), as hsum8 and combine8.
METAMOE_AVX512 inline double hsum512(__m512d a) {
  const __m256d s = _mm256_add_pd(_mm512_castpd512_pd256(a), _mm512_extractf64x4_pd(a, 1));
  const __m128d c = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
  return _mm_cvtsd_f64(c) + _mm_cvtsd_f64(_mm_unpackhi_pd(c, c));
}

// out[u] = x . q_u for the G directions q_u = q + u * ldq. The multiply and the add stay separate
// instructions (_mm512_mul_pd then _mm512_add_pd with -ffp-contract=off), as in every other path.
template <int G, typename S>
METAMOE_AVX512 void dots_avx512(const S* x, const double* q, int64_t ldq, int64_t D, double* out, const Loader& ld) {
  __m512d acc[G];
#pragma GCC unroll 8
  for (int u = 0; u < G; ++u) acc[u] = _mm512_setzero_pd();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m512d xv = load8(x + d);
#pragma GCC unroll 8
    for (int u = 0; u < G; ++u) acc[u] = _mm512_add_pd(acc[u], _mm512_mul_pd(xv, _mm512_loadu_pd(q + u * ldq + d)));
  }
#pragma GCC unroll 8
  for (int u = 0; u < G; ++u) {
    double tail = 0.0;
    for (int64_t e = d; e < D; ++e) tail += ld(x[e]) * q[u * ldq + e];
    out[u] = hsum512(acc[u]) + tail;
  }
}
// The same for two rows against the same G directions (each direction loaded once for both rows).
template <int G, typename S>
METAMOE_AVX512 void dots2_avx512(const S* x0, const S* x1, const double* q, int64_t D, double* out0, double* out1,
                                 const Loader& ld) {
  __m512d acc0[G], acc1[G];
#pragma GCC unroll 8
  for (int u = 0; u < G; ++u) acc0[u] = acc1[u] = _mm512_setzero_pd();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m512d xv0 = load8(x0 + d), xv1 = load8(x1 + d);
#pragma GCC unroll 8
    for (int u = 0; u < G; ++u) {
      const __m512d qv = _mm512_loadu_pd(q + u * D + d);
      acc0[u] = _mm512_add_pd(acc0[u], _mm512_mul_pd(xv0, qv));
      acc1[u] = _mm512_add_pd(acc1[u], _mm512_mul_pd(xv1, qv));
    }
  }
#pragma GCC unroll 8
  for (int u = 0; u < G; ++u) {
    double t0 = 0.0, t1 = 0.0;
    for (int64_t e = d; e < D; ++e) {
      t0 += ld(x0[e]) * q[u * D + e];
      t1 += ld(x1[e]) * q[u * D + e];
    }
    out0[u] = hsum512(acc0[u]) + t0;
    out1[u] = hsum512(acc1[u]) + t1;
  }
}
#undef METAMOE_AVX512
#endif

// x . q for one row and one direction.
// The dot-product path in use: "avx512", "avx" or "generic".
inline const char* simd_path() {
#ifdef METAMOE_DPP_X86
  if (cpu().avx512) return "avx512";
  if (cpu().avx) return "avx";
#endif
  return "generic";
}

template <typename S>
inline double dot_row(const S* xi, const double* q, int64_t D, const Loader& ld) {
#ifdef METAMOE_DPP_X86
  if (cpu().avx512) {
    double out;
    dots_avx512<1>(xi, q, D, D, &out, ld);
    return out;
  }
  if constexpr (std::is_same_v<S, float>) {
    if (cpu().avx) return dot_f32_avx(xi, q, D);
  } else if constexpr (std::is_same_v<S, BFloat16>) {
    if (cpu().avx) return dot_bf16_avx(reinterpret_cast<const uint16_t*>(xi), q, D, ld);
  } else if constexpr (std::is_same_v<S, Half>) {
    if (cpu().f16c) return dot_f16_f16c(reinterpret_cast<const uint16_t*>(xi), q, D, ld);
  }
#endif
  return dot_row_generic(xi, q, D, ld);
}

// out[s] = x . Q[s] for the m directions Q[0..m) (rows of D doubles, row-major): the row is read once
// per 8 directions instead of once per direction. Bit-identical to m calls of dot_row.
template <typename S>
inline void dots_many(const S* xi, const double* Q, int64_t m, int64_t D, double* out, const Loader& ld) {
  int64_t s = 0;
#ifdef METAMOE_DPP_X86
  if (cpu().avx512) {
    for (; s + 8 <= m; s += 8) dots_avx512<8>(xi, Q + s * D, D, D, out + s, ld);
    if (s + 4 <= m) {
      dots_avx512<4>(xi, Q + s * D, D, D, out + s, ld);
      s += 4;
    }
    for (; s < m; ++s) dots_avx512<1>(xi, Q + s * D, D, D, out + s, ld);
    return;
  }
#endif
  for (; s < m; ++s) out[s] = dot_row(xi, Q + s * D, D, ld);
}

// dots_many for two rows and the same m directions: out0[s] = x0 . Q[s], out1[s] = x1 . Q[s].
template <typename S>
inline void dots_many2(const S* x0, const S* x1, const double* Q, int64_t m, int64_t D, double* out0, double* out1,
                       const Loader& ld) {
#ifdef METAMOE_DPP_X86
  if (cpu().avx512 && m == 4) {
    dots2_avx512<4>(x0, x1, Q, D, out0, out1, ld);
    return;
  }
#endif
  dots_many(x0, Q, m, D, out0, ld);
  dots_many(x1, Q, m, D, out1, ld);
}

}  // namespace dpp
}  // namespace metamoe
