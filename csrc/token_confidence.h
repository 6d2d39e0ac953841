// Token choice and span commits (SPEC section 5): plain-C++ launcher interface (no torch headers; see
// csrc/bindings/unmask.cpp). Semantics: pd_kernels/reference/unmask.py.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace pdk {

// Row pass: token and confidence per row of logits, one read of the row.
//   logits:    [N, V] elements of dtype `dtype` (0 fp32, 1 fp16, 2 bf16); row stride `stride` (elements),
//              unit stride over V; any alignment of the rows (16-byte loads after a partial head vector)
//   suppress:  [num_suppress] ids never chosen, int32 (`suppress_i32`) or int64 (nullptr if none)
//   threshold: float32 [N] per-row floor (top-k / top-p): entries below it are removed (nullptr if none)
//   sample:    0 = argmax; 1 = Gumbel-max sampling at temperature 1 / inv_t (inv_t = fp32(1 / T))
//   keys of the random numbers (reference.unmask.row_state): seed = seed_t[row] (int64 [N]) or `seed`;
//              counter = offset_t[row] (offset_mode 2, int64 [N]), *offset_t + row (1, int64 [1]) or
//              offset + row (0), all mod 2^64
//   kind:      0 prob, 1 margin, 2 neg_entropy
//   token:     int64 [N] out (-1 for a row with no usable entry);  conf: float32 [N] out
//   fpart/ipart: workspace of float32 [N, num_splits, 6] and int32 [N, num_splits, 2] when num_splits > 1
struct TokenConfidenceParams {
  const void* logits;
  int64_t num_rows, vocab, stride;
  int dtype;
  const void* suppress;
  int suppress_i32;
  int64_t num_suppress;
  const float* threshold;
  const int64_t* seed_t;
  const int64_t* offset_t;
  int offset_mode;
  uint64_t seed, offset;
  int kind;
  int sample;
  float inv_t;
  int64_t* token;
  float* conf;
  float* fpart;
  int32_t* ipart;
  int num_splits;
};

// How many programs split each row's V for this N (so the binding can size the workspace).
int token_confidence_num_splits(int64_t num_rows, int64_t vocab, int num_sms);

cudaError_t token_confidence(const TokenConfidenceParams& p, cudaStream_t stream);

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
  int policy;     // 0 threshold, 1 schedule, 2 pd_threshold
  float tau;
  int64_t mask_id;
};

cudaError_t commit_spans(const CommitSpansParams& p, cudaStream_t stream);

}  // namespace pdk
