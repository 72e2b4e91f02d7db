// Selective scan with pruning-aware hidden-state alignment: CPU kernel.
//
// One (batch, channel) row is one independent recurrence; rows run in
// parallel with OpenMP, and the state dimension N is the SIMD axis. The
// kernel takes the original positions of the K scanned tokens and folds the
// gap before each token into that token's decay (see mmssm/ops/
// selective_scan.py for the math):
//
//   e_k = delta_k + g_k * gap_delta_k,  h_k = exp(e_k A) h_{k-1} + delta_k B_k u_k
//
// so a pruned sequence costs K steps, not L. The backward pass recomputes the
// row's forward states into a thread-local buffer (K x N, cache resident for
// the shapes we use) and then runs the reverse recurrence.
//
// Layout (made contiguous by the Python wrapper): u, delta, z, out:
// (batch, dim, K); A: (dim, N); Bt, Ct: (batch, K, N); D, delta_bias: (dim);
// positions: int64 (batch, K).

#include <torch/extension.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace mmssm {
namespace {

enum GapMode : int64_t { kGapNone = 0, kGapPrev = 1, kGapNull = 2 };

// exp for float32, written so that the compiler vectorises it over N
// (Cody-Waite range reduction, Cephes' degree-6 polynomial; max relative
// error ~2 ulp). The result of exp(x) for x < -87.3 is flushed to ~1e-38,
// which is 0 to the recurrence. NaN propagates.
inline float exp_simd(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * std::bit_cast<float>(bits);
}

inline double exp_simd(double x) { return std::exp(x); }

template <typename T>
inline T softplus(T x) {
  return x <= T(20) ? std::log1p(std::exp(x)) : x;
}

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// Pointers to one call's tensors.
template <typename T>
struct ScanArgs {
  const T *u, *delta, *A, *Bt, *Ct, *D, *z, *bias;
  const int64_t* pos;
  int64_t dim, K, N;
  bool softplus;
  int64_t gap_mode;
};

// Per-row scalar bookkeeping shared by forward and backward.
template <typename T>
struct RowState {
  T bias = 0, gap_null = 0;
};

template <typename T>
inline RowState<T> row_state(const ScanArgs<T>& a, int64_t d) {
  RowState<T> s;
  s.bias = a.bias ? a.bias[d] : T(0);
  s.gap_null = a.softplus ? softplus(s.bias) : s.bias;
  return s;
}

// Pruned tokens before kept token k (the leading gap counts 0: h_0 = 0).
inline int64_t gap_before(const int64_t* pos, int64_t k) {
  return (pos && k > 0) ? pos[k] - pos[k - 1] - 1 : 0;
}

// Forward over one row. With kStore, keeps every step's decay and state
// (K x N each) and the ungated output (K) for the backward pass.
template <typename T, int kN, bool kStore>
void forward_row(const ScanArgs<T>& a, int64_t b, int64_t d, T* h, T* out,
                 T* decay_buf, T* state_buf, T* y_buf) {
  const int64_t N = kN > 0 ? kN : a.N;
  const int64_t K = a.K;
  const int64_t row = (b * a.dim + d) * K;
  const T* u = a.u + row;
  const T* delta = a.delta + row;
  const T* z = a.z ? a.z + row : nullptr;
  const T* A = a.A + d * N;
  const T* Bt = a.Bt + b * K * N;
  const T* Ct = a.Ct + b * K * N;
  const int64_t* pos = a.pos ? a.pos + b * K : nullptr;
  const T Dv = a.D ? a.D[d] : T(0);
  const RowState<T> rs = row_state(a, d);

  std::fill(h, h + N, T(0));
  T delta_prev = 0;
  for (int64_t k = 0; k < K; ++k) {
    const T raw = delta[k] + rs.bias;
    const T dk = a.softplus ? softplus(raw) : raw;
    const int64_t g = gap_before(pos, k);
    T e = dk;
    if (g > 0) {
      e += T(g) * (a.gap_mode == kGapPrev ? delta_prev : rs.gap_null);
    }
    const T du = dk * u[k];
    const T* Bk = Bt + k * N;
    const T* Ck = Ct + k * N;
    T y = 0;
#pragma omp simd reduction(+ : y)
    for (int64_t n = 0; n < N; ++n) {
      const T decay = exp_simd(e * A[n]);
      const T hn = decay * h[n] + du * Bk[n];
      h[n] = hn;
      y += Ck[n] * hn;
      if constexpr (kStore) {
        decay_buf[k * N + n] = decay;
        state_buf[k * N + n] = hn;
      }
    }
    y += Dv * u[k];
    if constexpr (kStore) {
      y_buf[k] = y;
    } else {
      out[row + k] = z ? y * z[k] * sigmoid(z[k]) : y;
    }
    delta_prev = dk;
  }
}

template <typename T>
struct GradArgs {
  const T* dout;
  T *du, *ddelta, *dz;
  T *dA_part, *dD_part, *dbias_part;  // (batch, dim[, N]): summed over batch later
};

// Backward over one row; dB_loc/dC_loc (K x N) are this thread's sums over
// the channels it has processed for batch element b.
template <typename T, int kN>
void backward_row(const ScanArgs<T>& a, const GradArgs<T>& g, int64_t b,
                  int64_t d, T* h, T* decay_buf, T* state_buf, T* y_buf,
                  T* dh, T* dA_loc, T* dB_loc, T* dC_loc) {
  const int64_t N = kN > 0 ? kN : a.N;
  const int64_t K = a.K;
  const int64_t row = (b * a.dim + d) * K;
  forward_row<T, kN, true>(a, b, d, h, nullptr, decay_buf, state_buf, y_buf);

  const T* u = a.u + row;
  const T* delta = a.delta + row;
  const T* z = a.z ? a.z + row : nullptr;
  const T* A = a.A + d * N;
  const T* Bt = a.Bt + b * K * N;
  const T* Ct = a.Ct + b * K * N;
  const int64_t* pos = a.pos ? a.pos + b * K : nullptr;
  const T* dout = g.dout + row;
  const T Dv = a.D ? a.D[d] : T(0);
  const RowState<T> rs = row_state(a, d);

  std::fill(dh, dh + N, T(0));
  std::fill(dA_loc, dA_loc + N, T(0));
  T dD = 0, dbias = 0, dgap_null = 0;
  T ddelta_from_next = 0;  // 'prev': step k+1's gap decays with delta_k
  for (int64_t k = K - 1; k >= 0; --k) {
    const T raw = delta[k] + rs.bias;
    const T dk = a.softplus ? softplus(raw) : raw;
    const int64_t gap = gap_before(pos, k);
    T e = dk;
    if (gap > 0) {
      const T delta_prev =
          a.gap_mode == kGapPrev
              ? (a.softplus ? softplus(delta[k - 1] + rs.bias)
                            : delta[k - 1] + rs.bias)
              : rs.gap_null;
      e += T(gap) * delta_prev;
    }
    T dy = dout[k];
    if (z) {
      const T s = sigmoid(z[k]);
      g.dz[row + k] = dout[k] * y_buf[k] * s * (T(1) + z[k] * (T(1) - s));
      dy = dout[k] * z[k] * s;
    }
    dD += dy * u[k];
    const T uk = u[k];
    const T* Bk = Bt + k * N;
    const T* Ck = Ct + k * N;
    const T* decay = decay_buf + k * N;
    const T* state = state_buf + k * N;
    const T* prev_state = k > 0 ? state_buf + (k - 1) * N : nullptr;
    T* dBk = dB_loc + k * N;
    T* dCk = dC_loc + k * N;
    T de = 0, dBu = 0;
#pragma omp simd reduction(+ : de, dBu)
    for (int64_t n = 0; n < N; ++n) {
      const T dhn = dh[n] + dy * Ck[n];
      dCk[n] += dy * state[n];
      const T hp = prev_state ? prev_state[n] : T(0);
      const T d_decay = dhn * hp * decay[n];  // d(decay) * decay
      de += d_decay * A[n];
      dA_loc[n] += d_decay * e;
      dBk[n] += dhn * dk * uk;
      dBu += dhn * Bk[n];
      dh[n] = dhn * decay[n];
    }
    g.du[row + k] = dy * Dv + dBu * dk;
    const T ddk = dBu * uk + de + ddelta_from_next;
    ddelta_from_next = 0;
    if (gap > 0) {
      if (a.gap_mode == kGapPrev) {
        ddelta_from_next = de * T(gap);
      } else {
        dgap_null += de * T(gap);
      }
    }
    const T draw = a.softplus ? ddk * sigmoid(raw) : ddk;
    g.ddelta[row + k] = draw;
    dbias += draw;
  }
  const int64_t bd = b * a.dim + d;
  for (int64_t n = 0; n < N; ++n) g.dA_part[bd * N + n] = dA_loc[n];
  g.dD_part[bd] = dD;
  g.dbias_part[bd] =
      dbias + (a.softplus ? dgap_null * sigmoid(rs.bias) : dgap_null);
}

int num_threads() { return std::max(1, at::get_num_threads()); }

// ---------------------------------------------------------------------------
// Argument checks (the Python wrapper checks the user's input; these guard
// the kernel's own contract).
// ---------------------------------------------------------------------------
void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype,
                  std::vector<int64_t> shape) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(),
              ", expected ", dtype);
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), name, " has shape ",
              t.sizes(), ", expected ", at::IntArrayRef(shape));
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

template <typename T>
ScanArgs<T> make_args(const at::Tensor& u, const at::Tensor& delta,
                      const at::Tensor& A, const at::Tensor& Bt,
                      const at::Tensor& Ct,
                      const std::optional<at::Tensor>& D,
                      const std::optional<at::Tensor>& z,
                      const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& pos, bool softplus,
                      int64_t gap_mode) {
  TORCH_CHECK(u.dim() == 3, "u must be (batch, dim, K)");
  TORCH_CHECK(A.dim() == 2, "A must be (dim, N)");
  TORCH_CHECK(gap_mode >= kGapNone && gap_mode <= kGapNull,
              "gap_mode must be 0 (none), 1 (prev) or 2 (null)");
  const int64_t batch = u.size(0), dim = u.size(1), K = u.size(2);
  const int64_t N = A.size(1);
  const auto dtype = u.scalar_type();
  check_tensor(u, "u", dtype, {batch, dim, K});
  check_tensor(delta, "delta", dtype, {batch, dim, K});
  check_tensor(A, "A", dtype, {dim, N});
  check_tensor(Bt, "B (transposed)", dtype, {batch, K, N});
  check_tensor(Ct, "C (transposed)", dtype, {batch, K, N});
  if (D) check_tensor(*D, "D", dtype, {dim});
  if (z) check_tensor(*z, "z", dtype, {batch, dim, K});
  if (bias) check_tensor(*bias, "delta_bias", dtype, {dim});
  if (pos) check_tensor(*pos, "positions", at::kLong, {batch, K});
  ScanArgs<T> a;
  a.u = u.data_ptr<T>();
  a.delta = delta.data_ptr<T>();
  a.A = A.data_ptr<T>();
  a.Bt = Bt.data_ptr<T>();
  a.Ct = Ct.data_ptr<T>();
  a.D = D ? D->data_ptr<T>() : nullptr;
  a.z = z ? z->data_ptr<T>() : nullptr;
  a.bias = bias ? bias->data_ptr<T>() : nullptr;
  a.pos = (pos && gap_mode != kGapNone) ? pos->data_ptr<int64_t>() : nullptr;
  a.dim = dim;
  a.K = K;
  a.N = N;
  a.softplus = softplus;
  a.gap_mode = gap_mode;
  return a;
}

template <typename T, int kN>
void forward_impl(const ScanArgs<T>& a, int64_t batch, T* out) {
  const int64_t rows = batch * a.dim;
#pragma omp parallel num_threads(num_threads())
  {
    std::vector<T> h(a.N);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      forward_row<T, kN, false>(a, r / a.dim, r % a.dim, h.data(), out,
                                nullptr, nullptr, nullptr);
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
    std::vector<T> h(N), dh(N), dA_loc(N), y_buf(K);
    std::vector<T> decay_buf(KN), state_buf(KN);
    T* dB_loc = partial.data() + static_cast<size_t>(tid) * 2 * KN;
    T* dC_loc = dB_loc + KN;
    for (int64_t b = 0; b < batch; ++b) {
      std::fill(dB_loc, dB_loc + 2 * KN, T(0));
#pragma omp for schedule(static)
      for (int64_t d = 0; d < a.dim; ++d) {
        backward_row<T, kN>(a, g, b, d, h.data(), decay_buf.data(),
                            state_buf.data(), y_buf.data(), dh.data(),
                            dA_loc.data(), dB_loc, dC_loc);
      }  // implicit barrier: every thread's partial sums are complete
#pragma omp for schedule(static)
      for (int64_t i = 0; i < KN; ++i) {
        T sb = 0, sc = 0;
        for (int t = 0; t < team; ++t) {
          sb += partial[static_cast<size_t>(t) * 2 * KN + i];
          sc += partial[static_cast<size_t>(t) * 2 * KN + KN + i];
        }
        dBt[b * KN + i] = sb;
        dCt[b * KN + i] = sc;
      }  // implicit barrier before the buffers are cleared again
    }
  }
}

}  // namespace

at::Tensor fwd(const at::Tensor& u, const at::Tensor& delta,
               const at::Tensor& A, const at::Tensor& Bt, const at::Tensor& Ct,
               const std::optional<at::Tensor>& D,
               const std::optional<at::Tensor>& z,
               const std::optional<at::Tensor>& delta_bias,
               const std::optional<at::Tensor>& positions, bool softplus,
               int64_t gap_mode) {
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
              "the CPU selective scan computes in float32 or float64, got ",
              u.scalar_type());
  auto out = at::empty_like(u);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_fwd", [&] {
    auto a = make_args<scalar_t>(u, delta, A, Bt, Ct, D, z, delta_bias,
                                 positions, softplus, gap_mode);
    if (a.N == 16) {
      forward_impl<scalar_t, 16>(a, u.size(0), out.data_ptr<scalar_t>());
    } else {
      forward_impl<scalar_t, 0>(a, u.size(0), out.data_ptr<scalar_t>());
    }
  });
  return out;
}

std::vector<std::optional<at::Tensor>> bwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
    const at::Tensor& Bt, const at::Tensor& Ct,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias,
    const std::optional<at::Tensor>& positions, const at::Tensor& dout,
    bool softplus, int64_t gap_mode) {
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
              "the CPU selective scan computes in float32 or float64, got ",
              u.scalar_type());
  check_tensor(dout, "dout", u.scalar_type(), u.sizes().vec());
  const int64_t batch = u.size(0), dim = u.size(1);
  auto du = at::empty_like(u);
  auto ddelta = at::empty_like(u);
  auto dz = z ? at::empty_like(u) : at::Tensor();
  auto dBt = at::empty_like(Bt);
  auto dCt = at::empty_like(Ct);
  auto dA_part = at::empty({batch, dim, A.size(1)}, u.options());
  auto dD_part = at::empty({batch, dim}, u.options());
  auto dbias_part = at::empty({batch, dim}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_bwd", [&] {
    auto a = make_args<scalar_t>(u, delta, A, Bt, Ct, D, z, delta_bias,
                                 positions, softplus, gap_mode);
    GradArgs<scalar_t> g;
    g.dout = dout.data_ptr<scalar_t>();
    g.du = du.data_ptr<scalar_t>();
    g.ddelta = ddelta.data_ptr<scalar_t>();
    g.dz = z ? dz.data_ptr<scalar_t>() : nullptr;
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmssm compiled ops: the aligned selective scan on the CPU";
  m.def("fwd", &mmssm::fwd, "aligned selective scan, forward (CPU)");
  m.def("bwd", &mmssm::bwd, "aligned selective scan, backward (CPU)");
}
