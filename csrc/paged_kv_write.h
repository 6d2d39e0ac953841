// Paged KV-cache writes: plain-C++ launcher interface (no torch headers; see csrc/bindings/paged_kv_write.cpp).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace pdk {

// Copies keys/values of T tokens x L layers into their cache slots.
//   k, v:     [L, T, H, D] elements of `elem_size` bytes, strides in elements (last dim unit-stride)
//   caches:   viewed as [L, num_slots, H, D] (page and in-page dims merged), same dtype as k/v
//   slots:    int64 [T]; a slot < 0 or >= num_slots writes nothing
struct PagedKVWriteParams {
  const void* k;
  const void* v;
  void* k_cache;
  void* v_cache;
  const int64_t* slots;
  int64_t num_layers, num_tokens, num_heads, head_dim, num_slots;
  int64_t k_stride_l, k_stride_t, k_stride_h;
  int64_t v_stride_l, v_stride_t, v_stride_h;
  int64_t c_stride_l, c_stride_s, c_stride_h;
  int elem_size;  // 2 (fp16/bf16) or 4 (fp32)
};

cudaError_t paged_kv_write(const PagedKVWriteParams& p, cudaStream_t stream);

}  // namespace pdk
