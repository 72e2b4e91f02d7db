// Depthwise causal conv1d, optionally position-aware: CPU kernel.
//
// For kept tokens i = 0..K-1 at strictly increasing positions p_i (per batch
// row; p_i = i without positions), weight w (E, k) and bias (E):
//
//   a[b, e, i] = bias[e] + sum_t w[e, k-1-d] x[b, e, i-t],   out = a or silu(a)
//
// over the taps t = 0..min(k-1, i) with d = p_i - p_{i-t} <= k-1,
//
// which is the dense causal conv over the full length with zeros at the
// pruned positions, read at the kept ones (mmssm/ops/reference.py has that
// formulation as the reference). Since the positions increase strictly,
// d >= t: tap t of token i uses one of the weights d = t..k-1. For each pair
// (t, d), t >= 1, a 0/1 mask over i (per batch row, shared by all channels)
// says whether tap t of token i is at distance d, so that every channel runs
// plain loops over i that the compiler vectorises:
//
//   a[i] = bias + w[k-1] x[i] + sum_{(t, d)} (w[k-1-d] m_{t,d}[i]) x[i-t]
//
// Without positions only the pairs (t, t) exist and have no mask. Pairs whose
// mask is all zero in a batch row are skipped there.
//
// Rows (batch, channel) run in parallel with OpenMP. The backward recomputes
// a (for the SiLU) and writes dx directly; the weight and bias gradients are
// summed per row into (batch, E, k) / (batch, E) buffers and then over the
// batch in a fixed order, so they do not depend on the thread count.
//
// reverse: the anti-causal conv (taps on the following tokens), i.e. the
// causal conv of the reversed sequence, reversed back; Vim's backward
// direction runs it on the tokens in their order instead of a flipped copy.
//
// Layout: x, dout: (batch, E, K) with any strides (a (batch, E, K) view of a
// (batch, K, E) tensor needs no copy: each row is read into a contiguous
// buffer, in scan order); out and dx in the layout of x (empty_layout);
// weight: (E, k) and bias: (E) contiguous; positions: int64 (batch, K)
// contiguous, strictly increasing.

#include "causal_conv1d_cpu.h"

#include "../common/isa.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "../common/check_tensor.h"
#include "../common/rows.h"
#include "../common/vec16.h"
#include "../common/vectorized_exp.h"

namespace mmssm {
inline namespace MMSSM_ISA {
namespace {

int conv_threads() { return std::max(1, at::get_num_threads()); }

template <typename T>
struct ConvArgs {
  Rows<T> x;
  const T* w = nullptr;
  const T* bias = nullptr;
  // (batch, pairs, K) 0/1 masks and (batch, pairs) "any nonzero" flags;
  // empty without positions.
  std::vector<T> masks;
  std::vector<uint8_t> used;
  int64_t batch = 0, dim = 0, K = 0, k = 0, pairs = 0;
  bool silu = false, reverse = false;
};

template <typename T>
ConvArgs<T> make_args(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& positions, bool silu,
                      bool reverse) {
  TORCH_CHECK(x.dim() == 3, "x must be (batch, E, K)");
  TORCH_CHECK(weight.dim() == 2, "weight must be (E, k)");
  ConvArgs<T> a;
  a.batch = x.size(0);
  a.dim = x.size(1);
  a.K = x.size(2);
  a.k = weight.size(1);
  TORCH_CHECK(a.k >= 1, "the kernel size must be at least 1");
  a.pairs = a.k * (a.k - 1) / 2;
  a.silu = silu;
  a.reverse = reverse;
  const auto dtype = x.scalar_type();
  check_tensor(x, "x", dtype, {a.batch, a.dim, a.K}, false);
  check_tensor(weight, "weight", dtype, {a.dim, a.k});
  a.x = Rows<T>(x, reverse);
  a.w = weight.data_ptr<T>();
  if (bias) {
    check_tensor(*bias, "bias", dtype, {a.dim});
    a.bias = bias->data_ptr<T>();
  }
  if (!positions || a.pairs == 0) return a;
  check_tensor(*positions, "positions", at::kLong, {a.batch, a.K});
  const int64_t* p = positions->data_ptr<int64_t>();
  const int64_t K = a.K, k = a.k;
  a.masks.assign(static_cast<size_t>(a.batch * a.pairs * K), T(0));
  a.used.assign(static_cast<size_t>(a.batch * a.pairs), 0);
  std::vector<int64_t> q(static_cast<size_t>(K));
  for (int64_t b = 0; b < a.batch; ++b) {
    const int64_t* pb = p + b * K;
    for (int64_t i = 1; i < K; ++i) {
      TORCH_CHECK(pb[i] > pb[i - 1], "positions must be strictly increasing");
    }
    // the positions in scan order (negated when reversed: increasing)
    for (int64_t i = 0; i < K; ++i) q[i] = reverse ? -pb[K - 1 - i] : pb[i];
    for (int64_t i = 0; i < K; ++i) {
      for (int64_t t = 1; t < k && t <= i; ++t) {
        const int64_t d = q[i] - q[i - t];
        if (d > k - 1) break;  // d grows with t
        // pairs are numbered t = 1..k-1, d = t..k-1 in that order
        const int64_t pair = (t - 1) * k - (t - 1) * t / 2 + (d - t);
        a.masks[static_cast<size_t>((b * a.pairs + pair) * K + i)] = T(1);
        a.used[static_cast<size_t>(b * a.pairs + pair)] = 1;
      }
    }
  }
  return a;
}

// The pre-activation a of row (b, e) into y, from the row x (scan order).
template <typename T>
void conv_row(const ConvArgs<T>& a, int64_t b, int64_t e,
              const T* __restrict x, T* __restrict y) {
  const int64_t K = a.K, k = a.k;
  const T* w = a.w + e * k;
  const T bias = a.bias ? a.bias[e] : T(0);
  const T w0 = w[k - 1];
#pragma omp simd
  for (int64_t i = 0; i < K; ++i) y[i] = bias + w0 * x[i];
  if (a.masks.empty()) {
    for (int64_t t = 1; t < k && t < K; ++t) {
      const T c = w[k - 1 - t];
#pragma omp simd
      for (int64_t i = t; i < K; ++i) y[i] += c * x[i - t];
    }
    return;
  }
  int64_t pair = 0;
  for (int64_t t = 1; t < k; ++t) {
    for (int64_t d = t; d < k; ++d, ++pair) {
      if (!a.used[b * a.pairs + pair]) continue;
      const T c = w[k - 1 - d];
      const T* __restrict m = a.masks.data() + (b * a.pairs + pair) * K;
#pragma omp simd
      for (int64_t i = t; i < K; ++i) y[i] += c * m[i] * x[i - t];
    }
  }
}

// y = silu(y).
template <typename T>
void silu_inplace(T* __restrict y, int64_t K) {
  for (int64_t i = 0; i < K; ++i) y[i] = y[i] / (T(1) + fast_exp(-y[i]));
}

// float32: 16 at a time (the compiler does not vectorise fast_exp).
template <>
void silu_inplace<float>(float* __restrict y, int64_t K) {
  int64_t i = 0;
  for (; i + 16 <= K; i += 16) {
    const vf16 v = load16(y + i);
    store16(y + i, v / (1.0f + exp16(-v)));
  }
  for (; i < K; ++i) y[i] = y[i] / (1.0f + fast_exp(-y[i]));
}

// g = dout * silu'(a), in place of a: silu'(a) = s (1 + a (1 - s)).
template <typename T>
void silu_grad(const T* __restrict dout, T* __restrict g, int64_t K) {
  for (int64_t i = 0; i < K; ++i) {
    const T s = T(1) / (T(1) + fast_exp(-g[i]));
    g[i] = dout[i] * s * (T(1) + g[i] * (T(1) - s));
  }
}

template <>
void silu_grad<float>(const float* __restrict dout, float* __restrict g,
                      int64_t K) {
  int64_t i = 0;
  for (; i + 16 <= K; i += 16) {
    const vf16 a = load16(g + i);
    const vf16 s = 1.0f / (1.0f + exp16(-a));
    store16(g + i, load16(dout + i) * s * (1.0f + a * (1.0f - s)));
  }
  for (; i < K; ++i) {
    const float s = 1.0f / (1.0f + fast_exp(-g[i]));
    g[i] = dout[i] * s * (1.0f + g[i] * (1.0f - s));
  }
}

template <typename T>
void forward_impl(const ConvArgs<T>& a, const Rows<T>& out) {
  const int64_t rows = a.batch * a.dim;
#pragma omp parallel num_threads(conv_threads())
  {
    std::vector<T> x(static_cast<size_t>(a.K)), y(static_cast<size_t>(a.K));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = r / a.dim, e = r % a.dim;
      a.x.read(b, e, x.data());
      conv_row(a, b, e, x.data(), y.data());
      if (a.silu) silu_inplace(y.data(), a.K);
      out.write(b, e, y.data());
    }
  }
}

// Row (b, e): dx, and the row's parts of dweight (k) and dbias (1).
// All rows in scan order: x, dout (read), dx (written), g (work).
template <typename T>
void backward_row(const ConvArgs<T>& a, int64_t b, int64_t e,
                  const T* __restrict x, const T* __restrict dout,
                  T* __restrict dx, T* __restrict g, T* __restrict dw,
                  T& dbias) {
  const int64_t K = a.K, k = a.k;
  const T* w = a.w + e * k;
  if (a.silu) {  // g = dout * silu'(a), a recomputed
    conv_row(a, b, e, x, g);
    silu_grad(dout, g, K);
  } else {
    std::copy(dout, dout + K, g);
  }
  T sb = 0, sw = 0;
  const T w0 = w[k - 1];
#pragma omp simd reduction(+ : sb, sw)
  for (int64_t i = 0; i < K; ++i) {
    sb += g[i];
    sw += g[i] * x[i];
    dx[i] = w0 * g[i];
  }
  dbias = sb;
  std::fill(dw, dw + k, T(0));
  dw[k - 1] = sw;
  if (a.masks.empty()) {
    for (int64_t t = 1; t < k && t < K; ++t) {
      const T c = w[k - 1 - t];
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t i = t; i < K; ++i) {
        s += g[i] * x[i - t];
        dx[i - t] += c * g[i];
      }
      dw[k - 1 - t] = s;
    }
    return;
  }
  int64_t pair = 0;
  for (int64_t t = 1; t < k; ++t) {
    for (int64_t d = t; d < k; ++d, ++pair) {
      if (!a.used[b * a.pairs + pair]) continue;
      const T c = w[k - 1 - d];
      const T* __restrict m = a.masks.data() + (b * a.pairs + pair) * K;
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t i = t; i < K; ++i) {
        const T gm = g[i] * m[i];
        s += gm * x[i - t];
        dx[i - t] += c * gm;
      }
      dw[k - 1 - d] += s;
    }
  }
}

template <typename T>
void backward_impl(const ConvArgs<T>& a, const Rows<T>& dout,
                   const Rows<T>& dx, T* dw_part, T* dbias_part, T* dw,
                   T* dbias) {
  const int64_t rows = a.batch * a.dim, K = a.K, k = a.k;
#pragma omp parallel num_threads(conv_threads())
  {
    std::vector<T> g(static_cast<size_t>(K)), x(static_cast<size_t>(K));
    std::vector<T> dy(static_cast<size_t>(K)), dxr(static_cast<size_t>(K));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = r / a.dim, e = r % a.dim;
      a.x.read(b, e, x.data());
      dout.read(b, e, dy.data());
      backward_row(a, b, e, x.data(), dy.data(), dxr.data(), g.data(),
                   dw_part + r * k, dbias_part[r]);
      dx.write(b, e, dxr.data());
    }  // implicit barrier
#pragma omp for schedule(static)
    for (int64_t e = 0; e < a.dim; ++e) {  // over the batch, in order
      for (int64_t j = 0; j < k; ++j) {
        T s = 0;
        for (int64_t b = 0; b < a.batch; ++b) {
          s += dw_part[(b * a.dim + e) * k + j];
        }
        dw[e * k + j] = s;
      }
      if (dbias) {
        T s = 0;
        for (int64_t b = 0; b < a.batch; ++b) {
          s += dbias_part[b * a.dim + e];
        }
        dbias[e] = s;
      }
    }
  }
}

void check_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "the CPU causal conv1d computes in float32 or float64, got ",
              x.scalar_type());
}

}  // namespace

at::Tensor causal_conv1d_fwd(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& positions,
                             bool silu, bool reverse) {
  check_dtype(x);
  auto out = empty_layout(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_fwd", [&] {
    const auto a =
        make_args<scalar_t>(x, weight, bias, positions, silu, reverse);
    forward_impl<scalar_t>(a, Rows<scalar_t>(out, reverse));
  });
  return out;
}

std::vector<std::optional<at::Tensor>> causal_conv1d_bwd(
    const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& positions, const at::Tensor& dout,
    bool silu, bool reverse) {
  check_dtype(x);
  check_tensor(dout, "dout", x.scalar_type(), x.sizes().vec(), false);
  auto dx = empty_layout(x);
  auto dw = at::empty_like(weight);
  auto dw_part =
      at::empty({x.size(0), x.size(1), weight.size(1)}, x.options());
  auto dbias_part = at::empty({x.size(0), x.size(1)}, x.options());
  std::optional<at::Tensor> dbias;
  if (bias) dbias = at::empty_like(*bias);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_bwd", [&] {
    const auto a =
        make_args<scalar_t>(x, weight, bias, positions, silu, reverse);
    backward_impl<scalar_t>(a, Rows<scalar_t>(dout, reverse),
                            Rows<scalar_t>(dx, reverse),
                            dw_part.data_ptr<scalar_t>(),
                            dbias_part.data_ptr<scalar_t>(),
                            dw.data_ptr<scalar_t>(),
                            bias ? dbias->data_ptr<scalar_t>() : nullptr);
  });
  return {dx, dw, dbias};
}

}  // namespace MMSSM_ISA
}  // namespace mmssm
