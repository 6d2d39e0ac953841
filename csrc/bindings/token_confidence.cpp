// torch glue for csrc/token_confidence.cu: checks, the split-V workspace, then the plain-C launcher on the
// current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <atomic>
#include <optional>

#include "token_confidence.h"

namespace {

// SM count per device, asked of the driver once (the split heuristic runs on every call)
int sm_count(int device) {
  static std::atomic<int> cached[64] = {};
  const bool cacheable = device >= 0 && device < 64;
  int n = cacheable ? cached[device].load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    TORCH_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) == cudaSuccess,
                "token_confidence_cuda: cannot query the SM count");
    if (cacheable) cached[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

void token_confidence_cuda(const at::Tensor& logits, const at::Tensor& token, const at::Tensor& conf,
                           const std::optional<at::Tensor>& suppress_ids, const std::optional<at::Tensor>& seed_t,
                           const std::optional<at::Tensor>& offset_t, const std::optional<at::Tensor>& threshold,
                           int64_t seed, int64_t offset, int64_t kind, double temperature) {
  TORCH_CHECK(logits.is_cuda() && token.is_cuda() && conf.is_cuda(),
              "token_confidence_cuda: logits, token and conf must be CUDA tensors");
  TORCH_CHECK(logits.dim() == 2, "token_confidence_cuda: logits must be [N, V]");
  TORCH_CHECK(logits.size(1) == 1 || logits.stride(1) == 1, "token_confidence_cuda: logits need a unit stride over V");
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "token_confidence_cuda: logits must be float32, float16 or bfloat16");
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V >= 1 && V < 0x7fffffff, "token_confidence_cuda: vocabulary size out of range");
  TORCH_CHECK(token.scalar_type() == at::kLong && token.dim() == 1 && token.size(0) == N && token.is_contiguous(),
              "token_confidence_cuda: token must be contiguous int64 [N]");
  TORCH_CHECK(conf.scalar_type() == at::kFloat && conf.dim() == 1 && conf.size(0) == N && conf.is_contiguous(),
              "token_confidence_cuda: conf must be contiguous float32 [N]");
  TORCH_CHECK(kind >= 0 && kind < pdk::kNumConfidenceKinds,
              "token_confidence_cuda: kind must be a ConfidenceKind (0 to ", pdk::kNumConfidenceKinds - 1, ")");
  TORCH_CHECK(temperature >= 0, "token_confidence_cuda: temperature must be >= 0");
  TORCH_CHECK(seed >= 0 && offset >= 0, "token_confidence_cuda: seed and offset must be >= 0");
  const auto dev = logits.device();
  auto on_dev = [&](const at::Tensor& t) { return t.is_cuda() && t.device() == dev; };
  const at::Tensor* sup = nullptr;
  at::Tensor sup_c;
  if (suppress_ids.has_value() && suppress_ids->numel() > 0) {
    TORCH_CHECK(on_dev(*suppress_ids) && suppress_ids->dim() == 1,
                "token_confidence_cuda: suppress_ids must be a 1-D tensor on the logits' device");
    TORCH_CHECK(suppress_ids->scalar_type() == at::kLong || suppress_ids->scalar_type() == at::kInt,
                "token_confidence_cuda: suppress_ids must be int32 or int64");
    sup_c = suppress_ids->is_contiguous() ? *suppress_ids : suppress_ids->contiguous();
    sup = &sup_c;
  }
  if (seed_t.has_value()) {
    TORCH_CHECK(on_dev(*seed_t) && seed_t->scalar_type() == at::kLong && seed_t->numel() == N &&
                    seed_t->dim() == 1 && seed_t->is_contiguous(),
                "token_confidence_cuda: seed_t must be a contiguous int64 CUDA tensor [N]");
  }
  int offset_mode = 0;
  if (offset_t.has_value()) {
    TORCH_CHECK(on_dev(*offset_t) && offset_t->scalar_type() == at::kLong && offset_t->dim() == 1 &&
                    offset_t->is_contiguous() && (offset_t->numel() == 1 || offset_t->numel() == N),
                "token_confidence_cuda: offset_t must be a contiguous int64 CUDA tensor [1] or [N]");
    offset_mode = offset_t->numel() == N && N > 1 ? 2 : 1;
  }
  if (threshold.has_value()) {
    TORCH_CHECK(on_dev(*threshold) && threshold->scalar_type() == at::kFloat && threshold->dim() == 1 &&
                    threshold->numel() == N && threshold->is_contiguous(),
                "token_confidence_cuda: threshold must be a contiguous float32 CUDA tensor [N]");
  }
  if (N == 0) return;

  const c10::cuda::CUDAGuard guard(dev);
  const int num_sms = sm_count(dev.index());
  pdk::TokenConfidenceParams p{};
  p.logits = logits.data_ptr();
  p.num_rows = N;
  p.vocab = V;
  p.stride = logits.stride(0);
  p.dtype = dt == at::kFloat ? 0 : (dt == at::kHalf ? 1 : 2);
  p.suppress = sup ? sup->data_ptr() : nullptr;
  p.suppress_i32 = sup && sup->scalar_type() == at::kInt;
  p.num_suppress = sup ? sup->numel() : 0;
  p.threshold = threshold.has_value() ? threshold->data_ptr<float>() : nullptr;
  p.seed_t = seed_t.has_value() ? seed_t->data_ptr<int64_t>() : nullptr;
  p.offset_t = offset_t.has_value() ? offset_t->data_ptr<int64_t>() : nullptr;
  p.offset_mode = offset_mode;
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  p.kind = static_cast<int>(kind);
  p.sample = temperature > 0 ? 1 : 0;
  p.inv_t = temperature > 0 ? static_cast<float>(1.0 / temperature) : 1.f;  // fp32(1 / T), as the reference
  p.token = token.data_ptr<int64_t>();
  p.conf = conf.data_ptr<float>();
  p.num_splits = pdk::token_confidence_num_splits(N, V, num_sms);
  at::Tensor fpart, ipart;
  if (p.num_splits > 1) {
    fpart = at::empty({N, p.num_splits, 6}, logits.options().dtype(at::kFloat));
    ipart = at::empty({N, p.num_splits, 2}, logits.options().dtype(at::kInt));
    p.fpart = fpart.data_ptr<float>();
    p.ipart = ipart.data_ptr<int32_t>();
  }
  const cudaError_t err = pdk::token_confidence(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "token_confidence_cuda: launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(pd_kernels, CUDA, m) {
  m.impl("token_confidence_cuda", &token_confidence_cuda);
}
