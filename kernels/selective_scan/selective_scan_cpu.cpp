// Selective scan with pruning-aware hidden-state alignment: CPU kernel.
//
// The kernel takes the original positions of the K scanned tokens and folds
// the gap before each token into that token's decay (see docs/scan.md for
// the math):
//
//   e_k = delta_k + g_k * gap_delta_k,  h_k = exp(e_k A) h_{k-1} + delta_k B_k u_k
//
// so a pruned sequence costs K steps, not L.
//
// Vectorised across CHANNELS: a tile of W channels (W lanes of the native
// vector, kernels/common/simd.h; 4 floats generic, 8 with AVX2) of one batch
// element runs as one unit, each lane its own recurrence. The N states of a
// tile are N vectors; B_k[n] and C_k[n] are shared by the channels and
// broadcast; the output C_k . h_k is a sum over n within each lane, so the
// inner loop has no horizontal sums. Tiles run in parallel with OpenMP.
//
// The K steps run in chunks of kChunk: a chunk's u, delta and z are read
// into W-lane buffers ("packed"), prepared vectorised (softplus, the decay
// exponents, the gate), scanned, and the outputs written back. Packing reads
// any strides: a (batch, dim, K) view of a Linear layer's (batch, K, dim)
// output (channels contiguous) is one vector load per step, the contiguous
// (batch, dim, K) layout W strided loads.
//
// Backward: from the state at the start of every chunk (the checkpoints,
// which the forward stores when asked, (batch, dim, chunks, N); otherwise a
// first pass of the backward recomputes them), chunk by chunk from the last,
// the chunk's states and decays are recomputed into a buffer (kChunk x N
// vectors, cache resident) and the reverse recurrence runs over them. dB
// and dC are sums over channels: each tile's lanes are reduced (row_sums)
// into this thread's (K, N) partial sums, which are summed over the
// threads in a fixed order.
//
// Scan order: `reverse` scans from the last token to the first (Vim's
// backward direction, without flipped copies; the gaps are then those
// between each token and the one after it); `order` (batch or 1, K), a
// permutation, makes step j read u and z at token order[j] and write its
// output there, while delta, B, C and the positions stay per step
// (PlainMamba's zig-zag scans, whose step inputs come from the raster token,
// without gathered copies).
//
// Fused step-size projection (mamba-ssm's dt_proj): with `delta_proj` (dim,
// R), `delta` is the low-rank (batch, R, K) input and the step sizes are
// delta_proj @ delta, computed in the preparation pass (R FMAs per W-lane
// vector and step, the tile's weights transposed once per tile; the chunk's
// low-rank rows are read once per thread and chunk, shared by its tiles),
// so no (batch, dim, K) step-size tensor is read. The backward pass
// returns the gradient of the full step sizes (batch, dim, K), tokens-major;
// the op (mmssm/ops/selective_scan.py) turns it into those of delta and
// delta_proj with two GEMMs.
//
// Layout: u, delta, z, dout: (batch, dim, K) with any strides; out, du,
// ddelta, dz in the layout of their input (empty_layout); Bt, Ct: (batch, K,
// N) with N contiguous and any other strides (slices of x_proj's output);
// A: (dim, N); D, delta_bias: (dim); positions, order: int64, contiguous;
// dBt, dCt: contiguous. float64 runs the same code (lanes of doubles, libm):
// the tests compare it with the PyTorch reference to 1e-10.

#include "selective_scan_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../common/check_tensor.h"
#include "../common/simd.h"
#include "../common/tiles.h"

namespace mmssm {
inline namespace MMSSM_ISA {
namespace {

enum GapMode : int64_t { kGapNone = 0, kGapPrev = 1, kGapNull = 2 };

// Steps per chunk: a chunk's states and decays (2 x kChunk x N vectors,
// 32 KiB for N = 16 with AVX2) stay in L1/L2 during the backward pass.
constexpr int64_t kChunk = kScanChunk;

int num_threads() { return std::max(1, at::get_num_threads()); }

// One call's tensors.
template <typename T>
struct ScanArgs {
  Strided<T> u, delta, z, out;  // z.p null without z
  const T *A, *Bt, *Ct, *D, *bias;
  // (dim, R) contiguous, or null: then delta is the step sizes, else the
  // low-rank (batch, R, K) input of the projection
  const T* proj = nullptr;
  int64_t R = 0;
  int64_t sBb, sBk, sCb, sCk;  // strides of Bt, Ct over batch and K
  const T* gaps;  // (batch, K) in scan order: pruned tokens before each
  const int64_t* order;  // (batch or 1, K) or null
  int64_t order_sb;      // K, or 0 when shared by the batch
  int64_t dim, K, N;
  bool softplus, reverse;
  int64_t gap_mode;
  // (batch, dim, chunks, N), contiguous, or null: the state before each
  // chunk (forward: written; backward: read instead of recomputed)
  T* ckpt = nullptr;
  int64_t chunks = 0;

  T* ckpt_at(int64_t b, int64_t d, int64_t i) const {
    return ckpt + ((b * dim + d) * chunks + i) * N;
  }

  // The token of scan step j: for delta, B, C (tok_s) and for u, z and the
  // output (tok_u), over steps j0..j0+len-1.
  void tokens(int64_t b, int64_t j0, int64_t len, int64_t* tok_s,
              int64_t* tok_u) const {
    for (int64_t j = 0; j < len; ++j) {
      tok_s[j] = reverse ? K - 1 - (j0 + j) : j0 + j;
    }
    if (order) {
      const int64_t* o = order + b * order_sb + j0;
      std::copy(o, o + len, tok_u);
    } else {
      std::copy(tok_s, tok_s + len, tok_u);
    }
  }
};

// A tile's constants and the state it carries from chunk to chunk.
template <typename T>
struct Tile {
  using V = vec_t<T>;
  int64_t d0 = 0;
  int lanes = 0;
  V* At = nullptr;   // N: A transposed, (n, lane)
  V* At2 = nullptr;  // N: At * decay_scale<T> (the recurrence's exponent)
  V* h = nullptr;    // N: the state
  V* Wt = nullptr;   // R: delta_proj transposed, (r, lane)
  V At2_max{};       // max over n of |At2[n]|
  V bias{}, D{}, gap_step{};
  V prev_step{};  // delta of the step before the chunk ('prev' gaps)
  // backward only
  V* dh = nullptr;    // N: d loss / d state, from the later steps
  V* dA = nullptr;    // N
  V* ckpt = nullptr;  // chunks x N: the state before each chunk (without
                      // the forward's checkpoints)
  V dD{}, dbias{}, dgap_null{};
  V dstep_from_next{};  // 'prev': step k+1's gap decays with delta_k
};

// One thread's buffers: one chunk of one tile (kChunk W-lane vectors
// each), and the per-tile storage of its tiles of one batch element.
template <typename T>
struct Work {
  using V = vec_t<T>;
  std::vector<V> step, e, x, u, gate, dgate, dsdraw, y, dout;
  std::vector<int64_t> tok_s, tok_u;
  std::vector<V> decay, state;  // kChunk x N; (kChunk + 1) x N
  std::vector<V> dB, dC;        // kChunk x N: sums over the tiles
  std::vector<Tile<T>> tiles;
  std::vector<V> At, At2, h, dh, dA, ckpt, Wt;
  std::vector<T> low;  // kChunk x R: the chunk's low-rank delta, by step
  // whether every |e_k A2| of the chunk just prepared is at most
  // kDecayFastBound (float32: the decays need no clamps)
  bool decay_in_range = true;
  Work(int64_t N, bool backward)
      : step(kChunk), e(kChunk), x(kChunk), u(kChunk), gate(kChunk),
        dgate(kChunk), dsdraw(kChunk), y(kChunk), dout(kChunk),
        tok_s(kChunk), tok_u(kChunk) {
    if (backward) {
      decay.resize(kChunk * N);
      state.resize((kChunk + 1) * N);
      dB.resize(kChunk * N);
      dC.resize(kChunk * N);
    }
  }

  // Tiles g0..g1-1 (of W channels) of a batch element, state zero.
  void set_tiles(const ScanArgs<T>& a, int64_t g0, int64_t g1,
                 bool backward) {
    constexpr int W = Simd<T>::W;
    const int64_t G = g1 - g0, N = a.N;
    const int64_t chunks = (a.K + kChunk - 1) / kChunk;
    tiles.assign(G, Tile<T>{});
    At.resize(G * N);
    At2.resize(G * N);
    h.assign(G * N, V{});
    Wt.assign(G * a.R, V{});
    low.resize(kChunk * a.R);
    if (backward) {
      dh.assign(G * N, V{});
      dA.assign(G * N, V{});
      if (!a.ckpt) ckpt.resize(G * chunks * N);
    }
    for (int64_t g = 0; g < G; ++g) {
      Tile<T>& t = tiles[g];
      t.d0 = (g0 + g) * W;
      t.lanes = static_cast<int>(std::min<int64_t>(W, a.dim - t.d0));
      t.At = At.data() + g * N;
      t.At2 = At2.data() + g * N;
      t.h = h.data() + g * N;
      t.At2_max = V{};
      for (int64_t n = 0; n < N; ++n) {
        V v{};
        for (int w = 0; w < t.lanes; ++w) v[w] = a.A[(t.d0 + w) * N + n];
        t.At[n] = v;
        t.At2[n] = v * decay_scale<T>;
        for (int w = 0; w < t.lanes; ++w) {
          t.At2_max[w] = std::max(t.At2_max[w], std::abs(t.At2[n][w]));
        }
      }
      for (int w = 0; w < t.lanes; ++w) {
        if (a.bias) t.bias[w] = a.bias[t.d0 + w];
        if (a.D) t.D[w] = a.D[t.d0 + w];
      }
      t.gap_step = a.softplus ? vsoftplus(t.bias) : t.bias;
      t.Wt = Wt.data() + g * a.R;
      for (int64_t r = 0; r < a.R; ++r) {
        for (int w = 0; w < t.lanes; ++w) {
          t.Wt[r][w] = a.proj[(t.d0 + w) * a.R + r];
        }
      }
      if (backward) {
        t.dh = dh.data() + g * N;
        t.dA = dA.data() + g * N;
        if (!a.ckpt) t.ckpt = ckpt.data() + g * chunks * N;
      }
    }
  }

  // The low-rank delta of the steps in tok_s (len of them), by step: read
  // once per chunk for all the thread's tiles.
  void pack_low(const ScanArgs<T>& a, int64_t b, int64_t len) {
    const T* base = a.delta.p + b * a.delta.sb;
    for (int64_t j = 0; j < len; ++j) {
      const T* src = base + tok_s[j] * a.delta.sk;
      for (int64_t r = 0; r < a.R; ++r) low[j * a.R + r] = src[r * a.delta.sc];
    }
  }
};

// The step sizes (before bias and softplus) of len steps of a tile from
// their low-rank rows low (len x R): step[j] = sum_r Wt[r] low[j, r]. Eight
// steps at a time (eight independent FMA chains, each weight loaded once
// per eight steps).
template <typename T>
void project_steps(const vec_t<T>* __restrict Wt, const T* __restrict low,
                   int64_t R, int64_t len, vec_t<T>* __restrict step) {
  using V = vec_t<T>;
  constexpr int kB = 8;
  int64_t j = 0;
  for (; j + kB <= len; j += kB) {
    const T* l = low + j * R;
    V s[kB] = {};
    for (int64_t r = 0; r < R; ++r) {
      const V wr = Wt[r];
      for (int i = 0; i < kB; ++i) s[i] = vfma(wr, V{} + l[i * R + r], s[i]);
    }
    for (int i = 0; i < kB; ++i) step[j + i] = s[i];
  }
  for (; j < len; ++j) {
    const T* l = low + j * R;
    V s{};
    for (int64_t r = 0; r < R; ++r) s = vfma(Wt[r], V{} + l[r], s);
    step[j] = s;
  }
}

// Steps j0..j0+len-1 (tokens in w.tok_s, w.tok_u) of tile t: packed
// inputs, the step sizes delta_k, the decay exponents e_k, the inputs
// delta_k u_k, the gate silu(z_k) and, for the backward pass, the
// derivatives of the softplus and the gate. Updates t.prev_step, and
// w.decay_in_range (float32): whether |e_k| max_n |A2| <= kDecayFastBound
// for every step and lane (false for NaN), i.e. whether the recurrence may
// take the decays' unclamped path.
template <typename T, bool kBackward>
void prepare_chunk(const ScanArgs<T>& a, int64_t b, int64_t j0, int64_t len,
                   Tile<T>& t, Work<T>& w) {
  using V = vec_t<T>;
  V* step = w.step.data();
  if (a.proj) {
    project_steps<T>(t.Wt, w.low.data(), a.R, len, step);
  } else {
    pack(a.delta, b, t.d0, t.lanes, w.tok_s.data(), len, step);
  }
  pack(a.u, b, t.d0, t.lanes, w.tok_u.data(), len, w.u.data());
  const bool z = a.z.p != nullptr;
  if (z) pack(a.z, b, t.d0, t.lanes, w.tok_u.data(), len, w.gate.data());
  const T* g = a.gaps ? a.gaps + b * a.K + j0 : nullptr;
  // lanes all-ones while every |e_k A2| so far is in range
  std::conditional_t<std::is_same_v<T, float>, vi, int> in_range{};
  in_range = ~in_range;
  for (int64_t j = 0; j < len; ++j) {
    const V raw = step[j] + t.bias;
    const V s = a.softplus ? vsoftplus(raw) : raw;
    step[j] = s;
    w.x[j] = s * w.u[j];
    if constexpr (kBackward) {
      w.dsdraw[j] = a.softplus ? vsigmoid(raw) : V{} + T(1);
    }
    if (!g) {
      w.e[j] = s;
    } else if (a.gap_mode == kGapPrev) {
      w.e[j] = s + g[j] * t.prev_step;  // g_0 = 0
    } else {  // 'null': a zero-input token's step
      w.e[j] = s + g[j] * t.gap_step;
    }
    t.prev_step = s;
    if constexpr (std::is_same_v<T, float>) {
      const V bound = w.e[j] * t.At2_max;  // NaN compares false
      in_range &= (bound <= kDecayFastBound) & (bound >= -kDecayFastBound);
    }
    if (z) {
      const V zk = w.gate[j];
      const V sig = vsigmoid(zk);
      w.gate[j] = zk * sig;
      if constexpr (kBackward) {
        w.dgate[j] = sig * (T(1) + zk * (T(1) - sig));
      }
    }
  }
  w.decay_in_range = true;
  if constexpr (std::is_same_v<T, float>) {
    for (int l = 0; l < Simd<T>::W; ++l) {
      w.decay_in_range = w.decay_in_range && in_range[l] != 0;
    }
  }
}

// The recurrence of tile t over the len steps of the chunk, from the state
// t.h (updated). kOut: y[j] = C_k . h_k. kStore: keeps the decays and the
// states (state[0] is the state before the chunk) for the backward pass.
// kSafe: the decays' clamped exp (decay_exp), for chunks with an |e_k A2|
// past kDecayFastBound (run_recurrence chooses).
template <typename T, int kN, bool kOut, bool kStore, bool kSafe>
inline void recurrence(const ScanArgs<T>& a, int64_t b, int64_t len,
                       const Tile<T>& t, Work<T>& w) {
  using V = vec_t<T>;
  const int64_t N = kN > 0 ? kN : a.N;
  const V* __restrict At2 = t.At2;
  V* __restrict h = t.h;
  const V* __restrict e = w.e.data();
  const V* __restrict x = w.x.data();
  V* __restrict y = w.y.data();
  V* __restrict decay = w.decay.data();
  V* __restrict state = w.state.data();
  const T* Bb = a.Bt + b * a.sBb;
  const T* Cb = a.Ct + b * a.sCb;
  if constexpr (kStore) std::copy(h, h + N, state);
  for (int64_t j = 0; j < len; ++j) {
    const int64_t k = w.tok_s[j];
    const T* __restrict Bk = Bb + k * a.sBk;
    const T* __restrict Ck = Cb + k * a.sCk;
    const V ej = e[j], xj = x[j];
    V yj{};
    for (int64_t n = 0; n < N; ++n) {
      const V dA = decay_exp<kSafe>(ej, At2[n]);
      const V hn = dA * h[n] + xj * Bk[n];
      h[n] = hn;
      if constexpr (kOut) yj += hn * Ck[n];
      if constexpr (kStore) {
        decay[j * N + n] = dA;
        state[(j + 1) * N + n] = hn;
      }
    }
    if constexpr (kOut) y[j] = yj;
  }
}

// The recurrence of the chunk prepare_chunk prepared last: the decays'
// unclamped exp when all its exponents are in range, the clamped one
// otherwise (the two agree bit for bit in range).
template <typename T, int kN, bool kOut, bool kStore>
inline void run_recurrence(const ScanArgs<T>& a, int64_t b, int64_t len,
                           const Tile<T>& t, Work<T>& w) {
  if (w.decay_in_range) {
    recurrence<T, kN, kOut, kStore, false>(a, b, len, t, w);
  } else {
    recurrence<T, kN, kOut, kStore, true>(a, b, len, t, w);
  }
}

// The state of tile t (its lanes) to / from the checkpoint of chunk i.
template <typename T>
void store_state(const ScanArgs<T>& a, int64_t b, int64_t i,
                 const Tile<T>& t) {
  for (int l = 0; l < t.lanes; ++l) {
    T* dst = a.ckpt_at(b, t.d0 + l, i);
    for (int64_t n = 0; n < a.N; ++n) dst[n] = t.h[n][l];
  }
}
template <typename T>
void load_state(const ScanArgs<T>& a, int64_t b, int64_t i, Tile<T>& t) {
  for (int64_t n = 0; n < a.N; ++n) t.h[n] = vec_t<T>{};
  for (int l = 0; l < t.lanes; ++l) {
    const T* src = a.ckpt_at(b, t.d0 + l, i);
    for (int64_t n = 0; n < a.N; ++n) t.h[n][l] = src[n];
  }
}

// A thread's tiles g0..g1-1 of batch element b, chunk by chunk: each chunk's
// rows of the inputs are read for all these tiles (adjacent channels) while
// they are in cache.
template <typename T, int kN>
void forward_tiles(const ScanArgs<T>& a, int64_t b, int64_t g0, int64_t g1,
                   Work<T>& w) {
  using V = vec_t<T>;
  w.set_tiles(a, g0, g1, false);
  for (int64_t j0 = 0; j0 < a.K; j0 += kChunk) {
    const int64_t len = std::min(kChunk, a.K - j0);
    a.tokens(b, j0, len, w.tok_s.data(), w.tok_u.data());
    if (a.proj) w.pack_low(a, b, len);
    for (Tile<T>& t : w.tiles) {
      if (a.ckpt) store_state(a, b, j0 / kChunk, t);
      prepare_chunk<T, false>(a, b, j0, len, t, w);
      run_recurrence<T, kN, true, false>(a, b, len, t, w);
      V* y = w.y.data();
      for (int64_t j = 0; j < len; ++j) {
        y[j] = y[j] + t.D * w.u[j];
        if (a.z.p) y[j] *= w.gate[j];
      }
      unpack(a.out, b, t.d0, t.lanes, w.tok_u.data(), len, y);
    }
  }
}

template <typename T>
struct GradArgs {
  Strided<T> dout, du, ddelta, dz;  // dz.p null without z
  T *dA_part, *dD_part, *dbias_part;  // (batch, dim[, N]): summed later
};

// Adds the lane sums of acc (len x N vectors) to out rows tok[j] (K x N).
template <typename T>
void add_lane_sums(const vec_t<T>* acc, int64_t len, int64_t N,
                   const int64_t* tok, T* out) {
  using V = vec_t<T>;
  constexpr int W = Simd<T>::W;
  for (int64_t j = 0; j < len; ++j) {
    const V* row = acc + j * N;
    T* o = out + tok[j] * N;
    int64_t n = 0;
    for (; n + W <= N; n += W) {
      vstore(o + n, vload<V>(o + n) + row_sums(row + n));
    }
    for (; n < N; ++n) {
      T s = 0;
      for (int i = 0; i < W; ++i) s += row[n][i];
      o[n] += s;
    }
  }
}

// The softplus'd step size of step j of tile t (delta_{j0-1} for the 'prev'
// gap of a chunk's first step, when the chunks run backwards).
template <typename T>
vec_t<T> step_at(const ScanArgs<T>& a, int64_t b, int64_t j,
                 const Tile<T>& t) {
  int64_t tok_s, tok_u;
  a.tokens(b, j, 1, &tok_s, &tok_u);
  vec_t<T> raw;
  if (a.proj) {
    raw = vec_t<T>{};
    const T* src = a.delta.p + b * a.delta.sb + tok_s * a.delta.sk;
    for (int64_t r = 0; r < a.R; ++r) {
      raw = vfma(t.Wt[r], vec_t<T>{} + src[r * a.delta.sc], raw);
    }
  } else {
    pack(a.delta, b, t.d0, t.lanes, &tok_s, 1, &raw);
  }
  raw += t.bias;
  return a.softplus ? vsoftplus(raw) : raw;
}

// Backward over one chunk of tile t: the chunk's states recomputed from its
// checkpoint, then the reverse recurrence. w.dB/w.dC (the chunk's dB, dC)
// get this tile's lanes added.
template <typename T, int kN>
void backward_chunk(const ScanArgs<T>& a, const GradArgs<T>& g, int64_t b,
                    int64_t i, int64_t len, Tile<T>& t, Work<T>& w) {
  using V = vec_t<T>;
  const int64_t N = kN > 0 ? kN : a.N;
  const int64_t j0 = i * kChunk;
  t.prev_step = V{};
  if (j0 > 0 && a.gaps && a.gap_mode == kGapPrev) {
    t.prev_step = step_at(a, b, j0 - 1, t);
  }
  prepare_chunk<T, true>(a, b, j0, len, t, w);
  if (a.ckpt) {
    load_state(a, b, i, t);
  } else {
    std::copy(t.ckpt + i * N, t.ckpt + (i + 1) * N, t.h);
  }
  run_recurrence<T, kN, true, true>(a, b, len, t, w);
  V* dy = w.dout.data();
  pack(g.dout, b, t.d0, t.lanes, w.tok_u.data(), len, dy);
  if (a.z.p) {
    V* dz = w.dgate.data();  // in place
    for (int64_t j = 0; j < len; ++j) {
      dz[j] = dy[j] * (w.y[j] + t.D * w.u[j]) * w.dgate[j];
      dy[j] = dy[j] * w.gate[j];
    }
    unpack(g.dz, b, t.d0, t.lanes, w.tok_u.data(), len, dz);
  }
  const V* __restrict At = t.At;
  V* __restrict dh = t.dh;
  V* __restrict dA = t.dA;
  const V* __restrict decay = w.decay.data();
  const V* __restrict state = w.state.data();
  V* __restrict dBc = w.dB.data();
  V* __restrict dCc = w.dC.data();
  V* du = w.gate.data();  // reused: the gate is no longer needed
  V* dstep = w.y.data();  // reused: y is no longer needed
  const T* Bb = a.Bt + b * a.sBb;
  const T* Cb = a.Ct + b * a.sCb;
  const T* gaps = a.gaps ? a.gaps + b * a.K + j0 : nullptr;
  for (int64_t j = len - 1; j >= 0; --j) {
    const int64_t k = w.tok_s[j];
    const T* __restrict Bk = Bb + k * a.sBk;
    const T* __restrict Ck = Cb + k * a.sCk;
    const V dyj = dy[j], xj = w.x[j], ej = w.e[j];
    t.dD += dyj * w.u[j];
    V de{}, dx{};
    for (int64_t n = 0; n < N; ++n) {
      const V dhn = dh[n] + dyj * Ck[n];
      dCc[j * N + n] += dyj * state[(j + 1) * N + n];
      // d(decay) * decay; h_{-1} = 0 makes it 0 at the first step
      const V dd = dhn * state[j * N + n] * decay[j * N + n];
      de += dd * At[n];
      dA[n] += dd * ej;
      dBc[j * N + n] += dhn * xj;
      dx += dhn * Bk[n];
      dh[n] = dhn * decay[j * N + n];
    }
    du[j] = dyj * t.D + dx * w.step[j];
    dstep[j] = dx * w.u[j] + de + t.dstep_from_next;
    t.dstep_from_next = V{};
    if (gaps && gaps[j] > T(0)) {
      if (a.gap_mode == kGapPrev) {
        t.dstep_from_next = de * gaps[j];
      } else {
        t.dgap_null += de * gaps[j];
      }
    }
  }
  for (int64_t j = 0; j < len; ++j) {
    dstep[j] *= w.dsdraw[j];  // d delta (raw)
    t.dbias += dstep[j];
  }
  unpack(g.du, b, t.d0, t.lanes, w.tok_u.data(), len, du);
  unpack(g.ddelta, b, t.d0, t.lanes, w.tok_s.data(), len, dstep);
}

// Backward over a thread's tiles g0..g1-1 of batch element b; dB_loc/dC_loc
// (K x N, token order) are this thread's sums over its channels.
template <typename T, int kN>
void backward_tiles(const ScanArgs<T>& a, const GradArgs<T>& g, int64_t b,
                    int64_t g0, int64_t g1, Work<T>& w, T* dB_loc,
                    T* dC_loc) {
  using V = vec_t<T>;
  const int64_t N = a.N, K = a.K;
  const int64_t chunks = (K + kChunk - 1) / kChunk;
  w.set_tiles(a, g0, g1, true);
  // pass 1: the state before every chunk, unless the forward stored them
  for (int64_t i = 0; i < chunks && !a.ckpt; ++i) {
    const int64_t j0 = i * kChunk, len = std::min(kChunk, K - j0);
    a.tokens(b, j0, len, w.tok_s.data(), w.tok_u.data());
    if (a.proj) w.pack_low(a, b, len);
    for (Tile<T>& t : w.tiles) {
      std::copy(t.h, t.h + N, t.ckpt + i * N);
      prepare_chunk<T, false>(a, b, j0, len, t, w);
      run_recurrence<T, kN, false, false>(a, b, len, t, w);
    }
  }
  // pass 2: the chunks from the last
  for (int64_t i = chunks - 1; i >= 0; --i) {
    const int64_t j0 = i * kChunk, len = std::min(kChunk, K - j0);
    a.tokens(b, j0, len, w.tok_s.data(), w.tok_u.data());
    if (a.proj) w.pack_low(a, b, len);
    std::fill(w.dB.begin(), w.dB.begin() + len * N, V{});
    std::fill(w.dC.begin(), w.dC.begin() + len * N, V{});
    for (Tile<T>& t : w.tiles) backward_chunk<T, kN>(a, g, b, i, len, t, w);
    add_lane_sums<T>(w.dB.data(), len, N, w.tok_s.data(), dB_loc);
    add_lane_sums<T>(w.dC.data(), len, N, w.tok_s.data(), dC_loc);
  }
  for (const Tile<T>& t : w.tiles) {
    const V dgap = a.softplus ? t.dgap_null * vsigmoid(t.bias) : t.dgap_null;
    for (int l = 0; l < t.lanes; ++l) {
      const int64_t bd = b * a.dim + t.d0 + l;
      for (int64_t n = 0; n < N; ++n) g.dA_part[bd * N + n] = t.dA[n][l];
      g.dD_part[bd] = t.dD[l];
      g.dbias_part[bd] = t.dbias[l] + dgap[l];
    }
  }
}

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
                      int64_t gap_mode, bool reverse,
                      const std::optional<at::Tensor>& proj) {
  TORCH_CHECK(u.dim() == 3, "u must be (batch, dim, K)");
  TORCH_CHECK(A.dim() == 2, "A must be (dim, N)");
  TORCH_CHECK(gap_mode >= kGapNone && gap_mode <= kGapNull,
              "gap_mode must be 0 (none), 1 (prev) or 2 (null)");
  TORCH_CHECK(!(order && reverse), "order and reverse are exclusive");
  const int64_t batch = u.size(0), dim = u.size(1), K = u.size(2);
  const int64_t N = A.size(1);
  const auto dtype = u.scalar_type();
  check_tensor(u, "u", dtype, {batch, dim, K}, false);
  const int64_t R = proj ? proj->size(-1) : 0;
  if (proj) {
    TORCH_CHECK(proj->dim() == 2, "delta_proj must be (dim, R)");
    check_tensor(*proj, "delta_proj", dtype, {dim, R});
    check_tensor(delta, "delta (low-rank)", dtype, {batch, R, K}, false);
  } else {
    check_tensor(delta, "delta", dtype, {batch, dim, K}, false);
  }
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
  a.u = Strided<T>(u);
  a.delta = Strided<T>(delta);
  if (z) a.z = Strided<T>(*z);
  a.A = A.data_ptr<T>();
  a.Bt = Bt.data_ptr<T>();
  a.Ct = Ct.data_ptr<T>();
  a.sBb = Bt.stride(0);
  a.sBk = Bt.stride(1);
  a.sCb = Ct.stride(0);
  a.sCk = Ct.stride(1);
  a.D = D ? D->data_ptr<T>() : nullptr;
  a.bias = bias ? bias->data_ptr<T>() : nullptr;
  a.proj = proj ? proj->data_ptr<T>() : nullptr;
  a.R = R;
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
  a.chunks = (K + kChunk - 1) / kChunk;
  a.softplus = softplus;
  a.reverse = reverse;
  a.gap_mode = gap_mode;
  return a;
}

template <typename T, int kN>
void forward_impl(const ScanArgs<T>& a, int64_t batch) {
  constexpr int W = Simd<T>::W;
  const int64_t tiles = (a.dim + W - 1) / W;
#pragma omp parallel num_threads(num_threads())
  {
    // contiguous tiles per thread, so that each reads whole row spans
    Work<T> w(a.N, false);
    int64_t lo, hi;
    thread_range(batch * tiles, lo, hi);
    for (int64_t i = lo; i < hi;) {
      const int64_t b = i / tiles;
      const int64_t end = std::min(hi, (b + 1) * tiles);
      forward_tiles<T, kN>(a, b, i - b * tiles, end - b * tiles, w);
      i = end;
    }
  }
}

template <typename T, int kN>
void backward_impl(const ScanArgs<T>& a, const GradArgs<T>& g, int64_t batch,
                   T* dBt, T* dCt) {
  constexpr int W = Simd<T>::W;
  const int64_t K = a.K, N = a.N, KN = K * N;
  const int64_t tiles = (a.dim + W - 1) / W;
  const int threads = num_threads();
  // Per-thread partial sums of dB and dC over channels, for one batch
  // element, in token order.
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
    Work<T> w(N, true);
    T* dB_loc = partial.data() + static_cast<size_t>(tid) * 2 * KN;
    T* dC_loc = dB_loc + KN;
    int64_t lo, hi;
    thread_range(tiles, lo, hi);
    for (int64_t b = 0; b < batch; ++b) {
      std::fill(dB_loc, dB_loc + 2 * KN, T(0));
      if (lo < hi) backward_tiles<T, kN>(a, g, b, lo, hi, w, dB_loc, dC_loc);
#pragma omp barrier  // every thread's partial sums are complete
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

std::vector<at::Tensor> selective_scan_fwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
    const at::Tensor& Bt, const at::Tensor& Ct,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias,
    const std::optional<at::Tensor>& positions,
    const std::optional<at::Tensor>& order, bool softplus, int64_t gap_mode,
    bool reverse, bool checkpoints,
    const std::optional<at::Tensor>& delta_proj) {
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
              "the CPU selective scan computes in float32 or float64, got ",
              u.scalar_type());
  TORCH_CHECK(u.dim() == 3 && A.dim() == 2,
              "u must be (batch, dim, K) and A (dim, N)");
  auto out = empty_layout(u);
  const int64_t chunks = (u.size(2) + kChunk - 1) / kChunk;
  auto ckpt = checkpoints ? at::empty({u.size(0), u.size(1), chunks,
                                       A.size(1)}, u.options())
                          : at::empty({0}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_fwd", [&] {
    const auto gaps = compute_gaps<scalar_t>(positions, gap_mode, u.size(0),
                                             u.size(2), reverse);
    auto a = make_args<scalar_t>(u, delta, A, Bt, Ct, D, z, delta_bias,
                                 positions, order, gaps, softplus, gap_mode,
                                 reverse, delta_proj);
    a.out = Strided<scalar_t>(out);
    if (checkpoints) a.ckpt = ckpt.data_ptr<scalar_t>();
    if (a.N == 16) {
      forward_impl<scalar_t, 16>(a, u.size(0));
    } else {
      forward_impl<scalar_t, 0>(a, u.size(0));
    }
  });
  return {out, ckpt};
}

std::vector<std::optional<at::Tensor>> selective_scan_bwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
    const at::Tensor& Bt, const at::Tensor& Ct,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias,
    const std::optional<at::Tensor>& positions,
    const std::optional<at::Tensor>& order, const at::Tensor& dout,
    bool softplus, int64_t gap_mode, bool reverse,
    const std::optional<at::Tensor>& checkpoints,
    const std::optional<at::Tensor>& delta_proj) {
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
              "the CPU selective scan computes in float32 or float64, got ",
              u.scalar_type());
  check_tensor(dout, "dout", u.scalar_type(), u.sizes().vec(), false);
  const int64_t batch = u.size(0), dim = u.size(1);
  auto du = empty_layout(u);
  // with delta_proj: the full step sizes' gradient, tokens-major (the
  // layout of the op's GEMMs)
  auto ddelta =
      delta_proj
          ? at::empty({batch, u.size(2), dim}, u.options()).transpose(1, 2)
          : empty_layout(delta);
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
                                 reverse, delta_proj);
    if (checkpoints) {
      check_tensor(*checkpoints, "checkpoints", u.scalar_type(),
                   {batch, dim, a.chunks, a.N});
      a.ckpt = checkpoints->data_ptr<scalar_t>();
    }
    GradArgs<scalar_t> g;
    g.dout = Strided<scalar_t>(dout);
    g.du = Strided<scalar_t>(du);
    g.ddelta = Strided<scalar_t>(ddelta);
    if (z) g.dz = Strided<scalar_t>(dz);
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

}  // namespace MMSSM_ISA
}  // namespace mmssm
