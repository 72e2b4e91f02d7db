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
// d >= t: tap t of token i uses one of the weights d = t..k-1, or none when
// d > k-1. A table (per batch row and token, shared by all channels) gives
// tap t's weight index k-1-d, or k for none, which points at a zero weight
// appended to each tile's k weights:
//
//   a[i] = bias + w[k-1] x[i] + sum_{t=1..k-1} w[idx_t[i]] x[i-t]
//
// so a pruned sequence costs the dense conv's k multiply-adds per token
// plus one index load per tap (the earlier 0/1 masks over every (t, d)
// pair cost up to k(k-1)/2 of them). Without positions idx_t[i] = k-1-t,
// with no table.
//
// Vectorised across channels (W-lane vectors, kernels/common/simd.h); the
// weight indices are per token and shared by the lanes. The forward of a
// tokens-major x (Vim's in_proj output) runs step by step over all the
// channels of a step (forward_rows): the rows are read in order, once. Any
// other layout, and the backward, run tiles of W adjacent channels (one
// vector per token, kernels/common/tiles.h) as one unit: each thread runs a
// contiguous range of tiles, chunk of tokens by chunk (with the k - 1
// tokens before the chunk, and for the backward pass the k - 1 after it),
// so that the chunk's rows of x are read once for all its tiles. The
// backward recomputes a (for the SiLU) and writes dx directly; the weight
// and bias gradients are summed per (batch element, channel) in token order
// into (batch, E, k) / (batch, E) buffers and then over the batch in a
// fixed order, so they do not depend on the thread count.
//
// reverse: the anti-causal conv (taps on the following tokens), i.e. the
// causal conv of the reversed sequence, reversed back; Vim's backward
// direction runs it on the tokens in their order instead of a flipped copy
// (the token list of the tiles is reversed).
//
// Layout: x, dout: (batch, E, K) with any strides (a (batch, E, K) view of a
// (batch, K, E) tensor needs no copy); out and dx in the layout of x
// (empty_layout); weight: (E, k) and bias: (E) contiguous; positions: int64
// (batch, K) contiguous, strictly increasing.

#include "causal_conv1d_cpu.h"

#include "../common/isa.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "../common/check_tensor.h"
#include "../common/simd.h"
#include "../common/tiles.h"

namespace mmssm {
inline namespace MMSSM_ISA {
namespace {

int conv_threads() { return std::max(1, at::get_num_threads()); }

template <typename T>
struct ConvArgs {
  Strided<T> x;
  std::vector<int64_t> tok;  // token of scan step i
  const T* w = nullptr;
  const T* bias = nullptr;
  // (batch, K, k-1): the weight index of taps 1..k-1 of each scan step (k:
  // no weight, beyond the kernel); empty without positions.
  std::vector<int32_t> widx;
  int64_t batch = 0, dim = 0, K = 0, k = 0;
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
  a.silu = silu;
  a.reverse = reverse;
  const auto dtype = x.scalar_type();
  check_tensor(x, "x", dtype, {a.batch, a.dim, a.K}, false);
  check_tensor(weight, "weight", dtype, {a.dim, a.k});
  a.x = Strided<T>(x);
  a.tok.resize(a.K);
  for (int64_t i = 0; i < a.K; ++i) a.tok[i] = reverse ? a.K - 1 - i : i;
  a.w = weight.data_ptr<T>();
  if (bias) {
    check_tensor(*bias, "bias", dtype, {a.dim});
    a.bias = bias->data_ptr<T>();
  }
  if (!positions || a.k == 1) return a;
  check_tensor(*positions, "positions", at::kLong, {a.batch, a.K});
  const int64_t* p = positions->data_ptr<int64_t>();
  const int64_t K = a.K, k = a.k;
  a.widx.assign(static_cast<size_t>(a.batch * K * (k - 1)),
                static_cast<int32_t>(k));
  std::vector<int64_t> q(static_cast<size_t>(K));
  for (int64_t b = 0; b < a.batch; ++b) {
    const int64_t* pb = p + b * K;
    for (int64_t i = 1; i < K; ++i) {
      TORCH_CHECK(pb[i] > pb[i - 1], "positions must be strictly increasing");
    }
    // the positions in scan order (negated when reversed: increasing)
    for (int64_t i = 0; i < K; ++i) q[i] = reverse ? -pb[K - 1 - i] : pb[i];
    for (int64_t i = 0; i < K; ++i) {
      int32_t* wi = a.widx.data() + (b * K + i) * (k - 1);
      for (int64_t t = 1; t < k && t <= i; ++t) {
        const int64_t d = q[i] - q[i - t];
        if (d > k - 1) break;  // d grows with t
        wi[t - 1] = static_cast<int32_t>(k - 1 - d);
      }
    }
  }
  return a;
}

// Tokens per chunk.
constexpr int64_t kConvChunk = 256;
// Steps per work item of forward_rows: small, so that one image of 197
// tokens still splits over the threads (the k - 1 rows before an item are
// read again).
constexpr int64_t kRowChunk = 16;

// Calls f(t, j) for the taps t = 1..min(k-1, i) of scan step i, in that
// order: tap t uses weight j (k: the zero weight, none).
template <typename T, typename F>
inline void for_taps(const ConvArgs<T>& a, int64_t b, int64_t i, F&& f) {
  const int64_t taps = std::min(a.k - 1, i);
  if (a.widx.empty()) {
    for (int64_t t = 1; t <= taps; ++t) f(t, a.k - 1 - t);
    return;
  }
  const int32_t* wi = a.widx.data() + (b * a.K + i) * (a.k - 1);
  for (int64_t t = 1; t <= taps; ++t) f(t, wi[t - 1]);
}

// The pre-activation at scan step i of a tile: x holds steps s0.. of it,
// w its k weights and a zero (k + 1 W-lane vectors), bias its bias.
template <typename T, typename V = vec_t<T>>
inline V conv_at(const ConvArgs<T>& a, int64_t b, int64_t i, int64_t s0,
                 const V* __restrict x, const V* __restrict w, V bias) {
  V acc = bias + w[a.k - 1] * x[i - s0];
  for_taps(a, b, i, [&](int64_t t, int64_t j) {
    acc += w[j] * x[i - t - s0];
  });
  return acc;
}

template <typename T, typename V = vec_t<T>>
inline V activate(const ConvArgs<T>& a, V v) {
  return a.silu ? v * vsigmoid(v) : v;
}

// A thread's tiles g0..g0+G-1 of a batch element: their weights (G x (k +
// 1): the k weights and a zero) and biases (G) as W-lane vectors, their
// first channels and lane counts.
template <typename T>
struct ConvTiles {
  using V = vec_t<T>;
  std::vector<V> w, bias;
  std::vector<int64_t> d0;
  std::vector<int> lanes;

  void set(const ConvArgs<T>& a, int64_t g0, int64_t G) {
    constexpr int W = Simd<T>::W;
    w.assign(G * (a.k + 1), V{});
    bias.assign(G, V{});
    d0.resize(G);
    lanes.resize(G);
    for (int64_t g = 0; g < G; ++g) {
      d0[g] = (g0 + g) * W;
      lanes[g] = static_cast<int>(std::min<int64_t>(W, a.dim - d0[g]));
      for (int l = 0; l < lanes[g]; ++l) {
        const int64_t e = d0[g] + l;
        for (int64_t j = 0; j < a.k; ++j) {
          w[g * (a.k + 1) + j][l] = a.w[e * a.k + j];
        }
        if (a.bias) bias[g][l] = a.bias[e];
      }
    }
  }
};

// Calls f(b, g0, G) for this thread's tiles of each batch element.
template <typename F>
inline void for_thread_tiles(int64_t batch, int64_t tiles, F&& f) {
  int64_t lo, hi;
  thread_range(batch * tiles, lo, hi);
  for (int64_t i = lo; i < hi;) {
    const int64_t b = i / tiles;
    const int64_t end = std::min(hi, (b + 1) * tiles);
    f(b, i - b * tiles, end - i);
    i = end;
  }
}

template <typename T>
void forward_impl(const ConvArgs<T>& a, const Strided<T>& out) {
  using V = vec_t<T>;
  constexpr int W = Simd<T>::W;
  const int64_t tiles = (a.dim + W - 1) / W, halo = a.k - 1;
#pragma omp parallel num_threads(conv_threads())
  {
    std::vector<V> x(kConvChunk + halo), y(kConvChunk);
    ConvTiles<T> c;
    for_thread_tiles(a.batch, tiles, [&](int64_t b, int64_t g0, int64_t G) {
      c.set(a, g0, G);
      for (int64_t i0 = 0; i0 < a.K; i0 += kConvChunk) {
        const int64_t i1 = std::min(a.K, i0 + kConvChunk);
        const int64_t s0 = std::max<int64_t>(0, i0 - halo);
        for (int64_t g = 0; g < G; ++g) {
          pack(a.x, b, c.d0[g], c.lanes[g], a.tok.data() + s0, i1 - s0,
               x.data());
          const V* w = c.w.data() + g * (a.k + 1);
          for (int64_t i = i0; i < i1; ++i) {
            const V v = conv_at(a, b, i, s0, x.data(), w, c.bias[g]);
            y[i - i0] = activate(a, v);
          }
          unpack(out, b, c.d0[g], c.lanes[g], a.tok.data() + i0, i1 - i0,
                 y.data());
        }
      }
    });
  }
}

// One step of forward_rows: out = act(bias + sum_t wr[t] * xr[t]) over the
// channels, for `taps` taps; NT > 0 fixes their number at compile time, so
// that they unroll and their rows and weights stay in registers. The lanes
// past `tail` of the last vector are neither read nor written.
template <int NT, typename T, typename V = vec_t<T>>
void conv_row(const ConvArgs<T>& a, const V* __restrict bias,
              const V* const* wr, const T* const* xr, T* __restrict o,
              int64_t full, int tail, int taps) {
  constexpr int W = Simd<T>::W;
  const int n = NT > 0 ? NT : taps;
  auto step = [&](int64_t v, auto load) {
    V acc = bias[v] + wr[0][v] * load(xr[0] + v * W);
    for (int t = 1; t < n; ++t) acc += wr[t][v] * load(xr[t] + v * W);
    return activate(a, acc);
  };
  const auto load = [](const T* p) { return vload<V>(p); };
  for (int64_t v = 0; v < full; ++v) vstore(o + v * W, step(v, load));
  if (!tail) return;
  const V y = step(full, [tail](const T* p) {
    V r{};
    for (int l = 0; l < tail; ++l) r[l] = p[l];
    return r;
  });
  for (int l = 0; l < tail; ++l) o[full * W + l] = y[l];
}

// The forward of tokens-major x and out (channels innermost, the layout of
// in_proj's output): step by step, all channels of a step at once, so that
// each step's row is read once, in order, and the k - 1 rows before it are
// still in cache (the tiles' pack reads W channels of each token, one cache
// line per token, and is bound by those reads). Each thread runs a
// contiguous range of (batch element, chunk of steps). A step's taps that
// have a weight (with positions, taps 1..n for some n, as d grows with t)
// and their weight rows are listed once for all its channels. Same
// arithmetic, in the same order, as conv_at.
template <typename T>
void forward_rows(const ConvArgs<T>& a, const Strided<T>& out) {
  using V = vec_t<T>;
  constexpr int W = Simd<T>::W;
  const int64_t E = a.dim, k = a.k, vecs = (E + W - 1) / W;
  const int64_t chunks = (a.K + kRowChunk - 1) / kRowChunk;
  // wt[j * vecs + v]: weight j of channels v*W.. (zero past the channels)
  std::vector<V> wt(k * vecs, V{}), bias(vecs, V{});
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t j = 0; j < k; ++j) {
      wt[j * vecs + e / W][e % W] = a.w[e * k + j];
    }
    if (a.bias) bias[e / W][e % W] = a.bias[e];
  }
  const int tail = static_cast<int>(E % W);
  const int64_t full = E / W;
#pragma omp parallel num_threads(conv_threads())
  {
    std::vector<const T*> xr(k);
    std::vector<const V*> wr(k);
    int64_t lo, hi;
    thread_range(a.batch * chunks, lo, hi);
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t b = item / chunks, c = item % chunks;
      const int64_t i1 = std::min(a.K, (c + 1) * kRowChunk);
      const T* xb = a.x.p + b * a.x.sb;
      for (int64_t i = c * kRowChunk; i < i1; ++i) {
        int taps = 1;  // tap 0 (weight k - 1), then the taps with a weight
        xr[0] = xb + a.tok[i] * a.x.sk;
        wr[0] = wt.data() + (k - 1) * vecs;
        for_taps(a, b, i, [&](int64_t t, int64_t j) {
          if (j == k) return;
          xr[taps] = xb + a.tok[i - t] * a.x.sk;
          wr[taps++] = wt.data() + j * vecs;
        });
        T* o = out.p + b * out.sb + a.tok[i] * out.sk;
        const auto row = [&](auto nt) {
          conv_row<decltype(nt)::value>(a, bias.data(), wr.data(), xr.data(),
                                        o, full, tail, taps);
        };
        switch (taps) {  // mamba's kernel size 4: up to 4 taps unrolled
          case 1: row(std::integral_constant<int, 1>{}); break;
          case 2: row(std::integral_constant<int, 2>{}); break;
          case 3: row(std::integral_constant<int, 3>{}); break;
          case 4: row(std::integral_constant<int, 4>{}); break;
          default: row(std::integral_constant<int, 0>{});
        }
      }
    }
  }
}

template <typename T>
void backward_impl(const ConvArgs<T>& a, const Strided<T>& dout,
                   const Strided<T>& dx, T* dw_part, T* dbias_part, T* dw,
                   T* dbias) {
  using V = vec_t<T>;
  constexpr int W = Simd<T>::W;
  const int64_t K = a.K, k = a.k, halo = k - 1;
  const int64_t tiles = (a.dim + W - 1) / W;
#pragma omp parallel num_threads(conv_threads())
  {
    std::vector<V> x(kConvChunk + 2 * halo), g(kConvChunk + halo);
    std::vector<V> dxc(kConvChunk), dwv, dbv;
    ConvTiles<T> c;
    for_thread_tiles(a.batch, tiles, [&](int64_t b, int64_t g0, int64_t G) {
      c.set(a, g0, G);
      dwv.assign(G * (k + 1), V{});  // slot k: the taps with no weight
      dbv.assign(G, V{});
      for (int64_t i0 = 0; i0 < K; i0 += kConvChunk) {
        // outputs i0..i1-1; their dx needs g up to e1-1, g needs x from s0
        const int64_t i1 = std::min(K, i0 + kConvChunk);
        const int64_t e1 = std::min(K, i1 + halo);
        const int64_t s0 = std::max<int64_t>(0, i0 - halo);
        for (int64_t t = 0; t < G; ++t) {
          const V* w = c.w.data() + t * (k + 1);
          V* dw_t = dwv.data() + t * (k + 1);
          pack(a.x, b, c.d0[t], c.lanes[t], a.tok.data() + s0, e1 - s0,
               x.data());
          pack(dout, b, c.d0[t], c.lanes[t], a.tok.data() + i0, e1 - i0,
               g.data());
          if (a.silu) {  // g = dout * silu'(a), a recomputed
            for (int64_t i = i0; i < e1; ++i) {
              const V v = conv_at(a, b, i, s0, x.data(), w, c.bias[t]);
              const V s = vsigmoid(v);
              g[i - i0] *= s * (T(1) + v * (T(1) - s));
            }
          }
          for (int64_t i = i0; i < i1; ++i) {
            const V gi = g[i - i0];
            dbv[t] += gi;
            dw_t[k - 1] += gi * x[i - s0];
            dxc[i - i0] = w[k - 1] * gi;
          }
          for (int64_t i = i0; i < i1; ++i) {
            const V gi = g[i - i0];
            for_taps(a, b, i, [&](int64_t tp, int64_t j) {
              dw_t[j] += gi * x[i - tp - s0];
            });
          }
          // tap tp of step i reaches dx at i - tp
          for (int64_t i = i0 + 1; i < e1; ++i) {
            const V gi = g[i - i0];
            for_taps(a, b, i, [&](int64_t tp, int64_t j) {
              const int64_t s = i - tp;
              if (s >= i0 && s < i1) dxc[s - i0] += w[j] * gi;
            });
          }
          unpack(dx, b, c.d0[t], c.lanes[t], a.tok.data() + i0, i1 - i0,
                 dxc.data());
        }
      }
      for (int64_t t = 0; t < G; ++t) {
        for (int l = 0; l < c.lanes[t]; ++l) {
          const int64_t r = b * a.dim + c.d0[t] + l;
          for (int64_t j = 0; j < k; ++j) {
            dw_part[r * k + j] = dwv[t * (k + 1) + j][l];
          }
          dbias_part[r] = dbv[t][l];
        }
      }
    });
#pragma omp barrier
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
    if (tokens_major(x)) {
      forward_rows<scalar_t>(a, Strided<scalar_t>(out));
    } else {
      forward_impl<scalar_t>(a, Strided<scalar_t>(out));
    }
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
    backward_impl<scalar_t>(a, Strided<scalar_t>(dout),
                            Strided<scalar_t>(dx),
                            dw_part.data_ptr<scalar_t>(),
                            dbias_part.data_ptr<scalar_t>(),
                            dw.data_ptr<scalar_t>(),
                            bias ? dbias->data_ptr<scalar_t>() : nullptr);
  });
  return {dx, dw, dbias};
}

}  // namespace MMSSM_ISA
}  // namespace mmssm
