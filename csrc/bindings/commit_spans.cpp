// torch glue for csrc/commit_spans.cu: checks, then the plain-C launcher on the current stream (no workspace).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include "commit_spans.h"

namespace {

void commit_spans_cuda(const at::Tensor& token, const at::Tensor& conf, const at::Tensor& row_dst,
                       const at::Tensor& span_rows, const at::Tensor& tokens, const at::Tensor& masks_left,
                       const at::Tensor& step, const at::Tensor& num_steps, const at::Tensor& deferred,
                       const at::Tensor& arrivals, const at::Tensor& committed, const at::Tensor& all_done,
                       int64_t policy, double tau, int64_t mask_id) {
  const at::Tensor* all[] = {&token, &conf, &row_dst, &span_rows, &tokens, &masks_left, &step,
                             &num_steps, &deferred, &arrivals, &committed, &all_done};
  for (const at::Tensor* t : all) {
    TORCH_CHECK(t->is_cuda() && t->device() == tokens.device(),
                "commit_spans_cuda: every tensor must be on the same CUDA device");
    TORCH_CHECK(t->is_contiguous(), "commit_spans_cuda: every tensor must be contiguous");
  }
  const int64_t N = token.numel();
  TORCH_CHECK(token.scalar_type() == at::kLong && token.dim() == 1 && N <= 0x7fffffff,
              "commit_spans_cuda: token must be int64 [N], N < 2^31");
  TORCH_CHECK(conf.scalar_type() == at::kFloat && conf.dim() == 1 && conf.size(0) == N,
              "commit_spans_cuda: conf must be float32 [N]");
  TORCH_CHECK(row_dst.scalar_type() == at::kLong && row_dst.dim() == 1 && row_dst.size(0) == N,
              "commit_spans_cuda: row_dst must be int64 [N]");
  TORCH_CHECK(tokens.scalar_type() == at::kLong, "commit_spans_cuda: tokens must be int64");
  const int64_t S = masks_left.numel();
  for (const at::Tensor* t : {&masks_left, &step, &num_steps, &deferred, &committed}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->dim() == 1 && t->size(0) == S,
                "commit_spans_cuda: state tensors and committed must be int32 [S]");
  }
  TORCH_CHECK(span_rows.scalar_type() == at::kInt && span_rows.dim() == 2 && span_rows.size(0) == S &&
                  span_rows.size(1) == 2,
              "commit_spans_cuda: span_rows must be int32 [S, 2]");
  TORCH_CHECK(arrivals.scalar_type() == at::kLong && arrivals.numel() == 1,
              "commit_spans_cuda: arrivals must be int64 [1]");
  TORCH_CHECK(all_done.scalar_type() == at::kBool && all_done.numel() == 1, "commit_spans_cuda: all_done must be bool [1]");
  TORCH_CHECK(policy >= 0 && policy < pdk::kNumCommitPolicies,
              "commit_spans_cuda: policy must be a CommitPolicy (0 to ", pdk::kNumCommitPolicies - 1, ")");

  const c10::cuda::CUDAGuard guard(tokens.device());
  pdk::CommitSpansParams p{};
  p.token = token.data_ptr<int64_t>();
  p.conf = conf.data_ptr<float>();
  p.row_dst = row_dst.data_ptr<int64_t>();
  p.span_rows = span_rows.data_ptr<int32_t>();
  p.num_rows = N;
  p.tokens = tokens.data_ptr<int64_t>();
  p.num_tokens = tokens.numel();
  p.masks_left = masks_left.data_ptr<int32_t>();
  p.step = step.data_ptr<int32_t>();
  p.num_steps = num_steps.data_ptr<int32_t>();
  p.deferred = deferred.data_ptr<int32_t>();
  p.arrivals = reinterpret_cast<unsigned long long*>(arrivals.data_ptr<int64_t>());
  p.num_spans = S;
  p.committed = committed.data_ptr<int32_t>();
  p.all_done = all_done.data_ptr<bool>();
  p.policy = static_cast<int>(policy);
  p.tau = static_cast<float>(tau);
  p.mask_id = mask_id;
  const cudaError_t err = pdk::commit_spans(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "commit_spans_cuda: launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(pd_kernels, CUDA, m) {
  m.impl("commit_spans_cuda", &commit_spans_cuda);
}
