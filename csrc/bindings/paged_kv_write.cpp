// torch glue for csrc/paged_kv_write.cu: checks, then the plain-C launcher on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "paged_kv_write.h"

namespace {

void paged_kv_write_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(k.is_cuda() && v.is_cuda() && k_cache.is_cuda() && v_cache.is_cuda() && slot_mapping.is_cuda(),
              "paged_kv_write_cuda: all tensors must be CUDA tensors");
  TORCH_CHECK(v.device() == k.device() && k_cache.device() == k.device() && v_cache.device() == k.device() &&
                  slot_mapping.device() == k.device(),
              "paged_kv_write_cuda: all tensors must be on one device");
  TORCH_CHECK(k.dim() == 3 || k.dim() == 4, "paged_kv_write_cuda: k must be [T, H, D] or [L, T, H, D]");
  TORCH_CHECK(k.sizes() == v.sizes(), "paged_kv_write_cuda: k and v shapes differ");
  TORCH_CHECK(k_cache.dim() == k.dim() + 1 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.strides() == v_cache.strides(),
              "paged_kv_write_cuda: caches must be [(L,) P, page_size, H, D] with equal shapes and strides");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "paged_kv_write_cuda: k, v and caches must share one dtype");
  TORCH_CHECK(k.element_size() == 2 || k.element_size() == 4, "paged_kv_write_cuda: 16- or 32-bit floats only");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.is_contiguous() && slot_mapping.size(0) == k.size(-3),
              "paged_kv_write_cuda: slot_mapping must be contiguous int64 [T]");
  TORCH_CHECK(k.stride(-1) == 1 && v.stride(-1) == 1 && k_cache.stride(-1) == 1,
              "paged_kv_write_cuda: last dims must be unit-stride");
  const bool layered = k.dim() == 4;
  const int64_t L = layered ? k.size(0) : 1;
  const int pd = layered ? 1 : 0;  // index of the page dim in the cache
  TORCH_CHECK(!layered || k_cache.size(0) == L, "paged_kv_write_cuda: layer counts differ");
  TORCH_CHECK(k_cache.size(pd + 2) == k.size(-2) && k_cache.size(pd + 3) == k.size(-1),
              "paged_kv_write_cuda: cache heads/head_dim differ from k");
  TORCH_CHECK(k_cache.stride(pd) == k_cache.size(pd + 1) * k_cache.stride(pd + 1),
              "paged_kv_write_cuda: cache pages must be stored whole");

  const c10::cuda::CUDAGuard guard(k.device());
  pdk::PagedKVWriteParams p{};
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.slots = slot_mapping.data_ptr<int64_t>();
  p.num_layers = L;
  p.num_tokens = k.size(-3);
  p.num_heads = k.size(-2);
  p.head_dim = k.size(-1);
  p.num_slots = k_cache.size(pd) * k_cache.size(pd + 1);
  p.k_stride_l = layered ? k.stride(0) : 0;
  p.k_stride_t = k.stride(-3);
  p.k_stride_h = k.stride(-2);
  p.v_stride_l = layered ? v.stride(0) : 0;
  p.v_stride_t = v.stride(-3);
  p.v_stride_h = v.stride(-2);
  p.c_stride_l = layered ? k_cache.stride(0) : 0;
  p.c_stride_s = k_cache.stride(pd + 1);
  p.c_stride_h = k_cache.stride(pd + 2);
  p.elem_size = static_cast<int>(k.element_size());
  const cudaError_t err = pdk::paged_kv_write(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "paged_kv_write_cuda: launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(pd_kernels, CUDA, m) { m.impl("paged_kv_write_cuda", &paged_kv_write_cuda); }
