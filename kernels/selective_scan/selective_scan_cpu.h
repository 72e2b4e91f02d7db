// Selective scan with pruning-aware hidden-state alignment: CPU kernel.
#pragma once

#include "../common/isa.h"

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace mmssm {
inline namespace MMSSM_ISA {

// Steps per chunk of the kernels (the checkpoints are the states before
// each chunk); mmssm/ops/selective_scan.py's SCAN_CHUNK must equal it.
constexpr int64_t kScanChunk = 64;

// u, delta, z: (batch, dim, K), any strides; A: (dim, N); Bt, Ct:
// (batch, K, N), N contiguous; D, delta_bias: (dim); positions: int64
// (batch, K); order: int64 (batch or 1, K), a permutation (u, z and the
// output at token order[j] for step j); one dtype (float32 or float64).
// gap_mode: 0 none, 1 prev, 2 null. reverse: scan from the last token to the
// first. delta_proj: (dim, R), or none; with it, delta is the low-rank
// (batch, R, K) input and the step sizes are delta_proj @ delta (before
// delta_bias and softplus). Returns {out, checkpoints}: out in the layout
// of u; with `checkpoints`, the state before each chunk of kScanChunk
// steps, (batch, dim, chunks, N), for the backward pass (otherwise an
// empty tensor).
std::vector<at::Tensor> selective_scan_fwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
    const at::Tensor& Bt, const at::Tensor& Ct,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias,
    const std::optional<at::Tensor>& positions,
    const std::optional<at::Tensor>& order, bool softplus, int64_t gap_mode,
    bool reverse, bool checkpoints,
    const std::optional<at::Tensor>& delta_proj);

// Returns {du, ddelta, dA, dBt, dCt, dD, dz, ddelta_bias}; the optional
// ones are none when their input is. checkpoints: the forward's (then the
// backward does not recompute them), or none. With delta_proj, ddelta is
// the gradient of the full step sizes, (batch, dim, K) tokens-major (the
// caller projects it onto delta and delta_proj).
std::vector<std::optional<at::Tensor>> selective_scan_bwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
    const at::Tensor& Bt, const at::Tensor& Ct,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias,
    const std::optional<at::Tensor>& positions,
    const std::optional<at::Tensor>& order, const at::Tensor& dout,
    bool softplus, int64_t gap_mode, bool reverse,
    const std::optional<at::Tensor>& checkpoints,
    const std::optional<at::Tensor>& delta_proj);

}  // namespace MMSSM_ISA
}  // namespace mmssm
