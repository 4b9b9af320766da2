//! The Qwen3 dense decoder of Qwen3-VL (SPEC-QWEN3VL.md §3.1-3.2): pre-norm blocks with GQA, per-head
//! q/k RMSNorm before the rotary embedding, no biases, SwiGLU; interleaved M-RoPE over three position
//! rows.

use tch::{Device, Kind, Tensor};

use super::config::TextConfig;
use crate::model::attention::{self, Segments};
use crate::model::layers::{Linear, RmsNorm};

/// The rotary tables of a micro-batch: cos and sin (B, S, head_dim) in the activation dtype, and the
/// samples of a packed row (attention confined to each).
pub struct MRope {
    pub cos: Tensor,
    pub sin: Tensor,
    pub segments: Option<Segments>,
}

/// Which position row (0 t, 1 h, 2 w) drives rotary frequency j: the interleaved layout
/// `THW THW … TTTT` of `mrope_section` [T, H, W] (transformers' `recomposition_frequencies`).
pub fn frequency_rows(section: [i64; 3]) -> Vec<i64> {
    let n = section.iter().sum::<i64>();
    (0..n)
        .map(|j| {
            if j % 3 == 1 && j < 3 * section[1] {
                1
            } else if j % 3 == 2 && j < 3 * section[2] {
                2
            } else {
                0
            }
        })
        .collect()
}

impl MRope {
    /// Tables for `positions` (3, B, S) int64: freq j of token (b, s) is positions[row_j, b, s] · inv_freq[j]
    /// in f32 (inv_freq = 1 / θ^(2j/head_dim)), duplicated to head_dim, cos and sin cast to `kind`.
    pub fn new(cfg: &TextConfig, positions: &Tensor, kind: Kind, segments: Option<Segments>) -> Self {
        let dev = positions.device();
        let hd = cfg.head_dim;
        let exps = Tensor::arange_start_step(0, hd, 2, (Kind::Float, dev)) / hd as f64;
        let inv = Tensor::full([1], cfg.rope_theta, (Kind::Float, dev)).pow(&exps).reciprocal();
        let rows = crate::model::fused::upload(&Tensor::from_slice(&frequency_rows(cfg.mrope_section)), dev);
        // (hd/2, B, S) -> (B, S, hd/2): each frequency's own row of positions.
        let pos = positions.to_kind(Kind::Float).index_select(0, &rows).permute([1, 2, 0]);
        let freqs = pos * inv;
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        Self { cos: emb.cos().to_kind(kind), sin: emb.sin().to_kind(kind), segments }
    }
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size().last().copied().expect("rotate a tensor") / 2;
    let d = x.dim() as i64 - 1;
    Tensor::cat(&[&x.narrow(d, half, half).neg(), &x.narrow(d, 0, half)], d)
}

/// x (B, H, S, hd) rotated by tables (B, S, hd), in x's dtype (transformers' `apply_rotary_pos_emb`).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let (c, s) = (cos.unsqueeze(1), sin.unsqueeze(1));
    x * c + rotate_half(x) * s
}

#[derive(Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: RmsNorm,
    pub k_norm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    pub heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
}

impl DecoderLayer {
    /// x (B, S, H) -> (B, S, H).
    pub fn forward(&self, x: &Tensor, rope: &MRope) -> Tensor {
        let h = self.input_layernorm.forward(x);
        let x = x + self.o_proj.forward(&self.attention(&h, rope));
        let y = self.post_attention_layernorm.forward(&x);
        let mlp = self.down_proj.forward(&(self.gate_proj.forward(&y).silu() * self.up_proj.forward(&y)));
        x + mlp
    }

    /// Causal GQA attention of the normed input h (B, S, H) -> (B, S, nh·hd), before o_proj.
    fn attention(&self, h: &Tensor, rope: &MRope) -> Tensor {
        let (b, s, _) = h.size3().expect("(B, S, H)");
        let hd = self.head_dim;
        let q = self.q_norm.forward(&self.q_proj.forward(h).view([b, s, self.heads, hd])).transpose(1, 2);
        let k = self.k_norm.forward(&self.k_proj.forward(h).view([b, s, self.kv_heads, hd])).transpose(1, 2);
        let v = self.v_proj.forward(h).view([b, s, self.kv_heads, hd]).transpose(1, 2);
        let q = apply_rope(&q, &rope.cos, &rope.sin);
        let k = apply_rope(&k, &rope.cos, &rope.sin);
        let rep = self.heads / self.kv_heads;
        let a = match &rope.segments {
            Some(seg) => {
                // Packed row: each sample attends to itself; keys and values repeated per query group.
                let (k, v) = (k.repeat_interleave_self_int(rep, 1, None), v.repeat_interleave_self_int(rep, 1, None));
                let t = |x: &Tensor| x.transpose(1, 2);
                attention::packed(&t(&q), &t(&k), &t(&v), seg).transpose(1, 2)
            }
            None => Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, true, None, rep > 1),
        };
        a.transpose(1, 2).reshape([b, s, self.heads * hd])
    }
}

/// Positions 0..s on every row of every one of the three rows: text without images.
pub fn text_positions(b: i64, s: i64, device: Device) -> Tensor {
    Tensor::arange(s, (Kind::Int64, device)).view([1, 1, s]).expand([3, b, s], false).contiguous()
}
