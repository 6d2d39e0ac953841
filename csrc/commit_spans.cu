// Span commits (SPEC section 5); semantics in pd_kernels/reference/commit_spans.py, mirrored rule for rule
// by pd_kernels/ops/triton/commit_spans.py.
//
// One block per span, over its own rows only (span_rows), in three passes that mirror the Triton
// kernel: pass 0 counts the masked rows and candidates and finds the top-1; pass A (schedule / pd_threshold,
// only when the budget is below the candidate count) ranks each candidate against 512-row tiles of the span
// staged in shared memory and keeps the candidate of rank budget - 1 (the pivot); pass B decides each row by
// comparing it with the top-1 and the pivot, and writes. No decision is stored between passes, so spans of
// any length loop over tiles; the all-done flag comes from the last block through an arrival counter.
#include "commit_spans.h"

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace pdk {
namespace {

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

  // the counters are int32, but any int32 value must give the reference's (Python int) budget: differences and
  // sums in int64 (steps - 1, steps - k and per + deferred overflow int32 at the extremes)
  const int64_t k = p.step[j], steps = p.num_steps[j], dfr = p.deferred[j];
  int budget = m;
  if (p.policy == kSchedule) {
    // floor(999 m / (1000 steps - 999 k)) = floor(m (1 - s/t)) for linspace(1, 1e-3, steps + 1)
    const int64_t den = max(1000 * steps - 999 * k, static_cast<int64_t>(1));
    int64_t n = static_cast<int64_t>(999) * m / den;
    n = n < 1 ? 1 : (n > m ? m : n);
    budget = k >= steps - 1 ? m : static_cast<int>(n);
  } else if (p.policy == kPdThreshold) {
    const int64_t per = k < steps ? m / max(steps - k, static_cast<int64_t>(1)) : 0;
    budget = static_cast<int>(min(static_cast<int64_t>(m), max(per, static_cast<int64_t>(1)) + dfr));
  }

  // pass A: the pivot, the candidate of rank budget - 1 (default: below every candidate = all are in)
  if (tid == 0) { s_piv_key = -INFINITY; s_piv_dst = kNoDst; }
  __syncthreads();
  if (p.policy != kThreshold && budget < c) {
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
        if (p.policy == kThreshold) take = top1 || passes;
        else if (p.policy == kSchedule) take = in_b;
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
    p.step[j] = static_cast<int>(k + 1);
    p.deferred[j] = p.policy == kPdThreshold ? budget - cnt : 0;
    arrive(p, left);
  }
}

}  // namespace

cudaError_t commit_spans(const CommitSpansParams& p, cudaStream_t stream) {
  if (p.num_spans == 0) {
    return cudaMemsetAsync(p.all_done, 1, 1, stream);
  }
  if (p.num_spans > 0x7fffffff || p.num_rows > 0x7fffffff || p.policy < 0 || p.policy >= kNumCommitPolicies ||
      p.arrivals == nullptr) {
    return cudaErrorInvalidValue;
  }
  commit_kernel<<<static_cast<unsigned>(p.num_spans), kCommitThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace pdk
