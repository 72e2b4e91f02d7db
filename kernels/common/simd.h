// Native-width vectors (kernels/common/isa.h: 16 bytes generic, 32 with
// AVX2) of float or double, with GCC vector extensions, and the vectorised
// math of the kernels: exp, softplus, sigmoid. The kernels vectorise across
// CHANNELS (one lane per channel): every lane runs its own recurrence, so no
// horizontal sums are needed in the inner loops.
//
// float32 uses branch-free polynomials (exp: Cody-Waite reduction and
// Cephes' polynomial, ~2 ulp; log on [1, 2] for softplus). float64 is for
// checking against the references: plain libm, lane by lane.
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

// exp(x); x < -87.3 gives ~1e-38, which is 0 to the recurrences. The
// rounding of x / ln 2 to an integer adds and subtracts 1.5 * 2^23, which
// also leaves that integer in the low mantissa bits (no conversions).
inline vf vexp(vf x) {
  x = vmin(vmax(x, vsplat(-87.3f)), vsplat(88.3f));
  const vf magic = vsplat(12582912.0f);  // 1.5 * 2^23
  const vf t = x * 1.44269504088896341f + magic;
  const vf n = t - magic;
  const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = vsplat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // the bits of t are those of magic plus n; shifted by 23, magic's vanish
  const vi bits = (std::bit_cast<vi>(t) + 127) << 23;
  return p * std::bit_cast<vf>(bits);
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
