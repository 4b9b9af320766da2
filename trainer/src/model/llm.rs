//! Qwen-7B decoder block (SPEC §1.1): pre-norm, contiguous [Q|K|V] with bias, rotate-half RoPE in f32,
//! causal attention scaled by 1/sqrt(head_dim), MLP `c_proj(w1(x) * silu(w2(x)))`.

use std::ffi::c_char;

use tch::{Kind, Tensor};

use super::attention::{self, Segments};
use super::layers::{apply_rope, Linear, RmsNorm};

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn idavlm_qwen_block(
        x: *const torch_sys::C_tensor,
        ln1: *const torch_sys::C_tensor,
        attn_w: *const torch_sys::C_tensor,
        attn_b: *const torch_sys::C_tensor,
        proj: *const torch_sys::C_tensor,
        ln2: *const torch_sys::C_tensor,
        w1: *const torch_sys::C_tensor,
        w2: *const torch_sys::C_tensor,
        mproj: *const torch_sys::C_tensor,
        cos: *const torch_sys::C_tensor,
        sin: *const torch_sys::C_tensor,
        cu: *const torch_sys::C_tensor,
        heads: i64,
        max_len: i64,
        eps: f64,
        keep: i32,
        out: *mut *mut torch_sys::C_tensor,
    ) -> *mut c_char;
}

/// Whether training blocks on CUDA run the explicit block (csrc/block.cpp): on unless
/// `kernels.explicit_block: false`, which keeps the autograd formulation (the reference) everywhere.
pub fn explicit_enabled() -> bool {
    super::choice::current().explicit_block
}

/// Whether the explicit block recomputes its norms' outputs and SwiGLU product in the backward instead
/// of keeping them (`kernels.block_recompute`: 0.32 instead of 0.47 GiB per kept block at W1's shape).
pub fn explicit_recomputes() -> bool {
    super::choice::current().block_recompute
}

#[derive(Debug)]
pub struct QwenBlock {
    pub ln_1: RmsNorm,
    pub c_attn: Linear,
    pub c_proj: Linear,
    pub ln_2: RmsNorm,
    pub w1: Linear,
    pub w2: Linear,
    pub mlp_c_proj: Linear,
    pub heads: i64,
}

/// Keys and values of earlier positions, (B, H, T, Dh) each, for incremental decoding.
#[derive(Debug)]
pub struct KvCache {
    pub k: Tensor,
    pub v: Tensor,
}

/// Rotary tables and the inference-only logn scaling of queries for one forward call.
pub struct Rope {
    /// (S, Dh) f32 each, for the positions of this call.
    pub cos: Tensor,
    pub sin: Tensor,
    /// (S,) or (B, S) f32 factors for the queries (Qwen's logn attention); None in training.
    pub logn: Option<Tensor>,
    /// (B, T) bool: which of all keys up to this call are real tokens (a left-padded generation batch);
    /// None when every key is.
    pub keys: Option<Tensor>,
    /// A packed training row: its samples, each attending only to itself. None: each row is one sample.
    pub segments: Option<Segments>,
}

/// Whether training blocks of `cfg` in `kind` on `device` run [`QwenBlock::forward_explicit`] (what
/// [`QwenBlock::forward`] picks for a training forward): CUDA, bf16, the fused kernels available, the
/// explicit block not switched off, and no LoRA adapter.
pub fn explicit_runs(cfg: &super::ModelConfig, device: tch::Device, kind: Kind) -> bool {
    cfg.lora.is_none() && explicit_on(device, kind)
}

/// Whether tensors of `kind` on `device` go through the explicit block: CUDA, bf16, the fused kernels
/// available, and the explicit block not switched off.
fn explicit_on(device: tch::Device, kind: Kind) -> bool {
    device.is_cuda() && kind == Kind::BFloat16 && explicit_enabled() && super::fused::available()
}

impl QwenBlock {
    /// x (B, S, D) -> (B, S, D). With a cache, x holds only the new positions, which attend to the
    /// cached ones and causally among themselves; the cache is extended in place.
    pub fn forward(&self, x: &Tensor, rope: &Rope, cache: Option<&mut Option<KvCache>>) -> Tensor {
        if cache.is_none() && explicit_on(x.device(), x.kind()) && self.explicit_applies(rope) {
            return self.forward_explicit(x, rope);
        }
        self.forward_autograd(x, rope, cache)
    }

    /// Whether [`Self::forward_explicit`] computes this block for `rope`: a training forward (no logn
    /// scaling, no key mask) of a block without LoRA, biased only in c_attn (Qwen's layout).
    pub fn explicit_applies(&self, rope: &Rope) -> bool {
        let plain = |l: &Linear, bias: bool| l.lora.is_none() && l.bias.is_some() == bias;
        rope.logn.is_none()
            && rope.keys.is_none()
            && plain(&self.c_attn, true)
            && plain(&self.c_proj, false)
            && plain(&self.w1, false)
            && plain(&self.w2, false)
            && plain(&self.mlp_c_proj, false)
    }

    /// The block as one autograd function with an explicit backward (csrc/block.cpp), which saves only
    /// the tensors its backward needs: the same values and gradients as [`Self::forward_autograd`] up to
    /// rounding (equal within 1e-5 in f32 on the CPU, tested). Requires [`Self::explicit_applies`].
    pub fn forward_explicit(&self, x: &Tensor, rope: &Rope) -> Tensor {
        self.forward_explicit_with(x, rope, !explicit_recomputes())
    }

    /// [`Self::forward_explicit`], keeping the norms' outputs and the SwiGLU product for the backward
    /// (`keep`) or recomputing them there.
    pub fn forward_explicit_with(&self, x: &Tensor, rope: &Rope, keep: bool) -> Tensor {
        assert!(self.explicit_applies(rope), "the explicit block covers training forwards of plain blocks");
        let bias = self.c_attn.bias.as_ref().expect("c_attn has a bias");
        let (cu, max_len) = match &rope.segments {
            Some(seg) => (seg.cu_seqlens.as_ptr(), seg.max_len),
            None => (std::ptr::null(), x.size()[1]),
        };
        let eps = self.ln_1.eps;
        // SAFETY: every pointer is a live tch tensor borrowed for the call (cu may be null); the shim
        // catches every C++ exception.
        super::fused::shim_tensor("the explicit Qwen block", |out| unsafe {
            idavlm_qwen_block(
                x.as_ptr(),
                self.ln_1.weight.as_ptr(),
                self.c_attn.weight.as_ptr(),
                bias.as_ptr(),
                self.c_proj.weight.as_ptr(),
                self.ln_2.weight.as_ptr(),
                self.w1.weight.as_ptr(),
                self.w2.weight.as_ptr(),
                self.mlp_c_proj.weight.as_ptr(),
                rope.cos.as_ptr(),
                rope.sin.as_ptr(),
                cu,
                self.heads,
                max_len,
                eps,
                i32::from(keep),
                out,
            )
        })
    }

    /// The block through libtorch's autograd, op by op: the reference, the CPU path and the only path
    /// for inference (cache, logn, key masks) and LoRA.
    pub fn forward_autograd(&self, x: &Tensor, rope: &Rope, cache: Option<&mut Option<KvCache>>) -> Tensor {
        let (b, s, d) = x.size3().expect("block input must be (B, S, D)");
        let hd = d / self.heads;
        let qkv = self.c_attn.forward(&self.ln_1.forward(x));
        let parts = qkv.split(d, -1);
        let q = apply_rope(&parts[0].view([b, s, self.heads, hd]), &rope.cos, &rope.sin);
        let k = apply_rope(&parts[1].view([b, s, self.heads, hd]), &rope.cos, &rope.sin);
        let v = parts[2].view([b, s, self.heads, hd]);
        let q = match &rope.logn {
            // logn scaling in f32 then back, as Qwen's `query * logn_tensor`.
            Some(f) => {
                let f = if f.dim() == 1 { f.view([1, s, 1, 1]) } else { f.view([b, s, 1, 1]) };
                (q.to_kind(Kind::Float) * f).to_kind(q.kind())
            }
            None => q,
        };
        if let Some(seg) = &rope.segments {
            assert!(cache.is_none() && rope.keys.is_none(), "packed rows are for training only");
            let a = attention::packed(&q, &k, &v, seg);
            return self.finish(x, &a.reshape([b, s, d]));
        }
        let (q, mut k, mut v) = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2));
        let mut past = 0;
        if let Some(cache) = cache {
            if let Some(c) = cache.as_ref() {
                past = c.k.size()[2];
                k = Tensor::cat(&[&c.k, &k], 2);
                v = Tensor::cat(&[&c.v, &v], 2);
            }
            *cache = Some(KvCache { k: k.shallow_clone(), v: v.shallow_clone() });
        }
        let a = match &rope.keys {
            None if past == 0 => Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, true, None, false),
            keys => {
                // New position i (absolute past+i) sees keys 0..=past+i that are real tokens; a padding
                // query also sees itself, so that its (unused) row stays finite.
                let t = past + s;
                let qi = Tensor::arange_start(past, t, (Kind::Int64, x.device())).unsqueeze(1);
                let kj = Tensor::arange(t, (Kind::Int64, x.device())).unsqueeze(0);
                let causal = kj.le_tensor(&qi);
                let mask = match keys {
                    None => causal,
                    Some(real) => {
                        causal.unsqueeze(0).logical_and(&real.view([b, 1, t])).logical_or(&kj.eq_tensor(&qi)).unsqueeze(1)
                    }
                };
                Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&mask), 0.0, false, None, false)
            }
        };
        self.finish(x, &a.transpose(1, 2).reshape([b, s, d]))
    }

    /// After attention (heads merged, (B, S, D)): output projection, residual, MLP, residual.
    fn finish(&self, x: &Tensor, a: &Tensor) -> Tensor {
        let x = x + self.c_proj.forward(a);
        let h = self.ln_2.forward(&x);
        let (a, g) = (self.w1.forward(&h), self.w2.forward(&h));
        let m = if super::fused::runs_on(&a) { super::fused::swiglu(&a, &g) } else { a * g.silu() };
        x + self.mlp_c_proj.forward(&m)
    }
}

/// A block of `cfg`'s shape with random weights in `kind` on `device` (scaled as an initialisation would
/// be, the norms' around 1), and its eight parameters as leaves, in the block's order.
pub(crate) fn random_block(cfg: &super::ModelConfig, device: tch::Device, kind: Kind) -> (QwenBlock, Vec<Tensor>) {
    let (d, i) = (cfg.hidden_size, cfg.mlp_width());
    let param = |shape: &[i64], scale: f64, shift: f64| {
        (Tensor::randn(shape, (Kind::Float, device)) * scale + shift).to_kind(kind).set_requires_grad(true)
    };
    let w = |o: i64, n: i64| param(&[o, n], 1.0 / (n as f64).sqrt(), 0.0);
    let params = vec![
        param(&[d], 0.2, 1.0),
        w(3 * d, d),
        param(&[3 * d], 0.1, 0.0),
        w(d, d),
        param(&[d], 0.2, 1.0),
        w(i, d),
        w(i, d),
        w(d, i),
    ];
    let lin = |k: usize, bias: Option<usize>| Linear {
        weight: params[k].shallow_clone(),
        bias: bias.map(|b| params[b].shallow_clone()),
        lora: None,
    };
    let eps = cfg.layer_norm_epsilon;
    let block = QwenBlock {
        ln_1: RmsNorm { weight: params[0].shallow_clone(), eps },
        c_attn: lin(1, Some(2)),
        c_proj: lin(3, None),
        ln_2: RmsNorm { weight: params[4].shallow_clone(), eps },
        w1: lin(5, None),
        w2: lin(6, None),
        mlp_c_proj: lin(7, None),
        heads: cfg.num_attention_heads,
    };
    (block, params)
}

/// [`QwenBlock::forward_explicit`] against [`QwenBlock::forward_autograd`] at Qwen-VL-Chat's width (random
/// weights in `kind` on `device`), output and the gradients of the input and of every parameter, each
/// timed forward + backward over `reps` runs: `rows` padded rows of `seq` tokens ("qwen_block"; and
/// recomputing the norms and SwiGLU in the backward, "qwen_block_recompute"), and the same tokens as one
/// packed row of uneven samples ("qwen_block_packed").
pub fn check_explicit_block(
    device: tch::Device,
    kind: Kind,
    rows: i64,
    seq: i64,
    reps: usize,
) -> Vec<super::layers::FastPathCheck> {
    let cfg = super::ModelConfig::qwen_vl_chat();
    let d = cfg.hidden_size;
    let (block, params) = random_block(&cfg, device, kind);
    let total = rows * seq;
    // Uneven samples filling the same tokens, as the packer leaves them.
    let mut lens = Vec::new();
    let mut left = total as usize;
    for l in [1_090usize, 554, 1_937, 812, 1_301].iter().cycle() {
        let l = (*l).min(left);
        lens.push(l);
        left -= l;
        if left == 0 {
            break;
        }
    }
    let cases = [
        ("qwen_block", [rows, seq], super::QwenVl::rope(&cfg, seq, device), true),
        ("qwen_block_recompute", [rows, seq], super::QwenVl::rope(&cfg, seq, device), false),
        ("qwen_block_packed", [1, total], super::QwenVl::rope_packed(&cfg, &lens, device), true),
    ];
    let mut out = Vec::new();
    for (name, [b, s], rope, keep) in cases {
        let x = Tensor::randn([b, s, d], (Kind::Float, device)).to_kind(kind).set_requires_grad(true);
        let g = Tensor::randn([b, s, d], (Kind::Float, device)).to_kind(kind);
        let mut inputs = vec![&x];
        inputs.extend(params.iter());
        let paths: (&dyn Fn() -> Tensor, &dyn Fn() -> Tensor) =
            (&|| block.forward_autograd(&x, &rope, None), &|| block.forward_explicit_with(&x, &rope, keep));
        out.push(super::layers::compare(name, kind, device, reps, paths, &g, &inputs));
    }
    out
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::{random_block, QwenBlock, Rope};
    use crate::model::layers::rel_err;
    use crate::model::{ModelConfig, QwenVl};

    /// Output and every gradient (input, then the eight parameters) of one forward + backward.
    /// `explicit`: None for autograd, Some(keep) for the explicit block keeping or recomputing its inner
    /// activations.
    fn run(block: &QwenBlock, params: &[Tensor], x: &Tensor, rope: &Rope, g: &Tensor, explicit: Option<bool>) -> Vec<Tensor> {
        for p in params {
            let mut gp = p.grad();
            if gp.defined() {
                let _ = gp.zero_();
            }
        }
        let xin = x.detach().set_requires_grad(true);
        let y = match explicit {
            Some(keep) => block.forward_explicit_with(&xin, rope, keep),
            None => block.forward_autograd(&xin, rope, None),
        };
        (&y * g).sum(Kind::Float).backward();
        let mut out = vec![y.detach(), xin.grad()];
        out.extend(params.iter().map(|p| p.grad().copy()));
        out
    }

    fn compare(cfg: &ModelConfig, b: i64, s: i64, packed: Option<&[usize]>) {
        tch::manual_seed(7);
        let (block, params) = random_block(cfg, Device::Cpu, Kind::Float);
        let rope = match packed {
            Some(lens) => QwenVl::rope_packed(cfg, lens, Device::Cpu),
            None => QwenVl::rope(cfg, s, Device::Cpu),
        };
        let x = Tensor::randn([b, s, cfg.hidden_size], (Kind::Float, Device::Cpu));
        let g = Tensor::randn([b, s, cfg.hidden_size], (Kind::Float, Device::Cpu));
        let reference = run(&block, &params, &x, &rope, &g, None);
        for keep in [true, false] {
            let explicit = run(&block, &params, &x, &rope, &g, Some(keep));
            let names = ["output", "x", "ln_1", "c_attn.weight", "c_attn.bias", "c_proj", "ln_2", "w1", "w2", "mlp.c_proj"];
            for ((name, e), r) in names.iter().zip(&explicit).zip(&reference) {
                let err = rel_err(e, r);
                assert!(
                    err <= 1e-5,
                    "{name}: explicit (keep {keep}) vs autograd relative error {err:e} (b {b}, s {s}, packed {packed:?})"
                );
            }
        }
    }

    /// CPU f32: the explicit block's output and gradients equal autograd's through the reference block,
    /// for padded rows (each row one sample) and for a packed row (three samples, positions restarting).
    #[test]
    fn explicit_block_equals_autograd_on_the_tiny_model() {
        let cfg = ModelConfig::tiny();
        compare(&cfg, 1, 12, Some(&[3, 5, 4]));
        compare(&cfg, 2, 9, None);
    }

    /// The same at Qwen-VL-Chat's full width (hidden 4096, 32 heads, MLP 11008), one block, short rows.
    #[test]
    fn explicit_block_equals_autograd_at_full_width() {
        let cfg = ModelConfig::qwen_vl_chat();
        compare(&cfg, 2, 6, None);
        compare(&cfg, 1, 10, Some(&[4, 6]));
    }
}
