// Paged KV-cache writes (SPEC section 6): one launch writes every layer of a batch of tokens.
//
// A thread block holds TOK_PER_BLOCK tokens of one layer; blockDim.x threads cover a token's H heads x
// D elements as VecT words (16 bytes when every pointer and stride allows it). The copy is a pure
// byte move, so one kernel serves fp16, bf16 and fp32. Bad slots are skipped, never written.
#include "paged_kv_write.h"

#include <cuda_runtime.h>

namespace pdk {
namespace {

template <typename VecT>
__global__ void paged_kv_write_kernel(PagedKVWriteParams p, int vec_per_head) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t l = blockIdx.y;
  if (t >= p.num_tokens) return;
  const int64_t slot = p.slots[t];
  if (slot < 0 || slot >= p.num_slots) return;
  const int64_t per_token = static_cast<int64_t>(p.num_heads) * vec_per_head;
  // element strides -> VecT strides (the launcher checked divisibility)
  const int64_t w = sizeof(VecT) / p.elem_size;
  const VecT* k = reinterpret_cast<const VecT*>(p.k) + (l * p.k_stride_l + t * p.k_stride_t) / w;
  const VecT* v = reinterpret_cast<const VecT*>(p.v) + (l * p.v_stride_l + t * p.v_stride_t) / w;
  VecT* kc = reinterpret_cast<VecT*>(p.k_cache) + (l * p.c_stride_l + slot * p.c_stride_s) / w;
  VecT* vc = reinterpret_cast<VecT*>(p.v_cache) + (l * p.c_stride_l + slot * p.c_stride_s) / w;
  for (int64_t i = threadIdx.x; i < per_token; i += blockDim.x) {
    const int64_t h = i / vec_per_head, c = i - h * vec_per_head;
    // both loads issued before the stores: two independent 16-byte requests in flight per thread
    const VecT kv = k[h * (p.k_stride_h / w) + c];
    const VecT vv = v[h * (p.v_stride_h / w) + c];
    kc[h * (p.c_stride_h / w) + c] = kv;
    vc[h * (p.c_stride_h / w) + c] = vv;
  }
}

bool aligned(const void* ptr, int bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

template <typename VecT>
bool fits(const PagedKVWriteParams& p) {
  const int b = sizeof(VecT);
  const int64_t w = b / p.elem_size;
  if (w < 1 || b % p.elem_size) return false;
  if (!aligned(p.k, b) || !aligned(p.v, b) || !aligned(p.k_cache, b) || !aligned(p.v_cache, b)) return false;
  const int64_t s[] = {p.head_dim,   p.k_stride_l, p.k_stride_t, p.k_stride_h, p.v_stride_l,
                       p.v_stride_t, p.v_stride_h, p.c_stride_l, p.c_stride_s, p.c_stride_h};
  for (int64_t x : s)
    if (x % w) return false;
  return true;
}

template <typename VecT>
cudaError_t launch(const PagedKVWriteParams& p, cudaStream_t stream) {
  const int vec_per_head = static_cast<int>(p.head_dim * p.elem_size / sizeof(VecT));
  int per_token = static_cast<int>(p.num_heads) * vec_per_head;
  int tx = per_token >= 256 ? 256 : ((per_token + 31) / 32) * 32;
  int ty = 256 / tx;  // several tokens per block when a token is small: fewer, fuller blocks
  if (ty < 1) ty = 1;
  const int64_t blocks_x = (p.num_tokens + ty - 1) / ty;
  if (blocks_x > 0x7fffffff || p.num_layers > 65535) return cudaErrorInvalidConfiguration;
  dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(p.num_layers));
  dim3 block(tx, ty);
  paged_kv_write_kernel<VecT><<<grid, block, 0, stream>>>(p, vec_per_head);
  return cudaGetLastError();
}

}  // namespace

cudaError_t paged_kv_write(const PagedKVWriteParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.num_layers == 0) return cudaSuccess;
  if (p.elem_size != 2 && p.elem_size != 4) return cudaErrorInvalidValue;
  if (fits<uint4>(p)) return launch<uint4>(p, stream);
  if (fits<uint2>(p)) return launch<uint2>(p, stream);
  if (fits<unsigned int>(p)) return launch<unsigned int>(p, stream);
  return launch<unsigned short>(p, stream);
}

}  // namespace pdk
