// Selective scan with pruning-aware hidden-state alignment: CPU kernel.
//
// One (batch, channel) row is one independent recurrence; rows run in
// parallel with OpenMP, and the state dimension N is the SIMD axis. The
// kernel takes the original positions of the K scanned tokens and folds the
// gap before each token into that token's decay (see docs/scan.md for the
// math):
//
//   e_k = delta_k + g_k * gap_delta_k,  h_k = exp(e_k A) h_{k-1} + delta_k B_k u_k
//
// so a pruned sequence costs K steps, not L. The backward pass recomputes the
// row's forward states into a thread-local buffer (K x N, cache resident for
// the shapes we use) and then runs the reverse recurrence.
//
// Scan order: `reverse` scans from the last token to the first (Vim's
// backward direction, without flipped copies; the gaps are then those
// between each token and the one after it); `order` (batch or 1, K), a
// permutation, makes step j read u and z at token order[j] and write its
// output there, while delta, B, C and the positions stay per step
// (PlainMamba's zig-zag scans, whose step inputs come from the raster token,
// without gathered copies).
//
// Layout: u, delta, z, dout: (batch, dim, K) with any strides (each row is
// read into contiguous buffers; a (batch, dim, K) view of a Linear layer's
// (batch, K, dim) output needs no copy); out, du, ddelta, dz in the layout
// of their input (empty_layout); Bt, Ct: (batch, K, N) with N contiguous and
// any other strides (slices of x_proj's output); A: (dim, N); D, delta_bias:
// (dim); positions, order: int64, contiguous; dBt, dCt: contiguous.

#include "selective_scan_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../common/check_tensor.h"
#include "../common/rows.h"
#include "../common/vec16.h"
#include "../common/vectorized_exp.h"

namespace mmssm {
namespace {

enum GapMode : int64_t { kGapNone = 0, kGapPrev = 1, kGapNull = 2 };

// log for float32, branch-free like fast_exp (kernels/common/vectorized_exp.h).
// Whether GCC vectorises these scalar forms depends on the loop (with our
// flags it often does not); the hot float32 N = 16 path uses the explicit
// 16-lane versions instead.
//
// log(x) for x in [1, 2]: enough for softplus, log(1 + exp(-|x|)).
inline float log_1to2(float x) {
  const int32_t bits = std::bit_cast<int32_t>(x);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126);
  float m = std::bit_cast<float>((bits & 0x007fffff) | 0x3f000000);  // [.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}

inline float softplus(float x) {
  return std::max(x, 0.0f) + log_1to2(1.0f + fast_exp(-std::abs(x)));
}
inline float sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }

// The hot path, float32 with N = 16: one state vector per channel, written
// with GCC vector extensions so that it compiles to whole-register code
// (one zmm with AVX-512, two ymm with AVX2) whatever the compiler's
// vectoriser decides. The scalar functions above are its reference.
// vf16, vi16, splat, load16, store16: kernels/common/vec16.h; exp16:
// kernels/common/vectorized_exp.h.

// The sums of the lanes of a and of b, reduced together.
inline void sum2x16(vf16 a, vf16 b, float& sa, float& sb) {
  vf16 v = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18,
                                   19, 20, 21, 22, 23) +
           __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25,
                                   26, 27, 28, 29, 30, 31);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15,
                               8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14,
                               15, 12, 13);
  sa = v[0] + v[1];
  sb = v[8] + v[9];
}

// log(x) for x in [1, 2], as log_1to2.
inline vf16 log16_1to2(vf16 x) {
  const vi16 bits = reinterpret_cast<const vi16&>(x);
  vf16 e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, vf16);
  const vi16 mbits = (bits & 0x007fffff) | 0x3f000000;
  vf16 m = reinterpret_cast<const vf16&>(mbits);  // [0.5, 1)
  const vi16 small = m < splat(0.707106781186547524f);
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const vf16 z = m * m;
  vf16 y = splat(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += e * -2.12194440e-4f;
  y += z * -0.5f;
  return m + y + e * 0.693359375f;
}

inline vf16 softplus16(vf16 x) {
  const vf16 neg_abs = x < 0.0f ? x : -x;
  const vf16 pos = x > 0.0f ? x : vf16{};
  return pos + log16_1to2(1.0f + exp16(neg_abs));
}

inline vf16 sigmoid16(vf16 x) { return 1.0f / (1.0f + exp16(-x)); }

inline float sum16(vf16 v) {  // a tree, not 15 dependent adds
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2,
                               3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0,
                               1, 2, 3);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2,
                               3, 0, 1);
  return v[0] + v[1];
}

// float64 is for checking against the reference: plain libm.
inline double softplus(double x) {
  return x <= 20.0 ? std::log1p(std::exp(x)) : x;
}
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// One call's tensors.
template <typename T>
struct ScanArgs {
  Rows<T> u, delta, z, out;  // z.p null without z
  const T *A, *Bt, *Ct, *D, *bias;
  int64_t sBb, sBk, sCb, sCk;  // strides of Bt, Ct over batch and K
  const T* gaps;  // (batch, K) in scan order: pruned tokens before each
  const int64_t* order;  // (batch or 1, K) or null
  int64_t order_sb;      // K, or 0 when shared by the batch
  int64_t dim, K, N;
  bool softplus, reverse;
  int64_t gap_mode;

  const int64_t* order_of(int64_t b) const {
    return order ? order + b * order_sb : nullptr;
  }
  // B_j, C_j of batch element b at scan step j: base + j * step.
  const T* B_row(int64_t b, int64_t& step) const {
    step = reverse ? -sBk : sBk;
    return Bt + b * sBb + (reverse && K > 0 ? (K - 1) * sBk : 0);
  }
  const T* C_row(int64_t b, int64_t& step) const {
    step = reverse ? -sCk : sCk;
    return Ct + b * sCb + (reverse && K > 0 ? (K - 1) * sCk : 0);
  }
};

// Per-row work buffers of K values each, in scan order.
template <typename T>
struct RowBuffers {
  std::vector<T> step, decay_exp, input, gate, dgate, dstep_draw, y, u, dout,
      du, dz;
  explicit RowBuffers(int64_t K)
      : step(K), decay_exp(K), input(K), gate(K), dgate(K), dstep_draw(K),
        y(K), u(K), dout(K), du(K), dz(K) {}
};

// Vectorised over k, before the recurrence: the row's u, delta and z read
// in scan order, the step size delta_k, the exponent e_k = delta_k + g_k
// gap_delta_k of the step's decay, the input delta_k u_k, the gate
// silu(z_k) and, for the backward pass, the derivatives of the softplus and
// the gate.
template <typename T, bool kBackward>
void prepare_row(const ScanArgs<T>& a, int64_t b, int64_t d,
                 RowBuffers<T>& buf) {
  const int64_t K = a.K;
  const int64_t* order = a.order_of(b);
  T* step = buf.step.data();
  T* e = buf.decay_exp.data();
  T* input = buf.input.data();
  T* gate = buf.gate.data();
  const T* u = buf.u.data();
  a.delta.read(b, d, step);  // raw, then the step sizes in place
  a.u.read(b, d, buf.u.data(), order);
  const bool z = a.z.p != nullptr;
  if (z) a.z.read(b, d, gate, order);  // raw, then the gate in place
  const T bias = a.bias ? a.bias[d] : T(0);
  int64_t k0 = 0;  // where the scalar loops take over
  if constexpr (std::is_same_v<T, float>) {
    for (; k0 + 16 <= K; k0 += 16) {
      const vf16 raw = load16(step + k0) + bias;
      const vf16 sk = a.softplus ? softplus16(raw) : raw;
      store16(step + k0, sk);
      store16(input + k0, sk * load16(u + k0));
      if constexpr (kBackward) {
        store16(buf.dstep_draw.data() + k0,
                a.softplus ? sigmoid16(raw) : splat(1.0f));
      }
      if (z) {
        const vf16 zk = load16(gate + k0);
        const vf16 sig = sigmoid16(zk);
        store16(gate + k0, zk * sig);
        if constexpr (kBackward) {
          store16(buf.dgate.data() + k0, sig * (1.0f + zk * (1.0f - sig)));
        }
      }
    }
  }
  for (int64_t k = k0; k < K; ++k) {
    const T raw = step[k] + bias;
    step[k] = a.softplus ? softplus(raw) : raw;
    input[k] = step[k] * u[k];
    if constexpr (kBackward) {
      buf.dstep_draw[k] = a.softplus ? sigmoid(raw) : T(1);
    }
  }
  if (a.gaps && a.gap_mode == kGapPrev) {
    const T* g = a.gaps + b * K;
    if (K > 0) e[0] = step[0];
#pragma omp simd
    for (int64_t k = 1; k < K; ++k) e[k] = step[k] + g[k] * step[k - 1];
  } else if (a.gaps) {  // 'null': a zero-input token's step
    const T* g = a.gaps + b * K;
    const T gap_step = a.softplus ? softplus(bias) : bias;
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) e[k] = step[k] + g[k] * gap_step;
  } else {
    std::copy(step, step + K, e);
  }
  if (z) {
    for (int64_t k = k0; k < K; ++k) {
      const T zk = gate[k];
      const T s = sigmoid(zk);
      gate[k] = zk * s;
      if constexpr (kBackward) buf.dgate[k] = s * (T(1) + zk * (T(1) - s));
    }
  }
}

// The recurrence over R channels d0..d0+R-1 of batch element b at once: R
// independent dependency chains in flight, and B_k, C_k loaded once for all.
// With kStore, keeps every step's decay and state (R x K x N) for the
// backward pass. bufs[r].y gets C_k . h_k.
template <typename T, int kN, bool kStore, int R>
inline void scan_rows_impl(const ScanArgs<T>& a, int64_t b, int64_t d0,
                           RowBuffers<T>* bufs, T* __restrict h,
                           T* __restrict decay_buf, T* __restrict state_buf) {
  const int64_t N = kN > 0 ? kN : a.N;
  const int64_t K = a.K;
  int64_t sB, sC;
  const T* __restrict Bt = a.B_row(b, sB);
  const T* __restrict Ct = a.C_row(b, sC);
  const T* A[R];
  const T* e[R];
  const T* x[R];
  T* y[R];
  for (int r = 0; r < R; ++r) {
    A[r] = a.A + (d0 + r) * N;
    e[r] = bufs[r].decay_exp.data();
    x[r] = bufs[r].input.data();
    y[r] = bufs[r].y.data();
  }
  if constexpr (std::is_same_v<T, float> && kN == 16) {
    vf16 hv[R], Av[R];
    for (int r = 0; r < R; ++r) {
      hv[r] = vf16{};
      Av[r] = load16(A[r]);
    }
    for (int64_t k = 0; k < K; ++k) {
      const vf16 Bk = load16(Bt + k * sB);
      const vf16 Ck = load16(Ct + k * sC);
      for (int r = 0; r < R; ++r) {
        const vf16 decay = exp16(Av[r] * e[r][k]);
        hv[r] = decay * hv[r] + Bk * x[r][k];
        y[r][k] = sum16(Ck * hv[r]);
        if constexpr (kStore) {
          store16(decay_buf + (r * K + k) * 16, decay);
          store16(state_buf + (r * K + k) * 16, hv[r]);
        }
      }
    }
    return;
  }
  std::fill(h, h + R * N, T(0));
  for (int64_t k = 0; k < K; ++k) {
    const T* Bk = Bt + k * sB;
    const T* Ck = Ct + k * sC;
    for (int r = 0; r < R; ++r) {
      const T ek = e[r][k], xk = x[r][k];
      const T* Ar = A[r];
      T* hr = h + r * N;
      T yk = 0;
#pragma omp simd reduction(+ : yk)
      for (int64_t n = 0; n < N; ++n) {
        const T decay = fast_exp(ek * Ar[n]);
        const T hn = decay * hr[n] + xk * Bk[n];
        hr[n] = hn;
        yk += Ck[n] * hn;
        if constexpr (kStore) {
          decay_buf[(r * K + k) * N + n] = decay;
          state_buf[(r * K + k) * N + n] = hn;
        }
      }
      y[r][k] = yk;
    }
  }
}

template <typename T, int kN, bool kStore, int R>
void scan_rows(const ScanArgs<T>& a, int64_t b, int64_t d0,
               RowBuffers<T>* bufs, T* decay_buf, T* state_buf) {
  if constexpr (kN > 0) {
    T h[R * kN];  // small enough to live in registers
    scan_rows_impl<T, kN, kStore, R>(a, b, d0, bufs, h, decay_buf,
                                     state_buf);
  } else {
    std::vector<T> h(R * a.N);
    scan_rows_impl<T, kN, kStore, R>(a, b, d0, bufs, h.data(), decay_buf,
                                     state_buf);
  }
}

// Rows per block of the forward pass.
constexpr int kRowBlock = 4;

template <typename T, int kN>
void forward_block(const ScanArgs<T>& a, int64_t b, int64_t d0, int rows,
                   RowBuffers<T>* bufs) {
  for (int r = 0; r < rows; ++r) prepare_row<T, false>(a, b, d0 + r, bufs[r]);
  if (rows == kRowBlock) {
    scan_rows<T, kN, false, kRowBlock>(a, b, d0, bufs, nullptr, nullptr);
  } else {
    for (int r = 0; r < rows; ++r) {
      scan_rows<T, kN, false, 1>(a, b, d0 + r, bufs + r, nullptr, nullptr);
    }
  }
  for (int r = 0; r < rows; ++r) {
    const int64_t d = d0 + r;
    const T* u = bufs[r].u.data();
    const T Dv = a.D ? a.D[d] : T(0);
    T* y = bufs[r].y.data();
    const T* gate = bufs[r].gate.data();
    if (a.z.p) {
#pragma omp simd
      for (int64_t k = 0; k < a.K; ++k) y[k] = (y[k] + Dv * u[k]) * gate[k];
    } else {
#pragma omp simd
      for (int64_t k = 0; k < a.K; ++k) y[k] = y[k] + Dv * u[k];
    }
    a.out.write(b, d, y, a.order_of(b));
  }
}

template <typename T>
struct GradArgs {
  Rows<T> dout, du, ddelta, dz;  // dz.p null without z
  T *dA_part, *dD_part, *dbias_part;  // (batch, dim[, N]): summed over batch later
};

// Backward over one row; dB_loc/dC_loc (K x N) are this thread's sums over
// the channels it has processed for batch element b.
template <typename T, int kN>
void backward_row(const ScanArgs<T>& a, const GradArgs<T>& g, int64_t b,
                  int64_t d, RowBuffers<T>& buf, T* decay_buf,
                  T* state_buf, T* dh, T* dA_loc, T* dB_loc, T* dC_loc) {
  const int64_t N = kN > 0 ? kN : a.N;
  const int64_t K = a.K;
  const int64_t* order = a.order_of(b);
  prepare_row<T, true>(a, b, d, buf);
  scan_rows<T, kN, true, 1>(a, b, d, &buf, decay_buf, state_buf);

  const T* u = buf.u.data();
  const T* A = a.A + d * N;
  int64_t sB, sC;
  const T* Bt = a.B_row(b, sB);
  const T* Ct = a.C_row(b, sC);
  const T* gaps = a.gaps ? a.gaps + b * K : nullptr;
  T* dout = buf.dout.data();
  g.dout.read(b, d, dout, order);
  const T Dv = a.D ? a.D[d] : T(0);
  const T* step = buf.step.data();
  const T* e = buf.decay_exp.data();
  T* dy_buf = buf.gate.data();  // the gate is read once per k, then reused
  T* dstep = buf.input.data();  // d loss / d step_k, filled in reverse

  // Gate and skip terms, vectorised over k.
  T dD = 0;
  if (a.z.p) {
    const T* dgate = buf.dgate.data();
    const T* y = buf.y.data();
    T* dz = buf.dz.data();
#pragma omp simd reduction(+ : dD)
    for (int64_t k = 0; k < K; ++k) {
      dz[k] = dout[k] * (y[k] + Dv * u[k]) * dgate[k];
      dy_buf[k] = dout[k] * dy_buf[k];
      dD += dy_buf[k] * u[k];
    }
    g.dz.write(b, d, dz, order);
  } else {
#pragma omp simd reduction(+ : dD)
    for (int64_t k = 0; k < K; ++k) {
      dy_buf[k] = dout[k];
      dD += dout[k] * u[k];
    }
  }

  std::fill(dh, dh + N, T(0));
  std::fill(dA_loc, dA_loc + N, T(0));
  T dgap_null = 0;
  T dstep_from_next = 0;  // 'prev': step k+1's gap decays with delta_k
  T* du = buf.du.data();
  [[maybe_unused]] vf16 dh_v{}, dA_v{}, A_v{};
  constexpr bool kVec16 = std::is_same_v<T, float> && kN == 16;
  if constexpr (kVec16) A_v = load16(A);
  for (int64_t k = K - 1; k >= 0; --k) {
    const T dy = dy_buf[k], uk = u[k], sk = step[k], ek = e[k];
    const T* Bk = Bt + k * sB;
    const T* Ck = Ct + k * sC;
    const T* decay = decay_buf + k * N;
    const T* state = state_buf + k * N;
    // h_{-1} = 0: the decay of the first step has no gradient
    const T* prev_state = k > 0 ? state_buf + (k - 1) * N : nullptr;
    T* dBk = dB_loc + k * N;
    T* dCk = dC_loc + k * N;
    T de = 0, dBu = 0;
    const T xk = sk * uk;
    if constexpr (kVec16) {
      const vf16 decay_v = load16(decay);
      const vf16 dhn = dh_v + load16(Ck) * dy;
      store16(dCk, load16(dCk) + load16(state) * dy);
      const vf16 d_decay =
          prev_state ? dhn * load16(prev_state) * decay_v : vf16{};
      dA_v += d_decay * ek;
      store16(dBk, load16(dBk) + dhn * xk);
      sum2x16(d_decay * A_v, dhn * load16(Bk), de, dBu);
      dh_v = dhn * decay_v;
    } else if (prev_state) {
#pragma omp simd reduction(+ : de, dBu)
      for (int64_t n = 0; n < N; ++n) {
        const T dhn = dh[n] + dy * Ck[n];
        dCk[n] += dy * state[n];
        const T d_decay = dhn * prev_state[n] * decay[n];  // d(decay) decay
        de += d_decay * A[n];
        dA_loc[n] += d_decay * ek;
        dBk[n] += dhn * xk;
        dBu += dhn * Bk[n];
        dh[n] = dhn * decay[n];
      }
    } else {
#pragma omp simd reduction(+ : dBu)
      for (int64_t n = 0; n < N; ++n) {
        const T dhn = dh[n] + dy * Ck[n];
        dCk[n] += dy * state[n];
        dBk[n] += dhn * xk;
        dBu += dhn * Bk[n];
      }
    }
    du[k] = dy * Dv + dBu * sk;
    dstep[k] = dBu * uk + de + dstep_from_next;
    dstep_from_next = 0;
    if (gaps && gaps[k] > T(0)) {
      if (a.gap_mode == kGapPrev) {
        dstep_from_next = de * gaps[k];
      } else {
        dgap_null += de * gaps[k];
      }
    }
  }
  g.du.write(b, d, du, order);
  T dbias = 0;
  T* ddelta = dstep;  // in place
  const T* dstep_draw = buf.dstep_draw.data();
#pragma omp simd reduction(+ : dbias)
  for (int64_t k = 0; k < K; ++k) {
    ddelta[k] = dstep[k] * dstep_draw[k];
    dbias += ddelta[k];
  }
  g.ddelta.write(b, d, ddelta);
  const int64_t bd = b * a.dim + d;
  if constexpr (kVec16) store16(dA_loc, dA_v);
  for (int64_t n = 0; n < N; ++n) g.dA_part[bd * N + n] = dA_loc[n];
  g.dD_part[bd] = dD;
  const T bias = a.bias ? a.bias[d] : T(0);
  g.dbias_part[bd] =
      dbias + (a.softplus ? dgap_null * sigmoid(bias) : dgap_null);
}

int num_threads() { return std::max(1, at::get_num_threads()); }

// The gaps g_k = p_k - p_{k-1} - 1 (g_0 = 0: h_0 = 0, a leading gap changes
// nothing), as T; computed once per call, shared by all channels.
// In scan order: reversed, step j is token K-1-j and its gap is the one
// to the token after it.
template <typename T>
std::vector<T> compute_gaps(const std::optional<at::Tensor>& pos,
                            int64_t gap_mode, int64_t batch, int64_t K,
                            bool reverse) {
  std::vector<T> gaps;
  if (!pos || gap_mode == kGapNone) return gaps;
  check_tensor(*pos, "positions", at::kLong, {batch, K});
  gaps.resize(batch * K);
  const int64_t* p = pos->data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t* pb = p + b * K;
    for (int64_t j = 0; j < K; ++j) {
      int64_t g = 0;
      if (j > 0) g = reverse ? pb[K - j] - pb[K - 1 - j] : pb[j] - pb[j - 1];
      gaps[b * K + j] = j > 0 ? static_cast<T>(g - 1) : T(0);
    }
  }
  return gaps;
}

template <typename T>
ScanArgs<T> make_args(const at::Tensor& u, const at::Tensor& delta,
                      const at::Tensor& A, const at::Tensor& Bt,
                      const at::Tensor& Ct,
                      const std::optional<at::Tensor>& D,
                      const std::optional<at::Tensor>& z,
                      const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& pos,
                      const std::optional<at::Tensor>& order,
                      const std::vector<T>& gaps, bool softplus,
                      int64_t gap_mode, bool reverse) {
  TORCH_CHECK(u.dim() == 3, "u must be (batch, dim, K)");
  TORCH_CHECK(A.dim() == 2, "A must be (dim, N)");
  TORCH_CHECK(gap_mode >= kGapNone && gap_mode <= kGapNull,
              "gap_mode must be 0 (none), 1 (prev) or 2 (null)");
  TORCH_CHECK(!(order && reverse), "order and reverse are exclusive");
  const int64_t batch = u.size(0), dim = u.size(1), K = u.size(2);
  const int64_t N = A.size(1);
  const auto dtype = u.scalar_type();
  check_tensor(u, "u", dtype, {batch, dim, K}, false);
  check_tensor(delta, "delta", dtype, {batch, dim, K}, false);
  check_tensor(A, "A", dtype, {dim, N});
  check_tensor(Bt, "B (transposed)", dtype, {batch, K, N}, false);
  check_tensor(Ct, "C (transposed)", dtype, {batch, K, N}, false);
  TORCH_CHECK(N <= 1 || (Bt.stride(2) == 1 && Ct.stride(2) == 1),
              "B and C must be contiguous along N");
  if (D) check_tensor(*D, "D", dtype, {dim});
  if (z) check_tensor(*z, "z", dtype, {batch, dim, K}, false);
  if (bias) check_tensor(*bias, "delta_bias", dtype, {dim});
  if (pos) check_tensor(*pos, "positions", at::kLong, {batch, K});
  ScanArgs<T> a;
  a.u = Rows<T>(u, reverse);
  a.delta = Rows<T>(delta, reverse);
  if (z) a.z = Rows<T>(*z, reverse);
  a.A = A.data_ptr<T>();
  a.Bt = Bt.data_ptr<T>();
  a.Ct = Ct.data_ptr<T>();
  a.sBb = Bt.stride(0);
  a.sBk = Bt.stride(1);
  a.sCb = Ct.stride(0);
  a.sCk = Ct.stride(1);
  a.D = D ? D->data_ptr<T>() : nullptr;
  a.bias = bias ? bias->data_ptr<T>() : nullptr;
  a.gaps = gaps.empty() ? nullptr : gaps.data();
  a.order = nullptr;
  a.order_sb = 0;
  if (order) {
    TORCH_CHECK(order->dim() == 2 && order->size(1) == K &&
                    (order->size(0) == 1 || order->size(0) == batch),
                "order must be (batch or 1, K)");
    check_tensor(*order, "order", at::kLong, order->sizes().vec());
    a.order = order->data_ptr<int64_t>();
    a.order_sb = order->size(0) == 1 ? 0 : K;
  }
  a.dim = dim;
  a.K = K;
  a.N = N;
  a.softplus = softplus;
  a.reverse = reverse;
  a.gap_mode = gap_mode;
  return a;
}

template <typename T, int kN>
void forward_impl(const ScanArgs<T>& a, int64_t batch) {
  const int64_t blocks_per_batch = (a.dim + kRowBlock - 1) / kRowBlock;
  const int64_t blocks = batch * blocks_per_batch;
#pragma omp parallel num_threads(num_threads())
  {
    std::vector<RowBuffers<T>> bufs(kRowBlock, RowBuffers<T>(a.K));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < blocks; ++i) {
      const int64_t b = i / blocks_per_batch;
      const int64_t d0 = (i % blocks_per_batch) * kRowBlock;
      const int rows = static_cast<int>(std::min<int64_t>(kRowBlock,
                                                          a.dim - d0));
      forward_block<T, kN>(a, b, d0, rows, bufs.data());
    }
  }
}

template <typename T, int kN>
void backward_impl(const ScanArgs<T>& a, const GradArgs<T>& g, int64_t batch,
                   T* dBt, T* dCt) {
  const int64_t K = a.K, N = a.N, KN = K * N;
  const int threads = num_threads();
  // Per-thread partial sums of dB and dC over channels, for one batch element.
  std::vector<T> partial(static_cast<size_t>(threads) * 2 * KN);
#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num();
    const int team = omp_get_num_threads();
#else
    const int tid = 0;
    const int team = 1;
#endif
    std::vector<T> dh(N), dA_loc(N);
    std::vector<T> decay_buf(KN), state_buf(KN);
    RowBuffers<T> buf(K);
    T* dB_loc = partial.data() + static_cast<size_t>(tid) * 2 * KN;
    T* dC_loc = dB_loc + KN;
    for (int64_t b = 0; b < batch; ++b) {
      std::fill(dB_loc, dB_loc + 2 * KN, T(0));
#pragma omp for schedule(static)
      for (int64_t d = 0; d < a.dim; ++d) {
        backward_row<T, kN>(a, g, b, d, buf, decay_buf.data(),
                            state_buf.data(), dh.data(), dA_loc.data(),
                            dB_loc, dC_loc);
      }  // implicit barrier: every thread's partial sums are complete
#pragma omp for schedule(static)
      for (int64_t i = 0; i < KN; ++i) {
        T sb = 0, sc = 0;
        for (int t = 0; t < team; ++t) {
          sb += partial[static_cast<size_t>(t) * 2 * KN + i];
          sc += partial[static_cast<size_t>(t) * 2 * KN + KN + i];
        }
        // i is (scan step, n); dBt, dCt are in token order
        const int64_t at = a.u.index(i / N) * N + i % N;
        dBt[b * KN + at] = sb;
        dCt[b * KN + at] = sc;
      }  // implicit barrier before the buffers are cleared again
    }
  }
}

}  // namespace

at::Tensor selective_scan_fwd(const at::Tensor& u, const at::Tensor& delta,
               const at::Tensor& A, const at::Tensor& Bt, const at::Tensor& Ct,
               const std::optional<at::Tensor>& D,
               const std::optional<at::Tensor>& z,
               const std::optional<at::Tensor>& delta_bias,
               const std::optional<at::Tensor>& positions,
               const std::optional<at::Tensor>& order, bool softplus,
               int64_t gap_mode, bool reverse) {
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
              "the CPU selective scan computes in float32 or float64, got ",
              u.scalar_type());
  auto out = empty_layout(u);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_fwd", [&] {
    const auto gaps = compute_gaps<scalar_t>(positions, gap_mode, u.size(0),
                                             u.size(2), reverse);
    auto a = make_args<scalar_t>(u, delta, A, Bt, Ct, D, z, delta_bias,
                                 positions, order, gaps, softplus, gap_mode,
                                 reverse);
    a.out = Rows<scalar_t>(out, reverse);
    if (a.N == 16) {
      forward_impl<scalar_t, 16>(a, u.size(0));
    } else {
      forward_impl<scalar_t, 0>(a, u.size(0));
    }
  });
  return out;
}

std::vector<std::optional<at::Tensor>> selective_scan_bwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
    const at::Tensor& Bt, const at::Tensor& Ct,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias,
    const std::optional<at::Tensor>& positions,
    const std::optional<at::Tensor>& order, const at::Tensor& dout,
    bool softplus, int64_t gap_mode, bool reverse) {
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
              "the CPU selective scan computes in float32 or float64, got ",
              u.scalar_type());
  check_tensor(dout, "dout", u.scalar_type(), u.sizes().vec(), false);
  const int64_t batch = u.size(0), dim = u.size(1);
  auto du = empty_layout(u);
  auto ddelta = empty_layout(delta);
  auto dz = z ? empty_layout(*z) : at::Tensor();
  auto dBt = at::empty(Bt.sizes(), Bt.options());
  auto dCt = at::empty(Ct.sizes(), Ct.options());
  auto dA_part = at::empty({batch, dim, A.size(1)}, u.options());
  auto dD_part = at::empty({batch, dim}, u.options());
  auto dbias_part = at::empty({batch, dim}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_bwd", [&] {
    const auto gaps = compute_gaps<scalar_t>(positions, gap_mode, u.size(0),
                                             u.size(2), reverse);
    auto a = make_args<scalar_t>(u, delta, A, Bt, Ct, D, z, delta_bias,
                                 positions, order, gaps, softplus, gap_mode,
                                 reverse);
    GradArgs<scalar_t> g;
    g.dout = Rows<scalar_t>(dout, reverse);
    g.du = Rows<scalar_t>(du, reverse);
    g.ddelta = Rows<scalar_t>(ddelta, reverse);
    if (z) g.dz = Rows<scalar_t>(dz, reverse);
    g.dA_part = dA_part.data_ptr<scalar_t>();
    g.dD_part = dD_part.data_ptr<scalar_t>();
    g.dbias_part = dbias_part.data_ptr<scalar_t>();
    if (a.N == 16) {
      backward_impl<scalar_t, 16>(a, g, batch, dBt.data_ptr<scalar_t>(),
                                  dCt.data_ptr<scalar_t>());
    } else {
      backward_impl<scalar_t, 0>(a, g, batch, dBt.data_ptr<scalar_t>(),
                                 dCt.data_ptr<scalar_t>());
    }
  });
  std::optional<at::Tensor> dD, dzo, dbias;
  if (D) dD = dD_part.sum(0);
  if (z) dzo = dz;
  if (delta_bias) dbias = dbias_part.sum(0);
  return {du, ddelta, dA_part.sum(0), dBt, dCt, dD, dzo, dbias};
}

}  // namespace mmssm
