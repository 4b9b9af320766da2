// Variable-length (packed) causal attention, and dense flash attention, through libtorch's flash-attention
// operators, which tch does not expose. `at::_flash_attention_forward` goes through the dispatcher,
// autograd included: its backward is libtorch's own `_flash_attention_backward`. Exceptions never cross
// into Rust (idavlm::guarded): a failure comes back as a message the caller frees with
// `idavlm_free_message`.

#include <ATen/core/Tensor.h>
#include <ATen/ops/_flash_attention_forward.h>
#include <ATen/ops/_scaled_dot_product_flash_attention.h>
#include <torch/csrc/autograd/autograd.h>

#include <cstdlib>

#include "fused.h"

extern "C" {

// q, k, v: (total, heads, head_dim) CUDA bf16/f16, the samples one after another; cu_seqlens: (n+1,)
// int32 offsets of the samples (0, l0, l0+l1, ...); max_len: the longest sample. On success stores a
// new tensor (total, heads, head_dim) in *out and returns null.
char* idavlm_flash_varlen(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v, const at::Tensor* cu_seqlens,
                          int64_t max_len, at::Tensor** out) {
  return idavlm::guarded("_flash_attention_forward", [&] {
    auto r = at::_flash_attention_forward(*q, *k, *v, *cu_seqlens, *cu_seqlens, max_len, max_len, 0.0,
                                          /*is_causal=*/true, /*return_debug_mask=*/false);
    *out = new at::Tensor(std::get<0>(r));
  });
}

// Flash attention without a mask over q (B, H, Lq, D), k and v (B, H, Lk, D) (unit last stride), CUDA
// bf16/f16, through the dispatcher (autograd included). Unlike libtorch's scaled_dot_product_attention,
// which prefers cuDNN on Hopper, it builds no per-shape plan. On success stores the output (B, H, Lq, D).
char* idavlm_flash_dense(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v, at::Tensor** out) {
  return idavlm::guarded("_scaled_dot_product_flash_attention", [&] {
    auto r = at::_scaled_dot_product_flash_attention(*q, *k, *v, 0.0, /*is_causal=*/false, /*return_debug_mask=*/false);
    *out = new at::Tensor(std::get<0>(r));
  });
}

// Backpropagates `grad` from `out` (same shape) into the graph: gradients accumulate in the leaves' `.grad`.
// tch's `backward` takes no output gradient, and the `(out * grad).sum().backward()` it leaves costs a
// multiply, a reduction and another multiply of the block's whole activation per block.
char* idavlm_backward_with(const at::Tensor* out, const at::Tensor* grad) {
  return idavlm::guarded("autograd::backward", [&] { torch::autograd::backward({*out}, {*grad}); });
}

void idavlm_free_message(char* m) { free(m); }

}
