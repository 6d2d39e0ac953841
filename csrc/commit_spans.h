// Span commits (SPEC section 5): plain-C++ launcher interface (no torch headers; see
// csrc/bindings/commit_spans.cpp). Semantics: pd_kernels/reference/commit_spans.py.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace pdk {

// Commit policies: the ids of POLICIES in pd_kernels/reference/commit_spans.py (a policy's index there, their one
// home; tests/test_commit_spans.py checks this enum against it).
enum CommitPolicy : int { kThreshold = 0, kSchedule = 1, kPdThreshold = 2, kNumCommitPolicies = 3 };

// Commit: one block per span, over that span's rows only; updates tokens and the span state in place, writes
// committed[S], and the last block to finish writes all_done[1] (bool stored as one byte). One launch, no
// workspace: `arrivals` is a counter owned by the span state, 0 between calls (the last block resets it).
struct CommitSpansParams {
  const int64_t* token;     // [num_rows]; a negative token is never committed
  const float* conf;        // [num_rows]
  const int64_t* row_dst;   // [num_rows]: a row_dst outside [0, num_tokens) is never read or written
  const int32_t* span_rows; // [num_spans, 2]: (first row, row count) per span id, clipped to [0, num_rows)
  int64_t num_rows;
  int64_t* tokens;
  int64_t num_tokens;  // numel of tokens
  int32_t* masks_left;
  int32_t* step;
  const int32_t* num_steps;
  int32_t* deferred;
  unsigned long long* arrivals;  // [1]: low word = blocks arrived, high word = spans with masks left
  int64_t num_spans;
  int32_t* committed;
  bool* all_done;
  int policy;     // a CommitPolicy
  float tau;
  int64_t mask_id;
};

cudaError_t commit_spans(const CommitSpansParams& p, cudaStream_t stream);

}  // namespace pdk
