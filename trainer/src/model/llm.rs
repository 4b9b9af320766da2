//! Qwen-7B decoder block (SPEC §1.1): pre-norm, contiguous [Q|K|V] with bias, rotate-half RoPE in f32,
//! causal attention scaled by 1/sqrt(head_dim), MLP `c_proj(w1(x) * silu(w2(x)))`.

use tch::{Kind, Tensor};

use super::attention::{self, Segments};
use super::layers::{apply_rope, Linear, RmsNorm};

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

impl QwenBlock {
    /// x (B, S, D) -> (B, S, D). With a cache, x holds only the new positions, which attend to the
    /// cached ones and causally among themselves; the cache is extended in place.
    pub fn forward(&self, x: &Tensor, rope: &Rope, cache: Option<&mut Option<KvCache>>) -> Tensor {
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
