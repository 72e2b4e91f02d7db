// Channel tiles of (batch, C, K) tensors of any strides, shared by the CPU
// kernels: a tile is W adjacent channels (one W-lane vector of
// kernels/common/simd.h per token), read ("packed") into contiguous
// buffers at a list of tokens and written back ("unpacked"). A (batch, C,
// K) view of a Linear layer's (batch, K, C) output (channels contiguous)
// is then one vector load per token, no layout copy; a reversed or
// re-ordered scan is a token list, no flipped or gathered copy.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "isa.h"
#include "simd.h"

namespace mmssm {
inline namespace MMSSM_ISA {

// A (batch, C, K) tensor of any strides.
template <typename T>
struct Strided {
  T* p = nullptr;
  int64_t sb = 0, sc = 0, sk = 0;
  Strided() = default;
  explicit Strided(const at::Tensor& t)
      : p(t.data_ptr<T>()), sb(t.stride(0)), sc(t.stride(1)),
        sk(t.stride(2)) {}
};

// dst[j] = channels c0..c0+lanes-1 of batch b at token tok[j] (zeros in the
// lanes past `lanes`).
template <typename T, typename V = vec_t<T>>
inline void pack(const Strided<T>& s, int64_t b, int64_t c0, int lanes,
                 const int64_t* tok, int64_t len, V* __restrict dst) {
  constexpr int W = Simd<T>::W;
  const T* base = s.p + b * s.sb + c0 * s.sc;
  if (s.sc == 1 && lanes == W) {
    for (int64_t j = 0; j < len; ++j) dst[j] = vload<V>(base + tok[j] * s.sk);
    return;
  }
  for (int64_t j = 0; j < len; ++j) {
    const T* src = base + tok[j] * s.sk;
    V v{};
    for (int w = 0; w < lanes; ++w) v[w] = src[w * s.sc];
    dst[j] = v;
  }
}

// The inverse of pack (the lanes past `lanes` are not written).
template <typename T, typename V = vec_t<T>>
inline void unpack(const Strided<T>& s, int64_t b, int64_t c0, int lanes,
                   const int64_t* tok, int64_t len,
                   const V* __restrict src) {
  constexpr int W = Simd<T>::W;
  T* base = s.p + b * s.sb + c0 * s.sc;
  if (s.sc == 1 && lanes == W) {
    for (int64_t j = 0; j < len; ++j) vstore(base + tok[j] * s.sk, src[j]);
    return;
  }
  for (int64_t j = 0; j < len; ++j) {
    T* dst = base + tok[j] * s.sk;
    for (int w = 0; w < lanes; ++w) dst[w * s.sc] = src[j][w];
  }
}

// This thread's share [lo, hi) of n items, split evenly over the team
// (contiguous, so that a thread's tiles are adjacent channels).
inline void thread_range(int64_t n, int64_t& lo, int64_t& hi) {
#ifdef _OPENMP
  const int64_t tid = omp_get_thread_num(), team = omp_get_num_threads();
#else
  const int64_t tid = 0, team = 1;
#endif
  lo = n * tid / team;
  hi = n * (tid + 1) / team;
}

}  // namespace MMSSM_ISA
}  // namespace mmssm
