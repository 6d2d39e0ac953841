// Token choice (SPEC section 5): plain-C++ launcher interface (no torch headers; see
// csrc/bindings/token_confidence.cpp). Semantics: pd_kernels/reference/token_confidence.py.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace pdk {

// Confidence kinds: the ids of CONFIDENCE_KINDS in pd_kernels/reference/token_confidence.py (a kind's index there,
// their one home; tests/test_token_confidence.py checks this enum against it).
enum ConfidenceKind : int { kProb = 0, kMargin = 1, kNegEntropy = 2, kNumConfidenceKinds = 3 };

// Row pass: token and confidence per row of logits, one read of the row.
//   logits:    [N, V] elements of dtype `dtype` (0 fp32, 1 fp16, 2 bf16); row stride `stride` (elements),
//              unit stride over V; any alignment of the rows (16-byte loads after a partial head vector)
//   suppress:  [num_suppress] ids never chosen, int32 (`suppress_i32`) or int64 (nullptr if none)
//   threshold: float32 [N] per-row floor (top-k / top-p): entries below it are removed (nullptr if none)
//   sample:    0 = argmax; 1 = Gumbel-max sampling at temperature 1 / inv_t (inv_t = fp32(1 / T))
//   keys of the random numbers (reference.token_confidence.row_state): seed = seed_t[row] (int64 [N]) or `seed`;
//              counter = offset_t[row] (offset_mode 2, int64 [N]), *offset_t + row (1, int64 [1]) or
//              offset + row (0), all mod 2^64
//   kind:      a ConfidenceKind
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

}  // namespace pdk
