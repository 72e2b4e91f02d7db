// Row access to a (batch, C, K) tensor of any strides, one (batch, channel)
// row at a time, in scan order: reversed with `reverse`, or following an
// index pattern (step j is element index[j]). Shared by the CPU kernels,
// which copy each row into a contiguous buffer, compute there and write the
// result back: a (batch, C, K) view of a (batch, K, C) tensor (a Linear
// layer's output) then needs no layout copy, and a reversed or re-ordered
// scan no flipped or gathered copy.
#pragma once

#include "isa.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace mmssm {
inline namespace MMSSM_ISA {

template <typename T>
struct Rows {
  T* p = nullptr;
  int64_t sb = 0, sc = 0, sk = 0, K = 0;
  bool reverse = false;

  Rows() = default;
  Rows(const at::Tensor& t, bool rev)
      : p(t.data_ptr<T>()), sb(t.stride(0)), sc(t.stride(1)),
        sk(t.stride(2)), K(t.size(2)), reverse(rev) {}

  // Row (b, c): its first element in scan order and the step between them.
  T* row(int64_t b, int64_t c, int64_t& step) const {
    step = reverse ? -sk : sk;
    return p + b * sb + c * sc + (reverse && K > 0 ? (K - 1) * sk : 0);
  }
  // Element j of the scan of row (b, c) -> its index along K.
  int64_t index(int64_t j) const { return reverse ? K - 1 - j : j; }

  // dst[j] = element j (or index[j] when given) of row (b, c).
  void read(int64_t b, int64_t c, T* __restrict dst,
            const int64_t* index = nullptr) const {
    if (index) {
      const T* src = p + b * sb + c * sc;
      for (int64_t j = 0; j < K; ++j) dst[j] = src[index[j] * sk];
      return;
    }
    int64_t step;
    const T* src = row(b, c, step);
    if (step == 1) {
      std::copy(src, src + K, dst);
    } else {
      for (int64_t j = 0; j < K; ++j) dst[j] = src[j * step];
    }
  }
  // The inverse of read.
  void write(int64_t b, int64_t c, const T* __restrict src,
             const int64_t* index = nullptr) const {
    if (index) {
      T* dst = p + b * sb + c * sc;
      for (int64_t j = 0; j < K; ++j) dst[index[j] * sk] = src[j];
      return;
    }
    int64_t step;
    T* dst = row(b, c, step);
    if (step == 1) {
      std::copy(src, src + K, dst);
    } else {
      for (int64_t j = 0; j < K; ++j) dst[j * step] = src[j];
    }
  }
};

}  // namespace MMSSM_ISA
}  // namespace mmssm
