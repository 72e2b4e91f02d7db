// Native-width vectors (kernels/common/isa.h: 16 bytes generic, 32 with
// AVX2) of float or double, with GCC vector extensions, and the vectorised
// math of the kernels: exp, softplus, sigmoid. The kernels vectorise across
// CHANNELS (one lane per channel): every lane runs its own recurrence, so no
// horizontal sums are needed in the inner loops.
//
// float32 uses branch-free polynomials (exp: 2^n 2^f with a degree-5
// polynomial for 2^f; log on [1, 2] for softplus). float64 is for checking
// against the references: plain libm, lane by lane.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "isa.h"

namespace mmssm {
inline namespace MMSSM_ISA {

template <typename T>
struct Simd;

template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(MMSSM_VEC_BYTES)));
  typedef int32_t I __attribute__((vector_size(MMSSM_VEC_BYTES)));
  static constexpr int W = MMSSM_VEC_BYTES / 4;
};

template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(MMSSM_VEC_BYTES)));
  static constexpr int W = MMSSM_VEC_BYTES / 8;
};

template <typename T>
using vec_t = typename Simd<T>::V;

template <typename V>
inline V vload(const void* p) {  // unaligned
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
inline void vstore(void* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// ---- float32 ------------------------------------------------------------
using vf = Simd<float>::V;
using vi = Simd<float>::I;

inline vf vsplat(float x) { return vf{} + x; }
// maxps/minps (one instruction; `a > b ? a : b` compiles to a compare and
// a blend): the second operand where either is NaN.
inline vf vmax(vf a, vf b) {
#if MMSSM_VEC_BYTES == 32
  return __builtin_ia32_maxps256(a, b);
#else
  return __builtin_ia32_maxps(a, b);
#endif
}
inline vf vmin(vf a, vf b) {
#if MMSSM_VEC_BYTES == 32
  return __builtin_ia32_minps256(a, b);
#else
  return __builtin_ia32_minps(a, b);
#endif
}

// fma(a, b, c): one rounding with FMA (the AVX2 build); a * b + c, two
// roundings, in the generic build (SSE2 has no FMA; the float32 results
// then differ in the last bits, both are within the tests' tolerance).
inline vf vfma(vf a, vf b, vf c) {
#if defined(__FMA__) && MMSSM_VEC_BYTES == 32
  return __builtin_ia32_vfmaddps256(a, b, c);
#elif defined(__FMA__)
  return __builtin_ia32_vfmaddps(a, b, c);
#else
  return a * b + c;
#endif
}

// 2^t, t = n + f with n = round(t), f in [-0.5, 0.5]. Adding kExp2Magic =
// 1.5 * 2^23 + 127 rounds t to an integer (round to nearest, |t| < 2^22)
// and leaves n + 127, the biased exponent of 2^n, in the low mantissa bits:
// shifted left by 23 they are the float 2^n (n in [-127, 127]; n = -127
// gives +0), with no conversion and no add. 2^f is a degree-5 polynomial,
// minimax for the relative error on [-0.5, 0.5] with p(0) = 1 exactly
// (a decay near 1, the common case in the recurrences, is then exact to
// first order: a constant bias there would compound over the steps).
// The polynomial evaluated in float32 has a relative error <= 4.9e-7 on
// [-0.5, 0.5] (an offline evaluation on 2e6 points); the kernel's decays
// are tested against float64 in tests/test_ops/test_kernel_builds.py
// (test_float32_decay_*).
constexpr float kExp2Magic = 12583039.0f;  // 1.5 * 2^23 + 127

inline vf vexp2_poly(vf f) {
  vf p = vsplat(1.112550962716341e-3f);
  p = vfma(p, f, vsplat(9.666282683610916e-3f));
  p = vfma(p, f, vsplat(5.557400360703468e-2f));
  p = vfma(p, f, vsplat(2.4022351205348969e-1f));
  p = vfma(p, f, vsplat(6.93142831325531e-1f));
  return vfma(p, f, vsplat(1.0f));
}
// 2^n from v = n + kExp2Magic (n in [-127, 127])
inline vf vexp2_scale(vf v) {
  return std::bit_cast<vf>(std::bit_cast<vi>(v) << 23);
}

// 2^(a b), the product formed inside the FMAs (never rounded): the
// recurrences' decays exp(delta A) = 2^(delta A log2(e)), with A log2(e)
// computed once per tile. kSafe = false needs |a b| <= 126 (the kernel
// checks it per chunk: kDecayFastBound) and costs 3 operations besides
// the polynomial and the scale; kSafe = true takes any a b: clamped to
// [-127.5, 127.5] (below -126.5 gives 0, above 127.5 2^127.5), NaN kept
// (the NaN operand second: maxps/minps then return it).
template <bool kSafe>
inline vf vexp2_mul(vf a, vf b) {
  const vf magic = vsplat(kExp2Magic);
  vf v = vfma(a, b, magic);
  if constexpr (kSafe) {
    v = vmin(vsplat(kExp2Magic + 127), vmax(vsplat(kExp2Magic - 127), v));
  }
  vf f = vfma(a, b, magic - v);  // a b - n
  if constexpr (kSafe) f = vmin(vsplat(0.5f), vmax(vsplat(-0.5f), f));
  return vexp2_poly(f) * vexp2_scale(v);
}
constexpr float kDecayFastBound = 126.0f;

// exp(x), any x (x < -87.7 gives 0, x > 88 gives 2^127 or more,
// finite; NaN stays NaN): the same 2^n split, with the remainder
// r = x - n ln 2 formed in two steps (Cody-Waite: n * 0.693359375 is exact)
// so that r is accurate for large |x| too, then f = r log2(e).
inline vf vexp(vf x) {
  const vf magic = vsplat(kExp2Magic);
  vf v = vfma(x, vsplat(1.44269504088896341f), magic);
  v = vmin(vsplat(kExp2Magic + 127), vmax(vsplat(kExp2Magic - 127), v));
  const vf n = v - magic;
  vf r = vfma(n, vsplat(-0.693359375f), x);
  r = vfma(n, vsplat(2.12194440e-4f), r);
  vf f = r * 1.44269504088896341f;
  f = vmin(vsplat(0.5f), vmax(vsplat(-0.5f), f));
  return vexp2_poly(f) * vexp2_scale(v);
}

// log(x) for x in [1, 2]: enough for softplus, log(1 + exp(-|x|)).
inline vf vlog_1to2(vf x) {
  const vi bits = std::bit_cast<vi>(x);
  vf e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, vf);
  const vi mbits = (bits & 0x007fffff) | 0x3f000000;
  vf m = std::bit_cast<vf>(mbits);  // [0.5, 1)
  const vi small = m < vsplat(0.707106781186547524f);
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const vf z = m * m;
  vf y = vsplat(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += e * -2.12194440e-4f;
  y += z * -0.5f;
  return m + y + e * 0.693359375f;
}

inline vf vsoftplus(vf x) {
  const vf neg_abs = x < 0.0f ? x : -x;
  return vmax(x, vf{}) + vlog_1to2(1.0f + vexp(neg_abs));
}
inline vf vsigmoid(vf x) { return 1.0f / (1.0f + vexp(-x)); }

// ---- float64: libm per lane ---------------------------------------------
using vd = Simd<double>::V;

inline vd vfma(vd a, vd b, vd c) {  // as the float32 one
#if defined(__FMA__) && MMSSM_VEC_BYTES == 32
  return __builtin_ia32_vfmaddpd256(a, b, c);
#elif defined(__FMA__)
  return __builtin_ia32_vfmaddpd(a, b, c);
#else
  return a * b + c;
#endif
}

inline vd vexp(vd x) {
  for (int i = 0; i < Simd<double>::W; ++i) x[i] = std::exp(x[i]);
  return x;
}
inline vd vsoftplus(vd x) {
  for (int i = 0; i < Simd<double>::W; ++i) {
    x[i] = x[i] <= 20.0 ? std::log1p(std::exp(x[i])) : x[i];
  }
  return x;
}
inline vd vsigmoid(vd x) {
  for (int i = 0; i < Simd<double>::W; ++i) x[i] = 1.0 / (1.0 + std::exp(-x[i]));
  return x;
}

// ---- the decays of the recurrences ---------------------------------------
// exp(e A), A given pre-scaled by decay_scale<T> (once per tile): float32
// 2^(e A log2(e)) (vexp2_mul; kSafe as there), float64 libm's exp(e A).
template <typename T>
constexpr T decay_scale = std::is_same_v<T, float> ? T(1.44269504088896341)
                                                   : T(1);
template <bool kSafe>
inline vf decay_exp(vf e, vf a_scaled) {
  return vexp2_mul<kSafe>(e, a_scaled);
}
template <bool kSafe>
inline vd decay_exp(vd e, vd a) {
  return vexp(e * a);
}

// The sums of the lanes of rows[0..W-1], as one vector (lane i: the sum of
// rows[i]): a tree of pairwise sums, log2(W) levels of W / 2^l shuffles.
template <typename V>
inline V row_sums(const V* rows) {
  constexpr int W = sizeof(V) / sizeof(rows[0][0]);
  if constexpr (W == 8 && std::is_same_v<V, vf>) {
    auto pair = [](V a, V b) {
      return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14) +
             __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15);
    };
    const vf p0 = pair(rows[0], rows[1]), p1 = pair(rows[2], rows[3]);
    const vf p2 = pair(rows[4], rows[5]), p3 = pair(rows[6], rows[7]);
    return pair(pair(p0, p1), pair(p2, p3));
  } else if constexpr (W == 4 && std::is_same_v<V, vf>) {
    auto pair = [](V a, V b) {
      return __builtin_shufflevector(a, b, 0, 2, 4, 6) +
             __builtin_shufflevector(a, b, 1, 3, 5, 7);
    };
    return pair(pair(rows[0], rows[1]), pair(rows[2], rows[3]));
  } else {
    V out{};
    for (int i = 0; i < W; ++i) {
      for (int j = 0; j < W; ++j) out[i] += rows[i][j];
    }
    return out;
  }
}

}  // namespace MMSSM_ISA
}  // namespace mmssm
