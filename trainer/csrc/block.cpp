// The Qwen-7B decoder block (SPEC §1.1) with an explicit backward: one torch::autograd::Function whose
// forward runs the block's kernels outside autograd and saves only what its backward needs, and whose
// backward is written out (llm.c-style, over libtorch's GEMMs).
//
// Under autograd the block saved ~30 tensors, some of them views keeping larger buffers alive; here it
// saves its input, the two norms' inverse RMS, the QKV projection (queries and keys roped in place in
// it, so Q, K and V are views of one buffer), the attention output with its log-sum-exp, the residual
// stream after attention and the MLP's two projections, and unless asked to recompute them, the norms'
// outputs and the SwiGLU product: at W1's 2 x 2048 tokens 0.47 GiB per block (0.32 recomputing) against
// autograd's 0.8 GiB. The residual adds ride in the GEMMs' epilogue (addmm, beta 1),
// and the backward writes dQ and dK through RoPE's transpose straight into one dQKV buffer.
//
// On CUDA the norms are libtorch's fused RMS norm forward/backward, RoPE and SwiGLU the NVRTC kernels of
// fused.cpp, and attention (bf16/f16) over padded rows cuDNN's fused attention (as libtorch's SDPA on
// Hopper; IDAVLM_ATTENTION=flash for flash attention), over a packed row's samples libtorch's
// variable-length flash attention. Elsewhere (the CPU, f32) every piece is written
// with libtorch ops: Qwen's formulations and the softmax attention's textbook backward, which the tests
// compare with autograd's gradients of the reference block.

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "fused.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// RMS norm over the last dim: (y, inverse RMS). CUDA: libtorch's fused kernel (the autograd path's
// aten::rms_norm on CUDA); elsewhere Qwen's form, normalised in f32, cast back, then scaled.
std::pair<at::Tensor, at::Tensor> norm_forward(const at::Tensor& x, const at::Tensor& w, double eps) {
  if (x.is_cuda()) {
    auto r = at::_fused_rms_norm(x, {x.size(-1)}, w, eps);
    return {std::get<0>(r), std::get<1>(r)};
  }
  at::Tensor xf = x.to(at::kFloat);
  at::Tensor inv = (xf.square().mean({-1}, true) + eps).rsqrt();
  return {(xf * inv).to(x.scalar_type()) * w, inv};
}

// (dx, dw) of the norm for the gradient dy at its output.
std::pair<at::Tensor, at::Tensor> norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& inv,
                                                const at::Tensor& w, bool need_w) {
  if (x.is_cuda()) {
    auto r = at::_fused_rms_norm_backward(dy, x, {x.size(-1)}, inv, w, {true, need_w});
    return {std::get<0>(r), std::get<1>(r)};
  }
  const int64_t d = x.size(-1);
  at::Tensor xhat = x.to(at::kFloat) * inv;
  at::Tensor dw = need_w ? (dy * xhat.to(x.scalar_type())).reshape({-1, d}).sum(0) : at::Tensor();
  at::Tensor g = (dy * w).to(at::kFloat);
  at::Tensor dx = inv * (g - xhat * (g * xhat).mean({-1}, true));
  return {dx.to(x.scalar_type()), dw};
}

// Rotate-half RoPE of x (B, S, H, Dh) with f32 tables (S, Dh) or (B, S, Dh), or its transpose applied to
// a gradient (backward), written into y (x's shape; y may be x itself: in place). CUDA: the NVRTC kernel;
// elsewhere Qwen's formulation in f32.
void rope_into(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward, const at::Tensor& y) {
  if (x.is_cuda()) return idavlm::rope_into(x, cos, sin, backward, y);
  at::Tensor xf = x.to(at::kFloat);
  const int64_t half = xf.size(3) / 2;
  at::Tensor c = cos.unsqueeze(-2), s = sin.unsqueeze(-2);
  at::Tensor r;
  if (!backward) {  // x cos + rotate_half(x) sin, rotate_half(x) = (-x_hi, x_lo)
    r = xf * c + at::cat({xf.narrow(3, half, half).neg(), xf.narrow(3, 0, half)}, 3) * s;
  } else {  // g cos + rotate_half^T(g sin), rotate_half^T(v) = (v_hi, -v_lo)
    at::Tensor t = xf * s;
    r = xf * c + at::cat({t.narrow(3, half, half), t.narrow(3, 0, half).neg()}, 3);
  }
  y.copy_(r);  // computed whole before the copy: in place is safe
}

at::Tensor swiglu(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_cuda()) return idavlm::swiglu(a, b);
  return a * at::silu(b);
}

std::pair<at::Tensor, at::Tensor> swiglu_grad(const at::Tensor& g, const at::Tensor& a, const at::Tensor& b) {
  if (a.is_cuda()) return idavlm::swiglu_grad(g, a, b);
  at::Tensor sig = at::sigmoid(b);
  at::Tensor silu = b * sig;
  return {g * silu, g * a * sig * (1 + b * (1 - sig))};
}

// Padded rows' attention on CUDA: cuDNN's fused attention (what libtorch's scaled_dot_product_attention
// picks on Hopper), unless IDAVLM_ATTENTION=flash or cuDNN turned the shape down once; then flash.
std::atomic<bool> cudnn_off{false};
bool use_cudnn() {
  static const bool wanted = [] {
    const char* v = std::getenv("IDAVLM_ATTENTION");
    return !(v && std::string(v) == "flash");
  }();
  return wanted && !cudnn_off.load();
}

bool flash(const at::Tensor& q) {
  return q.is_cuda() && (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf);
}

// (T, T) bool: query i sees key j iff both lie in one sample (cu: its offsets) and j <= i.
at::Tensor block_causal_mask(const at::Tensor& cu, int64_t total, const at::Device& device) {
  at::Tensor offs = cu.to(at::kCPU, at::kLong).contiguous();
  std::vector<int64_t> seg(total);
  const int64_t* o = offs.data_ptr<int64_t>();
  for (int64_t k = 0; k + 1 < offs.numel(); ++k)
    for (int64_t i = o[k]; i < o[k + 1]; ++i) seg[i] = k;
  at::Tensor s = at::tensor(seg, at::kLong).to(device);
  at::Tensor idx = at::arange(total, at::TensorOptions(at::kLong).device(device));
  return s.unsqueeze(1).eq(s.unsqueeze(0)).logical_and(idx.unsqueeze(0).le(idx.unsqueeze(1)));
}

struct Attn {
  at::Tensor out, lse, rng, unused;
  bool cudnn = false;
};

// (T, H, Dh) of a (B, S, H, Dh) view whose rows are evenly spaced (always a view, never a copy).
at::Tensor flat3(const at::Tensor& t) { return t.view({t.size(0) * t.size(1), t.size(2), t.size(3)}); }

// The masked attention's pieces (CPU, f32): q, k, v as (H, T, Dh), the scaled scores (H, T, T) with -inf
// where a query may not see a key, the (T, H, Dh) shape and the scale.
struct Scores {
  at::Tensor qh, kh, vh, s;
  std::vector<int64_t> thd;
  double scale;
};

Scores masked_scores(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu) {
  const int64_t T = q.size(0) * q.size(1);
  Scores m;
  m.thd = {T, q.size(2), q.size(3)};
  m.scale = 1.0 / std::sqrt((double)q.size(3));
  m.qh = q.reshape(m.thd).transpose(0, 1);
  m.kh = k.reshape(m.thd).transpose(0, 1);
  m.vh = v.reshape(m.thd).transpose(0, 1);
  m.s = at::matmul(m.qh, m.kh.transpose(1, 2)) * m.scale;
  m.s.masked_fill_(block_causal_mask(cu, T, q.device()).logical_not(), -INFINITY);
  return m;
}

// Causal attention within each sample: q, k, v (B, S, H, Dh) with unit last stride (views of the QKV
// projection). packed: the samples lie at offsets cu (n+1,) int32 of the flattened positions, varlen flash
// attention; otherwise each row is one sample, the batched kernel. Returns out (B, S, H, Dh).
Attn attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu, int64_t max_len,
                       bool packed) {
  const int64_t B = q.size(0), S = q.size(1);
  if (flash(q) && packed) {
    auto r = at::_flash_attention_forward(flat3(q), flat3(k), flat3(v), cu, cu, max_len, max_len, 0.0, /*is_causal=*/true, false);
    return {std::get<0>(r).view(q.sizes()), std::get<1>(r), std::get<2>(r), std::get<3>(r)};
  }
  if (flash(q) && use_cudnn()) {
    try {
      auto r = at::_scaled_dot_product_cudnn_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), std::nullopt,
                                                       /*compute_log_sumexp=*/true, 0.0, /*is_causal=*/true, false);
      return {std::get<0>(r).transpose(1, 2), std::get<1>(r), std::get<6>(r), std::get<7>(r), true};
    } catch (const std::exception& e) {
      // Flash from now on (the first block of the first step: nothing is mixed), and say why once.
      if (!cudnn_off.exchange(true)) {
        std::string why(e.what());
        fprintf(stderr, "idavlm: cuDNN attention unavailable, flash attention instead: %s\n", why.substr(0, why.find('\n')).c_str());
      }
    }
  }
  if (flash(q)) {
    auto r = at::_flash_attention_forward(q, k, v, std::nullopt, std::nullopt, S, S, 0.0, /*is_causal=*/true, false);
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)};
  }
  Scores m = masked_scores(q, k, v, cu);
  at::Tensor lse = m.s.logsumexp({-1});
  at::Tensor p = (m.s - lse.unsqueeze(-1)).exp();
  return {at::matmul(p, m.vh).transpose(0, 1).contiguous().view(q.sizes()), lse, at::Tensor(), at::Tensor()};
}

// (dq, dk, dv), each (B, S, H, Dh), for the gradient dout at the attention's output.
std::vector<at::Tensor> attention_backward(const at::Tensor& dout_in, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const Attn& a, const at::Tensor& cu, int64_t max_len,
                                           bool packed) {
  const int64_t B = q.size(0), S = q.size(1);
  at::Tensor dout = dout_in.contiguous();
  if (flash(q) && packed) {
    auto r = at::_flash_attention_backward(flat3(dout), flat3(q), flat3(k), flat3(v), flat3(a.out), a.lse, cu, cu, max_len,
                                           max_len, 0.0, /*is_causal=*/true, a.rng, a.unused);
    return {std::get<0>(r).view(q.sizes()), std::get<1>(r).view(q.sizes()), std::get<2>(r).view(q.sizes())};
  }
  if (a.cudnn) {
    // dout in the output's layout (cuDNN's backward takes the output's strides for its gradient).
    auto r = at::_scaled_dot_product_cudnn_attention_backward(
        dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), a.out.transpose(1, 2), a.lse, a.rng,
        a.unused, at::Tensor(), at::Tensor(), at::Tensor(), S, S, 0.0, /*is_causal=*/true);
    return {std::get<0>(r).transpose(1, 2), std::get<1>(r).transpose(1, 2), std::get<2>(r).transpose(1, 2)};
  }
  if (flash(q)) {
    auto r = at::_flash_attention_backward(dout, q, k, v, a.out, a.lse, at::Tensor(), at::Tensor(), S, S, 0.0,
                                           /*is_causal=*/true, a.rng, a.unused);
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
  }
  Scores m = masked_scores(q, k, v, cu);
  at::Tensor p = (m.s - a.lse.unsqueeze(-1)).exp();  // (H, T, T), 0 where masked
  at::Tensor doh = dout.reshape(m.thd).transpose(0, 1);
  at::Tensor dv = at::matmul(p.transpose(1, 2), doh);
  at::Tensor dp = at::matmul(doh, m.vh.transpose(1, 2));
  at::Tensor rowdot = (doh * a.out.reshape(m.thd).transpose(0, 1)).sum({-1}, true);
  at::Tensor ds = p * (dp - rowdot);
  at::Tensor dq = at::matmul(ds, m.kh) * m.scale;
  at::Tensor dk = at::matmul(ds.transpose(1, 2), m.qh) * m.scale;
  auto back = [&](const at::Tensor& t) { return t.transpose(0, 1).reshape(q.sizes()); };
  return {back(dq), back(dk), back(dv)};
}

// Inputs, in order: x (B, S, D); ln_1, c_attn weight (3D, D) and bias (3D,), attn c_proj (D, D), ln_2,
// w1 (I, D), w2 (I, D), mlp c_proj (D, I); cos, sin; cu (n+1,) int32 offsets of the samples in the
// flattened (B S) positions. Then heads, the longest sample, the norms' eps, whether the rows are packed
// (else each row is one sample), and whether to keep the norms' outputs and the SwiGLU product for the
// backward (else it recomputes them: less memory, a little more time).
enum In { X, LN1, ATTN_W, ATTN_B, PROJ, LN2, W1, W2, MPROJ, COS, SIN, CU, N_TENSORS };

// Part `i` (0 Q, 1 K, 2 V) of a (T, 3D) QKV buffer as (B, S, H, Dh), a view.
at::Tensor head_view(const at::Tensor& qkv, int64_t i, int64_t B, int64_t S, int64_t H) {
  const int64_t D = qkv.size(1) / 3;
  return qkv.narrow(1, i * D, D).view({B, S, H, D / H});
}

struct QwenBlockFn : public torch::autograd::Function<QwenBlockFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& ln1, const at::Tensor& attn_w,
                            const at::Tensor& attn_b, const at::Tensor& proj, const at::Tensor& ln2, const at::Tensor& w1,
                            const at::Tensor& w2, const at::Tensor& mproj, const at::Tensor& cos, const at::Tensor& sin,
                            const at::Tensor& cu, int64_t heads, int64_t max_len, double eps, bool packed, bool keep) {
    if (x.dim() != 3) throw std::runtime_error("the explicit block takes x (B, S, D)");
    const int64_t B = x.size(0), S = x.size(1), D = x.size(2), T = B * S, H = heads, Dh = D / H;
    at::Tensor xc = x.contiguous();
    auto n1 = norm_forward(xc, ln1, eps);
    at::Tensor qkv = at::addmm(attn_b, n1.first.view({T, D}), attn_w.t());  // (T, 3D)
    at::Tensor h1 = keep ? n1.first : at::Tensor();
    n1.first.reset();
    // Queries and keys roped in place, together: one table row per position serves all 2H heads. Q, K and
    // V stay views of this one buffer, which is all the attention's backward needs of them.
    at::Tensor qk = qkv.narrow(1, 0, 2 * D).view({B, S, 2 * H, Dh});
    rope_into(qk, cos, sin, false, qk);
    Attn a = attention_forward(head_view(qkv, 0, B, S, H), head_view(qkv, 1, B, S, H), head_view(qkv, 2, B, S, H), cu, max_len,
                               packed);
    at::Tensor x2 = at::addmm(xc.view({T, D}), a.out.reshape({T, D}), proj.t());  // x + c_proj(attn)
    auto n2 = norm_forward(x2, ln2, eps);
    at::Tensor m1 = at::mm(n2.first, w1.t()), m2 = at::mm(n2.first, w2.t());
    at::Tensor h2 = keep ? n2.first : at::Tensor();
    n2.first.reset();
    at::Tensor m = swiglu(m1, m2);
    at::Tensor y = at::addmm(x2, m, mproj.t());  // x2 + c_proj(w1(h) * silu(w2(h)))
    if (!keep) m.reset();
    ctx->save_for_backward({xc, n1.second, qkv, a.out, a.lse, x2, n2.second, m1, m2, ln1, attn_w, proj, ln2, w1, w2, mproj,
                            cos, sin, cu, h1, h2, m, a.rng, a.unused});
    ctx->saved_data["heads"] = heads;
    ctx->saved_data["max_len"] = max_len;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["packed"] = packed;
    ctx->saved_data["cudnn"] = a.cudnn;
    return y.view({B, S, D});
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &inv1 = s[1], &qkv = s[2], &out = s[3], &lse = s[4], &x2 = s[5], &inv2 = s[6], &m1 = s[7],
                     &m2 = s[8], &ln1 = s[9], &attn_w = s[10], &proj = s[11], &ln2 = s[12], &w1 = s[13], &w2 = s[14],
                     &mproj = s[15], &cos = s[16], &sin = s[17], &cu = s[18];
    // The norms' outputs and the SwiGLU product: kept by the forward (else undefined: recomputed here).
    const at::Tensor &h1_kept = s[19], &h2_kept = s[20], &m_kept = s[21];
    // The attention's random state (undefined on the CPU path).
    const at::Tensor &rng = s[22], &unused = s[23];
    const bool packed = ctx->saved_data["packed"].toBool();
    const int64_t H = ctx->saved_data["heads"].toInt(), max_len = ctx->saved_data["max_len"].toInt();
    const double eps = ctx->saved_data["eps"].toDouble();
    const int64_t B = x.size(0), S = x.size(1), D = x.size(2), T = B * S, Dh = D / H;
    auto need = [&](In i) { return ctx->needs_input_grad(i); };
    variable_list g(N_TENSORS + 5);
    at::Tensor dy = grads[0].reshape({T, D}).to(x.scalar_type()).contiguous();

    // MLP: y = x2 + m W_c^T, m = swiglu(m1, m2), m1 = h2 W1^T, m2 = h2 W2^T, h2 = norm(x2).
    if (need(MPROJ)) g[MPROJ] = at::mm(dy.t(), m_kept.defined() ? m_kept : swiglu(m1, m2));
    auto dm = swiglu_grad(at::mm(dy, mproj), m1, m2);
    at::Tensor h2 = h2_kept.defined() ? h2_kept : norm_forward(x2, ln2, eps).first;
    if (need(W1)) g[W1] = at::mm(dm.first.t(), h2);
    if (need(W2)) g[W2] = at::mm(dm.second.t(), h2);
    h2.reset();
    at::Tensor dh2 = at::mm(dm.first, w1);
    dh2.addmm_(dm.second, w2);
    dm = {};
    auto dn2 = norm_backward(dh2, x2, inv2, ln2, need(LN2));
    if (need(LN2)) g[LN2] = dn2.second;
    at::Tensor dx2 = dn2.first.add_(dy);  // (T, D)

    // Attention: x2 = x + o W_p^T, o = attention(rope(q), rope(k), v), [q|k|v] = h1 W_a^T + b, h1 = norm(x).
    const at::Tensor o = out.reshape({T, D});
    if (need(PROJ)) g[PROJ] = at::mm(dx2.t(), o);
    at::Tensor dout = at::mm(dx2, proj).view({B, S, H, Dh});
    Attn a{out, lse, rng, unused, ctx->saved_data["cudnn"].toBool()};
    auto d = attention_backward(dout, head_view(qkv, 0, B, S, H), head_view(qkv, 1, B, S, H), head_view(qkv, 2, B, S, H), a,
                                cu, max_len, packed);
    dout.reset();
    // dQKV (T, 3D): the rotation's transpose writes dQ and dK straight into their columns.
    at::Tensor dqkv = at::empty({T, 3 * D}, x.options());
    rope_into(d[0], cos, sin, true, head_view(dqkv, 0, B, S, H));
    rope_into(d[1], cos, sin, true, head_view(dqkv, 1, B, S, H));
    head_view(dqkv, 2, B, S, H).copy_(d[2]);
    d.clear();
    if (need(ATTN_W)) g[ATTN_W] = at::mm(dqkv.t(), (h1_kept.defined() ? h1_kept : norm_forward(x, ln1, eps).first).view({T, D}));
    if (need(ATTN_B)) g[ATTN_B] = dqkv.sum(0);
    at::Tensor dh1 = at::mm(dqkv, attn_w).view({B, S, D});
    dqkv.reset();
    auto dn1 = norm_backward(dh1, x, inv1, ln1, need(LN1));
    if (need(LN1)) g[LN1] = dn1.second;
    if (need(X)) g[X] = dn1.first.reshape({T, D}).add_(dx2).view({B, S, D});
    return g;
  }
};

}  // namespace

extern "C" {

// The block's output for x (B, S, D), differentiable in x and the nine parameters (see QwenBlockFn).
// cu may be null (each row one sample). On success stores a new tensor in *out and returns null.
char* idavlm_qwen_block(const at::Tensor* x, const at::Tensor* ln1, const at::Tensor* attn_w, const at::Tensor* attn_b,
                        const at::Tensor* proj, const at::Tensor* ln2, const at::Tensor* w1, const at::Tensor* w2,
                        const at::Tensor* mproj, const at::Tensor* cos, const at::Tensor* sin, const at::Tensor* cu,
                        int64_t heads, int64_t max_len, double eps, int keep, at::Tensor** out) {
  return idavlm::guarded("the explicit Qwen block", [&] {
    // Autograd functions take defined tensors only: a padded batch's rows become samples of S (which
    // only the CPU's masked attention reads; flash attention runs batched then).
    const int64_t S = x->size(1);
    at::Tensor c = cu ? *cu : at::arange(0, (x->size(0) + 1) * S, S, at::TensorOptions(at::kInt).device(x->device()));
    *out = new at::Tensor(QwenBlockFn::apply(*x, *ln1, *attn_w, *attn_b, *proj, *ln2, *w1, *w2, *mproj, *cos, *sin, c,
                                             heads, cu ? max_len : S, eps, cu != nullptr, keep != 0));
  });
}
}
