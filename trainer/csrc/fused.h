// The fused CUDA kernels of fused.cpp that the explicit LLM block (block.cpp) calls directly, outside
// autograd (each takes CUDA bf16 or f32 tensors and needs the kernels set up: idavlm_fused_setup), and
// the shims' common exception guard.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <utility>

namespace idavlm {
// Runs f; an exception becomes a message for Rust (null: success; the caller frees it with
// idavlm_free_message), never crossing the C boundary.
template <typename F>
char* guarded(const char* what, F&& f) {
  try {
    f();
    return nullptr;
  } catch (const std::exception& e) {
    return strdup(e.what());
  } catch (...) {
    return strdup((std::string("unknown C++ exception in ") + what).c_str());
  }
}

// Rotate-half RoPE of x (B, S, H, Dh) (unit last stride, any other strides) with f32 tables (S, Dh) or
// (B, S, Dh), written into y (x's shape, unit last stride, any other strides; y may be x: in place);
// backward = true applies the transposed rotation to a gradient.
void rope_into(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward, const at::Tensor& y);
// a * silu(b) of two tensors of one shape.
at::Tensor swiglu(const at::Tensor& a, const at::Tensor& b);
// (da, db) of a * silu(b) for the gradient g at its output.
std::pair<at::Tensor, at::Tensor> swiglu_grad(const at::Tensor& g, const at::Tensor& a, const at::Tensor& b);
}  // namespace idavlm
