// Token choice (SPEC section 5); semantics in pd_kernels/reference/token_confidence.py, mirrored rule for
// rule by pd_kernels/ops/triton/token_confidence.py.
//
// Row pass: block (row, split) streams its slice of V once, 16 bytes per thread per load (two loads in
// flight), each thread with its own online state: running max m (and its column), s = sum 2^t and
// w = sum 2^t t with t = (x - max(m, -FLT_MAX)) * scale (log2 units: the subtraction first, so the top term is
// exactly 1; a row that keeps one token has prob 1 and neg_entropy 0 exactly), the second largest t2
// (margin), and for sampling the best key. The steady state of one 16-byte vector is: upcast, vector max, compare with m (and with the
// thread's next suppressed vector), then sub / mul / ex2.approx.ftz / add per element; everything else is out of line:
//   * a vector whose max raises m (rare after the first few): argmax inside the vector, rescale of s, w;
//   * a vector holding a suppressed id (one per row for MASK): mask it, find the thread's next one;
//   * sampling: a vector whose max could still win, max(y) + kGumbelReach > best key (GUMBEL_REACH of the
//     reference): the noise of its elements, each again only if it can win.
// NaN needs no flag: ex2(NaN) = NaN reaches s and the confidence; fmaxf ignores it, so it is never chosen.
// States are merged across the warp with shuffles, across warps in shared memory, and across splits by a
// second small kernel. A row start that is not 16-byte aligned (odd V, unaligned views) is handled by one
// partial vector before the aligned body and one after it.
#include "token_confidence.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace pdk {
namespace {

constexpr int kThreads = 256;
// The noise never exceeds about 22.8732 (reference.token_confidence.GUMBEL_MAX); an element whose y + kGumbelReach
// is <= the best key so far cannot win. Must equal reference.token_confidence.GUMBEL_REACH (checked by a test).
constexpr float kGumbelReach = 22.875f;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kShiftFloor = -3.40282347e38f;  // -FLT_MAX: the shift while a thread has seen nothing usable

// ---- counter-based hash (same arithmetic as reference/token_confidence.py and the Triton kernel) ----
__device__ __forceinline__ uint32_t rotl32(uint32_t x, int r) { return (x << r) | (x >> (32 - r)); }
__device__ __forceinline__ uint32_t mix32(uint32_t h, uint32_t k) {
  k *= 0xCC9E2D51u;
  k = rotl32(k, 15);
  k *= 0x1B873593u;
  h ^= k;
  h = rotl32(h, 13);
  return h * 5u + 0xE6546B64u;
}
__device__ __forceinline__ uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

// Gumbel noise of 32 random bits (reference.token_confidence.gumbel_from_bits): x = fp32(2r + 1) 2^-33 in (0, 1/2]
// with r the low 31 bits; E = -log(x) (top bit 0, u = x) or -log1p(-x) (top bit 1, u = 1 - x: exact near
// u = 1, where -log of a rounded u gives 0 and, with approximate logs, a negative E); g = -log(E). Both logs
// are libdevice's accurate __nv_logf / __nv_log1pf (what torch's CUDA log and Triton's libdevice.log compute),
// called by name: --use_fast_math turns a plain logf into __logf (lg2.approx, 2^-21.4 absolute error near 1,
// where g is near 0), but never a direct libdevice call, so the noise does not depend on the build flags.
extern "C" __device__ float __nv_logf(float);
extern "C" __device__ float __nv_log1pf(float);
__device__ __forceinline__ float gumbel(uint32_t bits) {
  const float x = __uint2float_rn((bits << 1) | 1u) * 1.16415321826934814453125e-10f;
  const float e = (bits & 0x80000000u) ? -__nv_log1pf(-x) : -__nv_logf(x);
  return -__nv_logf(e);
}

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ---- 16-byte vectors of logits ----
template <typename T> struct Vec;
template <> struct Vec<float> {
  static constexpr int N = 4;
  __device__ static void unpack(const uint4& v, float* y) {
    y[0] = __uint_as_float(v.x); y[1] = __uint_as_float(v.y); y[2] = __uint_as_float(v.z); y[3] = __uint_as_float(v.w);
  }
  __device__ static float one(const float* x, int64_t i) { return x[i]; }
};
template <> struct Vec<__nv_bfloat16> {
  static constexpr int N = 8;
  __device__ static void unpack(const uint4& v, float* y) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // bf16 -> fp32 is a shift: one instruction per element
      y[2 * i] = __uint_as_float(w[i] << 16);
      y[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  }
  __device__ static float one(const __nv_bfloat16* x, int64_t i) { return __bfloat162float(x[i]); }
};
template <> struct Vec<__half> {
  static constexpr int N = 8;
  __device__ static void unpack(const uint4& v, float* y) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      y[2 * i] = f.x;
      y[2 * i + 1] = f.y;
    }
  }
  __device__ static float one(const __half* x, int64_t i) { return __half2float(x[i]); }
};

template <int VEC>
__device__ __forceinline__ float vmax(const float* y) {
  float a = fmaxf(y[0], y[1]);
#pragma unroll
  for (int j = 2; j < VEC; j += 2) a = fmaxf(a, fmaxf(y[j], y[j + 1]));
  return a;
}

// Per-thread (and, merged, per-row) state. m, t2, bx in units of x; s, w against the shift ms = max(m, -FLT_MAX).
struct RowState {
  float m, ms, s, w, t2, bk, bx;
  int32_t i1, bi;
};

__device__ __forceinline__ RowState empty_state() {
  RowState r;
  r.m = r.t2 = r.bk = r.bx = -INFINITY;
  r.ms = kShiftFloor;
  r.s = r.w = 0.f;
  r.i1 = r.bi = -1;
  return r;
}

// Combine two states (any order): global max, first index among equal maxima (-1, as unsigned, loses),
// t2 = largest of both t2 and the other max, sums rescaled to the larger shift.
template <int KIND, bool SAMPLE>
__device__ __forceinline__ RowState merge(const RowState& a, const RowState& b, float scale) {
  RowState r;
  const bool a_wins = (a.m > b.m) || (a.m == b.m && static_cast<uint32_t>(a.i1) <= static_cast<uint32_t>(b.i1));
  r.m = a_wins ? a.m : b.m;
  r.i1 = a_wins ? a.i1 : b.i1;
  r.t2 = fmaxf(fmaxf(a.t2, b.t2), a_wins ? b.m : a.m);
  r.ms = fmaxf(a.ms, b.ms);
  const float dla = a.m > -INFINITY ? (a.ms - r.ms) * scale : 0.f;
  const float dlb = b.m > -INFINITY ? (b.ms - r.ms) * scale : 0.f;
  const float ala = a.m > -INFINITY ? ex2(dla) : 0.f;  // 0 * NaN stays NaN: a NaN seen anywhere survives
  const float alb = b.m > -INFINITY ? ex2(dlb) : 0.f;
  r.s = ala * a.s + alb * b.s;
  r.w = KIND == kNegEntropy ? ala * (a.w + dla * a.s) + alb * (b.w + dlb * b.s) : 0.f;
  if (SAMPLE) {
    const bool ka = (a.bk > b.bk) || (a.bk == b.bk && static_cast<uint32_t>(a.bi) <= static_cast<uint32_t>(b.bi));
    r.bk = ka ? a.bk : b.bk;
    r.bi = ka ? a.bi : b.bi;
    r.bx = ka ? a.bx : b.bx;
  } else {
    r.bk = -INFINITY;
    r.bi = r.i1;
    r.bx = r.m;
  }
  return r;
}

__device__ __forceinline__ RowState shfl_state(const RowState& x, int lane_xor) {
  RowState r;
  r.m = __shfl_xor_sync(0xffffffffu, x.m, lane_xor);
  r.ms = __shfl_xor_sync(0xffffffffu, x.ms, lane_xor);
  r.s = __shfl_xor_sync(0xffffffffu, x.s, lane_xor);
  r.w = __shfl_xor_sync(0xffffffffu, x.w, lane_xor);
  r.t2 = __shfl_xor_sync(0xffffffffu, x.t2, lane_xor);
  r.bk = __shfl_xor_sync(0xffffffffu, x.bk, lane_xor);
  r.bx = __shfl_xor_sync(0xffffffffu, x.bx, lane_xor);
  r.i1 = __shfl_xor_sync(0xffffffffu, x.i1, lane_xor);
  r.bi = __shfl_xor_sync(0xffffffffu, x.bi, lane_xor);
  return r;
}

// What one row's pass needs besides its state (constant per block).
struct RowCtx {
  float scale, inv_t, thr;
  uint32_t h_row;
  const int64_t* sup64;
  const int32_t* sup32;
  int64_t n_sup;
  int64_t head;  // columns before the first 16-byte aligned one
  int32_t k_lo, k_hi;  // this split's full vectors (V < 2^31: vector indices fit in 32 bits)
};

__device__ __forceinline__ int64_t sup_id(const RowCtx& c, int64_t q) { return c.sup32 ? c.sup32[q] : c.sup64[q]; }

// The smallest full vector index >= from that this thread owns and that holds a suppressed id
// (INT32_MAX if none). Thread tid owns the vectors k_lo + tid + n * kThreads of [k_lo, k_hi).
template <int VEC>
__device__ int32_t next_sup(const RowCtx& c, int32_t from) {
  int32_t best = INT32_MAX;
  for (int64_t q = 0; q < c.n_sup; ++q) {
    const int64_t id = sup_id(c, q) - c.head;
    if (id < 0) continue;
    const int64_t k = id / VEC;
    if (k >= from && k < c.k_hi && k >= c.k_lo && (k - c.k_lo) % kThreads == threadIdx.x && k < best)
      best = static_cast<int32_t>(k);
  }
  return best;
}

// Rare (laid out of line by __builtin_expect in push_vector): a vector whose max raises m, or that holds suppressed ids (any vector when `all_ids`).
template <int VEC, int KIND>
__device__ __forceinline__ void slow_vector(RowState& st, float* y, float& vm, int64_t col0, bool mask_ids, bool all_ids,
                                         int32_t k, int32_t& nsv, const RowCtx& c) {
  if (mask_ids) {
    for (int64_t q = 0; q < c.n_sup; ++q) {
      const int64_t id = sup_id(c, q);
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        if (col0 + j == id) y[j] = -INFINITY;
    }
    vm = vmax<VEC>(y);
    if (!all_ids) nsv = next_sup<VEC>(c, k + 1);
  }
  if (vm > st.m) {
    int jj = 0;
#pragma unroll
    for (int j = VEC - 1; j >= 0; --j)
      if (y[j] == vm) jj = j;  // the first column at the max
    if (KIND == kMargin) {  // second largest of the vector (a duplicate of the max counts)
      float sec = -INFINITY;
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        if (j != jj) sec = fmaxf(sec, y[j]);
      st.t2 = fmaxf(st.m, sec);
    }
    const float msn = fmaxf(vm, kShiftFloor);
    const float dl = fmaxf((st.ms - msn) * c.scale, -256.f);  // nothing seen yet (ms = floor): 2^-256 = 0
    const float a = ex2(dl);
    if (KIND == kNegEntropy) st.w = a * (st.w + dl * st.s);
    st.s *= a;
    st.m = vm;
    st.ms = msn;
    st.i1 = static_cast<int32_t>(col0 + jj);
  } else if (KIND == kMargin) {
    st.t2 = fmaxf(st.t2, vm);
  }
}

// Rare: the noise of the elements of a vector that can still win.
template <int VEC>
__device__ __forceinline__ void sample_vector(RowState& st, const float* y, int64_t col0, const RowCtx& c) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const float yt = __fmul_rn(y[j], c.inv_t);
    if (yt + kGumbelReach > st.bk) {  // -inf and NaN never pass
      const float key = __fadd_rn(yt, gumbel(fmix32(mix32(c.h_row, static_cast<uint32_t>(col0 + j)))));
      if (key > st.bk) {  // strict: the first column among equal keys
        st.bk = key;
        st.bi = static_cast<int32_t>(col0 + j);
        st.bx = y[j];
      }
    }
  }
}

// The vector's terms into s (and w): 2^t with t = (y - ms) * scale, the subtraction first (top term exactly 1).
template <int VEC, int KIND>
__device__ __forceinline__ void add_terms(RowState& st, const float* y, const RowCtx& c) {
  float acc = 0.f, accw = 0.f;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const float t = (y[j] - st.ms) * c.scale;
    const float p = ex2(t);
    acc += p;
    if (KIND == kNegEntropy) accw = fmaf(p, fmaxf(t, -256.f), accw);  // t >= -256 keeps 0 * -inf out; NaN stays in p
  }
  st.s += acc;
  if (KIND == kNegEntropy) st.w += accw;
}

// One vector of VEC logits y at columns [col0, col0 + VEC), vector index k (-1 for a partial vector, whose
// suppressed ids are all checked). The rare and the steady path each finish the vector themselves, so the
// steady path keeps y where the loads left it (no copies for the masking the rare path may do).
template <int VEC, int KIND, bool SAMPLE, bool HAS_THR>
__device__ __forceinline__ void push_vector(RowState& st, float* y, int64_t col0, int32_t k, int32_t& nsv,
                                            bool all_ids, const RowCtx& c) {
  if (HAS_THR) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) y[j] = y[j] < c.thr ? -INFINITY : y[j];  // NaN stays NaN
  }
  float vm = vmax<VEC>(y);
  const bool ids = all_ids || k == nsv;
  if (__builtin_expect(ids || vm > st.m, 0)) {
    slow_vector<VEC, KIND>(st, y, vm, col0, ids, all_ids, k, nsv, c);
    add_terms<VEC, KIND>(st, y, c);
    if (SAMPLE && __fmul_rn(vm, c.inv_t) + kGumbelReach > st.bk) sample_vector<VEC>(st, y, col0, c);
  } else {
    if (KIND == kMargin) st.t2 = fmaxf(st.t2, vm);
    add_terms<VEC, KIND>(st, y, c);
    if (SAMPLE && __builtin_expect(__fmul_rn(vm, c.inv_t) + kGumbelReach > st.bk, 0)) sample_vector<VEC>(st, y, col0, c);
  }
}

template <int KIND, bool SAMPLE>
__device__ __forceinline__ void finish(const RowState& st, int64_t row, float scale, int64_t* token, float* conf) {
  const int32_t tok = SAMPLE ? st.bi : st.i1;
  const float xt = SAMPLE ? st.bx : st.m;
  float c;
  if (KIND == kProb) {
    c = ex2((xt - st.m) * scale) / st.s;
  } else if (KIND == kMargin) {
    c = (1.f - ex2((st.t2 - st.m) * scale)) / st.s;
  } else {
    c = st.w / st.s * 0.6931471805599453f - logf(st.s);
  }
  const bool ok = st.m > -INFINITY && st.m < INFINITY && st.s == st.s;
  if (st.m == -INFINITY) c = st.s == st.s ? -INFINITY : NAN;  // no usable entry: token -1
  else if (!ok) c = NAN;
  token[row] = tok;
  conf[row] = c;
}

__device__ __forceinline__ uint32_t row_state(const TokenConfidenceParams& p, int64_t row) {
  const uint64_t seed = p.seed_t ? static_cast<uint64_t>(p.seed_t[row]) : p.seed;
  const uint64_t ctr = p.offset_mode == 2 ? static_cast<uint64_t>(p.offset_t[row])
                                          : (p.offset_mode == 1 ? static_cast<uint64_t>(*p.offset_t) : p.offset) +
                                                static_cast<uint64_t>(row);  // mod 2^64
  uint32_t h = mix32(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  h = mix32(h, static_cast<uint32_t>(ctr));
  return mix32(h, static_cast<uint32_t>(ctr >> 32));
}

template <typename T, int KIND, bool SAMPLE, bool HAS_THR>
__global__ void __launch_bounds__(kThreads, 3) row_kernel(TokenConfidenceParams p) {
  constexpr int VEC = Vec<T>::N;
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const int64_t V = p.vocab;
  const T* x = reinterpret_cast<const T*>(p.logits) + row * p.stride;

  RowCtx c;
  c.inv_t = p.inv_t;
  c.scale = SAMPLE ? __fmul_rn(p.inv_t, kLog2e) : kLog2e;
  c.thr = HAS_THR ? p.threshold[row] : -INFINITY;
  c.h_row = SAMPLE ? row_state(p, row) : 0u;
  c.sup64 = p.suppress_i32 ? nullptr : static_cast<const int64_t*>(p.suppress);
  c.sup32 = p.suppress_i32 ? static_cast<const int32_t*>(p.suppress) : nullptr;
  c.n_sup = p.num_suppress;
  const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(x) & 15) / static_cast<int64_t>(sizeof(T));
  c.head = mis ? VEC - mis : 0;
  if (c.head > V) c.head = V;
  const int64_t nvec = (V - c.head) / VEC;
  const int64_t per = (nvec + p.num_splits - 1) / p.num_splits;
  c.k_lo = static_cast<int32_t>(split * per < nvec ? split * per : nvec);
  c.k_hi = static_cast<int32_t>(c.k_lo + per < nvec ? c.k_lo + per : nvec);
  const bool first = split == 0, last = split == p.num_splits - 1;

  RowState st = empty_state();
  int32_t nsv = next_sup<VEC>(c, c.k_lo);
  float y[VEC], y2[VEC];
  // a partial vector before the aligned body: columns [0, head), owned by thread 0 of split 0
  if (first && threadIdx.x == 0 && c.head > 0) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t col = c.head - VEC + j;
      y[j] = col >= 0 ? Vec<T>::one(x, col) : -INFINITY;
    }
    push_vector<VEC, KIND, SAMPLE, HAS_THR>(st, y, c.head - VEC, -1, nsv, true, c);
  }
  const uint4* xv = reinterpret_cast<const uint4*>(x + c.head);
  int32_t k = c.k_lo + static_cast<int32_t>(threadIdx.x);
  for (; k + kThreads < c.k_hi; k += 2 * kThreads) {  // two 16-byte loads in flight
    const uint4 a = __ldcs(xv + k);
    const uint4 b = __ldcs(xv + k + kThreads);
    Vec<T>::unpack(a, y);
    Vec<T>::unpack(b, y2);
    push_vector<VEC, KIND, SAMPLE, HAS_THR>(st, y, c.head + static_cast<int64_t>(k) * VEC, k, nsv, false, c);
    push_vector<VEC, KIND, SAMPLE, HAS_THR>(st, y2, c.head + static_cast<int64_t>(k + kThreads) * VEC, k + kThreads, nsv,
                                            false, c);
  }
  if (k < c.k_hi) {
    Vec<T>::unpack(__ldcs(xv + k), y);
    push_vector<VEC, KIND, SAMPLE, HAS_THR>(st, y, c.head + static_cast<int64_t>(k) * VEC, k, nsv, false, c);
  }
  // a partial vector after it: columns [head + nvec * VEC, V), thread 0 of the last split
  const int64_t tail0 = c.head + nvec * VEC;
  if (last && threadIdx.x == 0 && tail0 < V) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) y[j] = tail0 + j < V ? Vec<T>::one(x, tail0 + j) : -INFINITY;
    push_vector<VEC, KIND, SAMPLE, HAS_THR>(st, y, tail0, -1, nsv, true, c);
  }

  // block reduction: warp shuffles, then the warps' states through shared memory
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) st = merge<KIND, SAMPLE>(st, shfl_state(st, o), c.scale);
  __shared__ RowState warp_states[kThreads / 32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  if (lane == 0) warp_states[wid] = st;
  __syncthreads();
  if (wid != 0) return;
  st = lane < kThreads / 32 ? warp_states[lane] : empty_state();
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) st = merge<KIND, SAMPLE>(st, shfl_state(st, o), c.scale);
  if (lane != 0) return;
  if (p.num_splits > 1) {
    float* f = p.fpart + (row * p.num_splits + split) * 6;
    int32_t* i = p.ipart + (row * p.num_splits + split) * 2;
    f[0] = st.m; f[1] = st.t2; f[2] = st.s; f[3] = st.w; f[4] = st.bk; f[5] = st.bx;
    i[0] = st.i1; i[1] = st.bi;
  } else {
    finish<KIND, SAMPLE>(st, row, c.scale, p.token, p.conf);
  }
}

// One warp per row: merge the splits' partial states.
template <int KIND, bool SAMPLE>
__global__ void merge_kernel(TokenConfidenceParams p) {
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x;
  const float scale = SAMPLE ? __fmul_rn(p.inv_t, kLog2e) : kLog2e;
  RowState st = empty_state();
  for (int k = lane; k < p.num_splits; k += 32) {
    const float* f = p.fpart + (row * p.num_splits + k) * 6;
    const int32_t* i = p.ipart + (row * p.num_splits + k) * 2;
    RowState o;
    o.m = f[0]; o.t2 = f[1]; o.s = f[2]; o.w = f[3]; o.bk = f[4]; o.bx = f[5];
    o.i1 = i[0]; o.bi = i[1];
    o.ms = fmaxf(o.m, kShiftFloor);
    st = merge<KIND, SAMPLE>(st, o, scale);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) st = merge<KIND, SAMPLE>(st, shfl_state(st, o), scale);
  if (lane == 0) finish<KIND, SAMPLE>(st, row, scale, p.token, p.conf);
}

template <typename T, int KIND, bool SAMPLE, bool HAS_THR>
cudaError_t launch_rows(const TokenConfidenceParams& p, cudaStream_t stream) {
  if (p.num_rows > 0x7fffffff || p.num_splits > 65535) return cudaErrorInvalidConfiguration;
  dim3 grid(static_cast<unsigned>(p.num_rows), static_cast<unsigned>(p.num_splits));
  row_kernel<T, KIND, SAMPLE, HAS_THR><<<grid, kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  merge_kernel<KIND, SAMPLE><<<static_cast<unsigned>(p.num_rows), 32, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int KIND, bool SAMPLE>
cudaError_t dispatch_thr(const TokenConfidenceParams& p, cudaStream_t stream) {
  return p.threshold ? launch_rows<T, KIND, SAMPLE, true>(p, stream) : launch_rows<T, KIND, SAMPLE, false>(p, stream);
}

template <typename T, int KIND>
cudaError_t dispatch_sample(const TokenConfidenceParams& p, cudaStream_t stream) {
  return p.sample ? dispatch_thr<T, KIND, true>(p, stream) : dispatch_thr<T, KIND, false>(p, stream);
}

template <typename T>
cudaError_t dispatch_kind(const TokenConfidenceParams& p, cudaStream_t stream) {
  switch (p.kind) {
    case kProb: return dispatch_sample<T, kProb>(p, stream);
    case kMargin: return dispatch_sample<T, kMargin>(p, stream);
    case kNegEntropy: return dispatch_sample<T, kNegEntropy>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

int token_confidence_num_splits(int64_t num_rows, int64_t vocab, int num_sms) {
  // >= 2 blocks per SM; each split keeps >= 16k logits so the merge stays negligible
  if (num_rows <= 0) return 1;
  const int64_t target = 2LL * (num_sms > 0 ? num_sms : 1);
  int64_t s = (target + num_rows - 1) / num_rows;
  const int64_t max_s = vocab / 16384 > 1 ? vocab / 16384 : 1;
  if (s > max_s) s = max_s;
  if (s < 1) s = 1;
  return static_cast<int>(s);
}

cudaError_t token_confidence(const TokenConfidenceParams& p, cudaStream_t stream) {
  if (p.num_rows == 0) return cudaSuccess;
  if (p.vocab <= 0 || p.vocab >= 0x7fffffff || p.num_splits < 1) return cudaErrorInvalidValue;
  if (p.num_splits > 1 && (p.fpart == nullptr || p.ipart == nullptr)) return cudaErrorInvalidValue;
  if (p.offset_mode != 0 && p.offset_t == nullptr) return cudaErrorInvalidValue;
  if (p.num_suppress > 0 && p.suppress == nullptr) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case 0: return dispatch_kind<float>(p, stream);
    case 1: return dispatch_kind<__half>(p, stream);
    case 2: return dispatch_kind<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace pdk
