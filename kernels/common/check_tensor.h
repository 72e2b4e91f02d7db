// The argument check of the CPU kernels' own contract (the Python wrappers
// check the user's input), shared by kernels/selective_scan and
// kernels/causal_conv1d.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace mmssm {

// `t` is a contiguous CPU tensor of `dtype` and `shape`; `name` is in the
// error otherwise.
inline void check_tensor(const at::Tensor& t, const char* name,
                         at::ScalarType dtype, std::vector<int64_t> shape) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(),
              ", expected ", dtype);
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), name, " has shape ",
              t.sizes(), ", expected ", at::IntArrayRef(shape));
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace mmssm
