// 16 float32 (or int32) lanes as one value, with GCC vector extensions:
// whole-register code whatever the target (one zmm with AVX-512, two ymm
// with AVX2, four xmm with SSE2), shared by the CPU kernels.
#pragma once

#include "isa.h"

#include <cstdint>

namespace mmssm {
inline namespace MMSSM_ISA {

using vf16 = float __attribute__((vector_size(64), aligned(4)));
using vi16 = int32_t __attribute__((vector_size(64), aligned(4)));

inline vf16 splat(float v) { return vf16{} + v; }
inline vf16 load16(const float* p) { return *reinterpret_cast<const vf16*>(p); }
inline void store16(float* p, vf16 v) { *reinterpret_cast<vf16*>(p) = v; }

}  // namespace MMSSM_ISA
}  // namespace mmssm
