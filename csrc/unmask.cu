// Token choice and span commits (SPEC section 5); semantics in pd_kernels/reference/unmask.py, mirrored
// rule for rule by pd_kernels/ops/triton/unmask.py.
//
// Row pass: block (row, split) streams its slice of V once. Each thread keeps an online state (top-1
// value/index, top-2 value, s = sum exp(y - m), w = sum exp(y - m)(y - m), NaN flag, best Gumbel key);
// states are merged across the warp with shuffles, across warps in shared memory, and across splits by
// a second small kernel. 16-byte vector loads when the row start and stride allow them.
//
// Commit: one block per span, over its own rows only (span_rows), in three passes that mirror the Triton
// kernel: pass 0 counts the masked rows and candidates and finds the top-1; pass A (schedule / pd_threshold,
// only when the budget is below the candidate count) ranks each candidate against 512-row tiles of the span
// staged in shared memory and keeps the candidate of rank budget - 1 (the pivot); pass B decides each row by
// comparing it with the top-1 and the pivot, and writes. No decision is stored between passes, so spans of
// any length loop over tiles; the all-done flag comes from the last block through an arrival counter.
#include "unmask.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace pdk {
namespace {

constexpr int kThreads = 256;

// ---- counter-based hash (same arithmetic as reference/unmask.py and the Triton kernel) ----
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

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

struct RowState {
  float t1, t2, s, w, bk, by;
  int32_t i1, bi, nan;
};

__device__ __forceinline__ RowState empty_state(int32_t none) {
  RowState r;
  r.t1 = r.t2 = r.bk = r.by = -INFINITY;
  r.s = r.w = 0.f;
  r.i1 = r.bi = none;
  r.nan = 0;
  return r;
}

// Combine two states (any order): the same rules as chunks in the Triton kernel.
template <int KIND, bool SAMPLE>
__device__ __forceinline__ RowState merge(const RowState& a, const RowState& b) {
  RowState r;
  const bool a_wins = (a.t1 > b.t1) || (a.t1 == b.t1 && a.i1 <= b.i1);
  const RowState& win = a_wins ? a : b;
  const RowState& lose = a_wins ? b : a;
  r.t1 = win.t1;
  r.i1 = win.i1;
  r.t2 = fmaxf(fmaxf(a.t2, b.t2), lose.t1);
  const float m = r.t1;
  const float al_a = a.t1 == -INFINITY ? 0.f : __expf(a.t1 - m);
  const float al_b = b.t1 == -INFINITY ? 0.f : __expf(b.t1 - m);
  r.s = al_a * a.s + al_b * b.s;
  if (KIND == 2) {
    const float sh_a = a.t1 == -INFINITY ? 0.f : a.t1 - m;
    const float sh_b = b.t1 == -INFINITY ? 0.f : b.t1 - m;
    r.w = al_a * (a.w + sh_a * a.s) + al_b * (b.w + sh_b * b.s);
  } else {
    r.w = 0.f;
  }
  r.nan = a.nan | b.nan;
  if (SAMPLE) {
    const bool ka = (a.bk > b.bk) || (a.bk == b.bk && a.bi <= b.bi);
    r.bk = ka ? a.bk : b.bk;
    r.bi = ka ? a.bi : b.bi;
    r.by = ka ? a.by : b.by;
  } else {
    r.bk = -INFINITY;
    r.bi = r.i1;
    r.by = r.t1;
  }
  return r;
}

__device__ __forceinline__ RowState shfl_state(const RowState& x, int src_lane_xor) {
  RowState r;
  r.t1 = __shfl_xor_sync(0xffffffffu, x.t1, src_lane_xor);
  r.t2 = __shfl_xor_sync(0xffffffffu, x.t2, src_lane_xor);
  r.s = __shfl_xor_sync(0xffffffffu, x.s, src_lane_xor);
  r.w = __shfl_xor_sync(0xffffffffu, x.w, src_lane_xor);
  r.bk = __shfl_xor_sync(0xffffffffu, x.bk, src_lane_xor);
  r.by = __shfl_xor_sync(0xffffffffu, x.by, src_lane_xor);
  r.i1 = __shfl_xor_sync(0xffffffffu, x.i1, src_lane_xor);
  r.bi = __shfl_xor_sync(0xffffffffu, x.bi, src_lane_xor);
  r.nan = __shfl_xor_sync(0xffffffffu, x.nan, src_lane_xor);
  return r;
}

// One logit into the thread's state. Elements reach a thread in increasing column order.
template <int KIND, bool SAMPLE>
__device__ __forceinline__ void push(RowState& st, float x, int32_t col, bool sel, float inv_t, uint32_t h_row) {
  if (x != x) {
    st.nan = 1;
    x = -INFINITY;
  }
  float y = sel ? x : -INFINITY;
  if (SAMPLE) y = __fmul_rn(y, inv_t);
  if (sel && (y > st.t1 || (y == st.t1 && col < st.i1))) {
    // new top-1 (or an equal value at a lower index): the old top-1 becomes a top-2 candidate
    st.t2 = st.t1;
    if (y > st.t1) {
      if (y != -INFINITY) {
        const float a = st.t1 == -INFINITY ? 0.f : __expf(st.t1 - y);
        if (KIND == 2) st.w = st.t1 == -INFINITY ? 0.f : a * (st.w + (st.t1 - y) * st.s);
        st.s = a * st.s + 1.f;
      }
      st.t1 = y;
    } else if (y != -INFINITY) {
      st.s += 1.f;  // equal to the max: exp(0)
    }
    st.i1 = col;
  } else {
    st.t2 = fmaxf(st.t2, y);
    if (y != -INFINITY) {
      const float p = __expf(y - st.t1);
      st.s += p;
      if (KIND == 2 && p != 0.f) st.w += p * (y - st.t1);
    }
  }
  if (SAMPLE) {
    const uint32_t h = fmix32(mix32(h_row, static_cast<uint32_t>(col)));
    const float u = (static_cast<float>(h >> 9) + 0.5f) * (1.0f / 8388608.0f);
    const float g = -logf(-logf(u));
    const float key = sel ? __fadd_rn(y, g) : -INFINITY;
    if (sel && (key > st.bk || (key == st.bk && col < st.bi))) {
      st.bk = key;
      st.bi = col;
      st.by = y;
    }
  }
}

template <int KIND, bool SAMPLE>
__device__ __forceinline__ void finish(const RowState& st, int64_t row, int64_t* token, float* conf) {
  const int32_t tok = SAMPLE ? st.bi : st.i1;
  const float ytok = SAMPLE ? st.by : st.t1;
  float c;
  if (KIND == 0) {
    c = expf(ytok - st.t1) / st.s;
  } else if (KIND == 1) {
    c = (1.f - expf(st.t2 - st.t1)) / st.s;
  } else {
    c = st.w / st.s - logf(st.s);
  }
  const bool ok = st.t1 > -INFINITY && st.t1 < INFINITY && st.nan == 0;
  token[row] = tok;
  conf[row] = ok ? c : NAN;
}

__device__ __forceinline__ bool is_suppressed(int32_t col, const int64_t* sup, int64_t n) {
  for (int64_t q = 0; q < n; ++q)
    if (sup[q] == col) return true;
  return false;
}

template <typename T, int VEC, int KIND, bool SAMPLE>
__global__ void __launch_bounds__(kThreads) row_kernel(TokenConfidenceParams p, int64_t chunk) {
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const int32_t V = static_cast<int32_t>(p.vocab);
  const T* x = reinterpret_cast<const T*>(p.logits) + row * p.stride;
  const float inv_t = SAMPLE ? 1.0f / p.temperature : 1.0f;

  uint32_t h_row = 0;
  if (SAMPLE) {
    const uint64_t off = p.offset_t ? static_cast<uint64_t>(*p.offset_t) : p.offset;
    h_row = static_cast<uint32_t>(p.seed);
    h_row = mix32(h_row, static_cast<uint32_t>(p.seed >> 32));
    h_row = mix32(h_row, static_cast<uint32_t>(off));
    h_row = mix32(h_row, static_cast<uint32_t>(off >> 32));
    h_row = mix32(h_row, static_cast<uint32_t>(row));
  }

  RowState st = empty_state(V);
  const int64_t lo = static_cast<int64_t>(split) * chunk;
  const int64_t hi = lo + chunk < p.vocab ? lo + chunk : p.vocab;
  const bool has_sup = p.num_suppress > 0;
  struct alignas(sizeof(T) * VEC) Vec { T v[VEC]; };
  for (int64_t c = lo + static_cast<int64_t>(threadIdx.x) * VEC; c < hi; c += static_cast<int64_t>(kThreads) * VEC) {
    if (c + VEC <= hi) {
      const Vec v = *reinterpret_cast<const Vec*>(x + c);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int32_t col = static_cast<int32_t>(c + e);
        const bool sel = !has_sup || !is_suppressed(col, p.suppress, p.num_suppress);
        push<KIND, SAMPLE>(st, to_f(v.v[e]), col, sel, inv_t, h_row);
      }
    } else {
      for (int64_t e = c; e < hi; ++e) {
        const int32_t col = static_cast<int32_t>(e);
        const bool sel = !has_sup || !is_suppressed(col, p.suppress, p.num_suppress);
        push<KIND, SAMPLE>(st, to_f(x[e]), col, sel, inv_t, h_row);
      }
    }
  }

  // block reduction: warp shuffles, then the warps' states through shared memory
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) st = merge<KIND, SAMPLE>(st, shfl_state(st, o));
  __shared__ RowState warp_states[kThreads / 32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  if (lane == 0) warp_states[wid] = st;
  __syncthreads();
  if (wid != 0) return;
  st = lane < kThreads / 32 ? warp_states[lane] : empty_state(V);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) st = merge<KIND, SAMPLE>(st, shfl_state(st, o));
  if (lane != 0) return;
  if (p.num_splits > 1) {
    float* f = p.fpart + (row * p.num_splits + split) * 6;
    int32_t* i = p.ipart + (row * p.num_splits + split) * 3;
    f[0] = st.t1; f[1] = st.t2; f[2] = st.s; f[3] = st.w; f[4] = st.bk; f[5] = st.by;
    i[0] = st.i1; i[1] = st.bi; i[2] = st.nan;
  } else {
    finish<KIND, SAMPLE>(st, row, p.token, p.conf);
  }
}

// One warp per row: merge the splits' partial states.
template <int KIND, bool SAMPLE>
__global__ void merge_kernel(TokenConfidenceParams p) {
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x;
  RowState st = empty_state(static_cast<int32_t>(p.vocab));
  for (int k = lane; k < p.num_splits; k += 32) {
    const float* f = p.fpart + (row * p.num_splits + k) * 6;
    const int32_t* i = p.ipart + (row * p.num_splits + k) * 3;
    RowState o;
    o.t1 = f[0]; o.t2 = f[1]; o.s = f[2]; o.w = f[3]; o.bk = f[4]; o.by = f[5];
    o.i1 = i[0]; o.bi = i[1]; o.nan = i[2];
    st = merge<KIND, SAMPLE>(st, o);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) st = merge<KIND, SAMPLE>(st, shfl_state(st, o));
  if (lane == 0) finish<KIND, SAMPLE>(st, row, p.token, p.conf);
}

template <typename T, int VEC, int KIND, bool SAMPLE>
cudaError_t launch_rows(const TokenConfidenceParams& p, cudaStream_t stream) {
  const int64_t n_chunks_vec = (p.vocab + VEC - 1) / VEC;
  const int64_t per_split = (n_chunks_vec + p.num_splits - 1) / p.num_splits * VEC;  // multiple of VEC
  if (p.num_rows > 0x7fffffff || p.num_splits > 65535) return cudaErrorInvalidConfiguration;
  dim3 grid(static_cast<unsigned>(p.num_rows), static_cast<unsigned>(p.num_splits));
  row_kernel<T, VEC, KIND, SAMPLE><<<grid, kThreads, 0, stream>>>(p, per_split);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  merge_kernel<KIND, SAMPLE><<<static_cast<unsigned>(p.num_rows), 32, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int KIND, bool SAMPLE>
cudaError_t dispatch_vec(const TokenConfidenceParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = reinterpret_cast<uintptr_t>(p.logits) % 16 == 0 && (p.stride * sizeof(T)) % 16 == 0;
  if (aligned) return launch_rows<T, kVec, KIND, SAMPLE>(p, stream);
  return launch_rows<T, 1, KIND, SAMPLE>(p, stream);
}

template <typename T, int KIND>
cudaError_t dispatch_sample(const TokenConfidenceParams& p, cudaStream_t stream) {
  return p.temperature > 0.f ? dispatch_vec<T, KIND, true>(p, stream) : dispatch_vec<T, KIND, false>(p, stream);
}

template <typename T>
cudaError_t dispatch_kind(const TokenConfidenceParams& p, cudaStream_t stream) {
  switch (p.kind) {
    case 0: return dispatch_sample<T, 0>(p, stream);
    case 1: return dispatch_sample<T, 1>(p, stream);
    case 2: return dispatch_sample<T, 2>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

// ------------------------------------------------------------------------------------------------
// commit
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ float rank_key(float c) { return c != c ? -INFINITY : c; }

constexpr int kCommitThreads = 256;
constexpr int kCommitTile = 512;  // span rows staged in shared memory per pass-A tile (6 KB)

// Rank order: a beats b when its key is higher, or equal with a lower destination. A NaN key beats nothing
// and is beaten by nothing (non-candidates in the staged tile).
__device__ __forceinline__ bool beats(float ka, int64_t da, float kb, int64_t db) {
  return ka > kb || (ka == kb && da < db);
}

struct CommitRow {
  int64_t dst, tok;
  float conf, key;
  bool masked, cand;
};

// Row r of a span as seen by every pass: masked (destination inside `tokens` and holding mask_id; a
// destination outside is never read), candidate (masked with a token >= 0), its rank key (NaN -> -inf).
__device__ __forceinline__ CommitRow load_row(const CommitSpansParams& p, int64_t r) {
  CommitRow v;
  v.dst = p.row_dst[r];
  v.masked = v.dst >= 0 && v.dst < p.num_tokens && p.tokens[v.dst] == p.mask_id;
  v.tok = v.masked ? p.token[r] : -1;
  v.cand = v.masked && v.tok >= 0;
  v.conf = v.cand ? p.conf[r] : 0.f;
  v.key = rank_key(v.conf);
  return v;
}

// The best (key, dst) of the block, broadcast to every thread. Every thread must call it.
__device__ __forceinline__ void block_best(float& key, int64_t& dst, float* s_key, int64_t* s_dst) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float k2 = __shfl_xor_sync(0xffffffffu, key, o);
    const int64_t d2 = __shfl_xor_sync(0xffffffffu, dst, o);
    if (beats(k2, d2, key, dst)) { key = k2; dst = d2; }
  }
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  if (lane == 0) { s_key[wid] = key; s_dst[wid] = dst; }
  __syncthreads();
  key = s_key[0];
  dst = s_dst[0];
  for (int w = 1; w < kCommitThreads / 32; ++w)
    if (beats(s_key[w], s_dst[w], key, dst)) { key = s_key[w]; dst = s_dst[w]; }
  __syncthreads();  // s_key / s_dst may be reused
}

// The last block of the launch folds all_done from the arrival counter alone (relaxed atomic: the
// fact it needs, how many spans still have masks, travels in the counter itself) and resets it.
__device__ __forceinline__ void arrive(const CommitSpansParams& p, int32_t left) {
  const unsigned long long nz = left != 0 ? 1ull : 0ull;
  const unsigned long long prev = atomicAdd(p.arrivals, 1ull + (nz << 32));
  if ((prev & 0xffffffffull) == static_cast<unsigned long long>(p.num_spans - 1)) {
    *p.all_done = (prev >> 32) + nz == 0;
    *p.arrivals = 0ull;
  }
}

__global__ void __launch_bounds__(kCommitThreads) commit_kernel(CommitSpansParams p) {
  const int32_t j = blockIdx.x;
  const int tid = threadIdx.x;
  __shared__ float s_key[kCommitTile];
  __shared__ int64_t s_dst[kCommitTile];
  __shared__ float s_piv_key;
  __shared__ int64_t s_piv_dst;
  constexpr int64_t kNoDst = INT64_MAX;

  const int64_t first = p.span_rows[2 * static_cast<int64_t>(j)];
  const int64_t count = p.span_rows[2 * static_cast<int64_t>(j) + 1];
  const int64_t lo = min(max(first, static_cast<int64_t>(0)), p.num_rows);
  const int64_t hi = min(max(first + max(count, static_cast<int64_t>(0)), lo), p.num_rows);

  // pass 0: masked rows m, candidates c, the top-1 candidate
  int m = 0, c = 0;
  float t_key = -INFINITY;
  int64_t t_dst = kNoDst;
  for (int64_t r0 = lo; r0 < hi; r0 += kCommitThreads) {
    const int64_t r = r0 + tid;
    CommitRow v{};
    if (r < hi) v = load_row(p, r);
    m += __syncthreads_count(v.masked);
    c += __syncthreads_count(v.cand);
    if (v.cand && beats(v.key, v.dst, t_key, t_dst)) { t_key = v.key; t_dst = v.dst; }
  }
  if (m == 0) {  // nothing to commit: the span's counters stay as they are
    if (tid == 0) {
      p.committed[j] = 0;
      arrive(p, p.masks_left[j]);
    }
    return;
  }
  block_best(t_key, t_dst, s_key, s_dst);

  const int k = p.step[j], steps = p.num_steps[j], dfr = p.deferred[j];
  int budget = m;
  if (p.policy == 1) {
    // floor(999 m / (1000 steps - 999 k)) = floor(m (1 - s/t)) for linspace(1, 1e-3, steps + 1)
    const int64_t den = max(static_cast<int64_t>(1000) * steps - static_cast<int64_t>(999) * k, static_cast<int64_t>(1));
    int64_t n = static_cast<int64_t>(999) * m / den;
    n = n < 1 ? 1 : (n > m ? m : n);
    budget = k >= steps - 1 ? m : static_cast<int>(n);
  } else if (p.policy == 2) {
    const int per = k < steps ? m / max(steps - k, 1) : 0;
    budget = min(m, max(per, 1) + dfr);
  }

  // pass A: the pivot, the candidate of rank budget - 1 (default: below every candidate = all are in)
  if (tid == 0) { s_piv_key = -INFINITY; s_piv_dst = kNoDst; }
  __syncthreads();
  if (p.policy != 0 && budget < c) {
    const bool one_tile = hi - lo <= kCommitTile;
    auto stage = [&](int64_t j0) {
      for (int q = tid; q < kCommitTile && j0 + q < hi; q += kCommitThreads) {
        const CommitRow v = load_row(p, j0 + q);
        s_key[q] = v.cand ? v.key : NAN;
        s_dst[q] = v.dst;
      }
    };
    if (one_tile) {
      stage(lo);
      __syncthreads();
    }
    for (int64_t i0 = lo; i0 < hi; i0 += kCommitThreads) {
      const int64_t i = i0 + tid;
      CommitRow v{};
      if (i < hi) v = load_row(p, i);
      int rank = 0;
      for (int64_t j0 = lo; j0 < hi; j0 += kCommitTile) {
        if (!one_tile) {
          __syncthreads();
          stage(j0);
          __syncthreads();
        }
        if (v.cand) {
          const int lim = static_cast<int>(min(static_cast<int64_t>(kCommitTile), hi - j0));
          for (int q = 0; q < lim && rank < budget; ++q) rank += beats(s_key[q], s_dst[q], v.key, v.dst);
        }
      }
      if (v.cand && rank == budget - 1) { s_piv_key = v.key; s_piv_dst = v.dst; }  // one candidate
    }
  }
  __syncthreads();  // the pivot is known, and every read of `tokens` is done before pass B writes
  const float piv_key = s_piv_key;
  const int64_t piv_dst = s_piv_dst;

  // pass B: decide each row against the top-1 and the pivot, write, count
  int cnt = 0;
  for (int64_t r0 = lo; r0 < hi; r0 += kCommitThreads) {
    const int64_t r = r0 + tid;
    bool take = false;
    if (r < hi) {
      const CommitRow v = load_row(p, r);
      if (v.cand) {
        const bool top1 = v.key == t_key && v.dst == t_dst;
        const bool in_b = !beats(piv_key, piv_dst, v.key, v.dst);  // at or above the pivot
        const bool passes = v.conf >= p.tau;  // NaN never passes
        if (p.policy == 0) take = top1 || passes;
        else if (p.policy == 1) take = in_b;
        else take = top1 || (in_b && passes);
        if (take) p.tokens[v.dst] = v.tok;
      }
    }
    cnt += __syncthreads_count(take);
  }
  if (tid == 0) {
    const int left = m - cnt;
    p.committed[j] = cnt;
    p.masks_left[j] = left;
    p.step[j] = k + 1;
    p.deferred[j] = p.policy == 2 ? budget - cnt : 0;
    arrive(p, left);
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
  switch (p.dtype) {
    case 0: return dispatch_kind<float>(p, stream);
    case 1: return dispatch_kind<__half>(p, stream);
    case 2: return dispatch_kind<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t commit_spans(const CommitSpansParams& p, cudaStream_t stream) {
  if (p.num_spans == 0) {
    return cudaMemsetAsync(p.all_done, 1, 1, stream);
  }
  if (p.num_spans > 0x7fffffff || p.num_rows > 0x7fffffff || p.policy < 0 || p.policy > 2 ||
      p.arrivals == nullptr) {
    return cudaErrorInvalidValue;
  }
  commit_kernel<<<static_cast<unsigned>(p.num_spans), kCommitThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace pdk
