// The argument checks of the CPU kernels' own contract (the Python wrappers
// check the user's input) and their output layout, shared by
// kernels/selective_scan and kernels/causal_conv1d.
#pragma once

#include "isa.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace mmssm {
inline namespace MMSSM_ISA {

// `t` is a CPU tensor of `dtype` and `shape`; `name` is in the error
// otherwise. With `contiguous`, it must also be contiguous; otherwise any
// strides are read (views of another layout, e.g. a (batch, E, K) transpose
// of a (batch, K, E) tensor, need no copy).
inline void check_tensor(const at::Tensor& t, const char* name,
                         at::ScalarType dtype, std::vector<int64_t> shape,
                         bool contiguous = true) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(),
              ", expected ", dtype);
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), name, " has shape ",
              t.sizes(), ", expected ", at::IntArrayRef(shape));
  TORCH_CHECK(!contiguous || t.is_contiguous(), name, " must be contiguous");
}

// Whether a (batch, C, K) tensor is "tokens-major": C is its innermost
// dimension, as a (batch, C, K) transpose of a (batch, K, C) tensor (the
// layout that Linear layers produce). mmssm/ops/checks.py has the same rule
// (tokens_major), which the fake implementations follow.
inline bool tokens_major(const at::Tensor& t) {
  return t.dim() == 3 && t.size(1) > 1 && t.size(2) > 1 && t.stride(1) == 1 &&
         t.stride(2) != 1;
}

// An uninitialised (batch, C, K) tensor in the layout of `t`: tokens-major
// if `t` is, contiguous otherwise.
inline at::Tensor empty_layout(const at::Tensor& t) {
  if (tokens_major(t)) {
    return at::empty({t.size(0), t.size(2), t.size(1)}, t.options())
        .transpose(1, 2);
  }
  return at::empty(t.sizes(), t.options());
}

}  // namespace MMSSM_ISA
}  // namespace mmssm
