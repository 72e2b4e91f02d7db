// Depthwise causal conv1d, optionally position-aware: CPU kernel.
#pragma once

#include "../common/isa.h"

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace mmssm {
inline namespace MMSSM_ISA {

// x: (batch, E, K) with any strides, weight: (E, k), bias: (E), positions:
// int64 (batch, K), float32 or float64. Returns the conv (then SiLU if
// silu) in the layout of x; reverse: the anti-causal conv (the causal conv
// of the reversed sequence, reversed back).
at::Tensor causal_conv1d_fwd(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& positions,
                             bool silu, bool reverse);

// Returns {dx, dweight, dbias (none without a bias)}.
std::vector<std::optional<at::Tensor>> causal_conv1d_bwd(
    const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& positions, const at::Tensor& dout,
    bool silu, bool reverse);

}  // namespace MMSSM_ISA
}  // namespace mmssm
