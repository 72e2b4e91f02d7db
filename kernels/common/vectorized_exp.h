// A vectorised exp for float32 (16 lanes, exp16) and its scalar form
// (fast_exp), shared by kernels/selective_scan and kernels/causal_conv1d.
#pragma once

#include "isa.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

#include "vec16.h"

namespace mmssm {
inline namespace MMSSM_ISA {

// exp for float32 (Cody-Waite range reduction and Cephes' polynomial; max
// relative error ~2 ulp). exp(x) for x < -87.3 is flushed to ~1e-38, which is
// 0 to the recurrence. NaN propagates.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * std::bit_cast<float>(bits);
}

// The same exp on 16 floats (vec16.h), so that it compiles to
// whole-register code whatever the compiler's vectoriser decides (it does
// not vectorise fast_exp above).
inline vf16 exp16(vf16 x) {
  x = x < splat(-87.3f) ? splat(-87.3f) : x;
  x = x > splat(88.3f) ? splat(88.3f) : x;
  const vf16 t = x * 1.44269504088896341f + 0.5f;
  vf16 n = __builtin_convertvector(__builtin_convertvector(t, vi16), vf16);
  n = n > t ? n - 1.0f : n;  // floor(t): truncation rounds up below 0
  const vf16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi16 bits = (__builtin_convertvector(n, vi16) + 127) << 23;
  return p * reinterpret_cast<const vf16&>(bits);
}

// float64 is for checking against the references: plain libm.
inline double fast_exp(double x) { return std::exp(x); }

}  // namespace MMSSM_ISA
}  // namespace mmssm
