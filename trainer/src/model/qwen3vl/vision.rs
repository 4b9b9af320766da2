//! Qwen3-VL's vision tower (SPEC-QWEN3VL.md §2): a linear patch embedding (the Conv3d with
//! kernel = stride), the learned 48x48 position table resampled bilinearly (align_corners) to each
//! image's grid, 2-D rotary embedding in f32, pre-norm blocks with attention confined to each image,
//! the 2x2 patch merger and the DeepStack mergers on the outputs of chosen blocks.

use tch::{Device, Kind, Tensor};

use super::config::Qwen3VlConfig;
use crate::model::fused::upload;
use crate::model::layers::{LayerNorm, Linear};
use idavlm_shards::qwen3vl::positions::Grid;

#[derive(Debug)]
pub struct VisionBlock {
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
    pub qkv: Linear,
    pub proj: Linear,
    pub fc1: Linear,
    pub fc2: Linear,
    pub heads: i64,
}

/// LayerNorm, fc1, exact GELU, fc2 over 2x2 blocks of patches; the main merger normalises each patch
/// before grouping, DeepStack's after (`use_postshuffle_norm`).
#[derive(Debug)]
pub struct Merger {
    pub norm: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    pub postshuffle: bool,
    pub width: i64,
}

impl Merger {
    /// (N patches, d_v) in merge-block order -> (N/4, H).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let x = if self.postshuffle {
            self.norm.forward(&x.reshape([-1, self.width]))
        } else {
            self.norm.forward(x).reshape([-1, self.width])
        };
        self.fc2.forward(&self.fc1.forward(&x).gelu("none"))
    }
}

/// What the tower needs of a set of images besides pixels, made on the host once per micro-batch
/// (a function of the grids alone): the position table's taps and weights, the rotary tables, and
/// each image's patch count (its attention segment).
pub struct Layout {
    /// (N, 4) int64 rows of the position table.
    pub taps: Tensor,
    /// (N, 4) f32 bilinear weights.
    pub weights: Tensor,
    /// (N, head_dim) f32.
    pub cos: Tensor,
    pub sin: Tensor,
    pub segments: Vec<i64>,
}

/// Bilinear taps of target index i on an axis of `size` into `side` rows, align_corners: the source
/// coordinate i·(side−1)/max(size−1, 1) in f32, as transformers' `_interpolation_axis_taps_weights`.
fn axis_taps(i: i64, size: i64, side: i64) -> ([i64; 2], [f32; 2]) {
    let src = i as f32 * (side - 1) as f32 / (size - 1).max(1) as f32;
    let f = src.floor();
    let taps = [(f as i64).clamp(0, side - 1), (f as i64 + 1).clamp(0, side - 1)];
    let w = [(1.0 - (src - f).abs()).max(0.0), (1.0 - (src - f - 1.0).abs()).max(0.0)];
    (taps, w)
}

impl Layout {
    pub fn new(cfg: &Qwen3VlConfig, grids: &[Grid], device: Device) -> Self {
        let side = cfg.grid_side();
        let m = cfg.vision.spatial_merge_size;
        let hd = cfg.vit_head_dim();
        let (mut taps, mut weights, mut hpos, mut wpos, mut segments) = (vec![], vec![], vec![], vec![], vec![]);
        for g in grids {
            let mut frame = Vec::with_capacity((g.h * g.w) as usize);
            for br in 0..g.h / m {
                for bc in 0..g.w / m {
                    for ir in 0..m {
                        for ic in 0..m {
                            frame.push((br * m + ir, bc * m + ic));
                        }
                    }
                }
            }
            for _ in 0..g.t {
                for &(r, c) in &frame {
                    let (rt, rw) = axis_taps(r, g.h, side);
                    let (ct, cw) = axis_taps(c, g.w, side);
                    for a in 0..2 {
                        for b in 0..2 {
                            taps.push(rt[a] * side + ct[b]);
                            weights.push(rw[a] * cw[b]);
                        }
                    }
                    hpos.push(r as f32);
                    wpos.push(c as f32);
                }
                segments.push(g.h * g.w);
            }
        }
        let n = hpos.len() as i64;
        // 2-D rotary: inv_freq over head_dim/2, [h·f | w·f] duplicated.
        let dim = hd / 2;
        let exps = Tensor::arange_start_step(0, dim, 2, (Kind::Float, Device::Cpu)) / dim as f64;
        let inv = Tensor::full([1], 10_000.0, (Kind::Float, Device::Cpu)).pow(&exps).reciprocal();
        let fh = Tensor::from_slice(&hpos).unsqueeze(1) * &inv;
        let fw = Tensor::from_slice(&wpos).unsqueeze(1) * &inv;
        let hw = Tensor::cat(&[fh, fw], 1);
        let emb = Tensor::cat(&[&hw, &hw], 1);
        Self {
            taps: upload(&Tensor::from_slice(&taps).view([n, 4]), device),
            weights: upload(&Tensor::from_slice(&weights).view([n, 4]), device),
            cos: upload(&emb.cos(), device),
            sin: upload(&emb.sin(), device),
            segments,
        }
    }
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[2] / 2;
    Tensor::cat(&[&x.narrow(2, half, half).neg(), &x.narrow(2, 0, half)], 2)
}

impl VisionBlock {
    pub fn forward(&self, x: &Tensor, layout: &Layout) -> Tensor {
        let n = x.size()[0];
        let d = x.size()[1];
        let hd = d / self.heads;
        let qkv = self.qkv.forward(&self.norm1.forward(x)).view([n, 3, self.heads, hd]);
        let (c, s) = (layout.cos.unsqueeze(1), layout.sin.unsqueeze(1));
        let rot = |t: Tensor| {
            let f = t.to_kind(Kind::Float);
            (&f * &c + rotate_half(&f) * &s).to_kind(t.kind())
        };
        let q = rot(qkv.select(1, 0));
        let k = rot(qkv.select(1, 1));
        let v = qkv.select(1, 2);
        // Attention within each image: (heads, len, hd) per segment.
        let mut outs = Vec::with_capacity(layout.segments.len());
        let mut at = 0;
        for &len in &layout.segments {
            let part = |t: &Tensor| t.narrow(0, at, len).transpose(0, 1).unsqueeze(0);
            let a = Tensor::scaled_dot_product_attention::<Tensor>(&part(&q), &part(&k), &part(&v), None, 0.0, false, None, false);
            outs.push(a.squeeze_dim(0).transpose(0, 1));
            at += len;
        }
        let a = Tensor::cat(&outs, 0).reshape([n, d]);
        let x = x + self.proj.forward(&a);
        let y = self.fc2.forward(&self.fc1.forward(&self.norm2.forward(&x)).gelu("tanh"));
        x + y
    }
}

pub struct VisionTower {
    /// The Conv3d's weight as (d_v, C·T·p·p) and its bias.
    pub patch_weight: Tensor,
    pub patch_bias: Tensor,
    pub pos_embed: Tensor,
    pub blocks: Vec<VisionBlock>,
    pub merger: Merger,
    pub deepstack: Vec<Merger>,
    pub deepstack_indexes: Vec<i64>,
}

/// The tower's outputs: the main merger's tokens and one DeepStack feature per merger, each (T, H)
/// with T = Σ t·h·w/4 in image order.
pub struct VisionOut {
    pub tokens: Tensor,
    pub deepstack: Vec<Tensor>,
}

impl VisionTower {
    /// The frozen part: patch embedding, positions and the blocks; returns the last block's output and
    /// the outputs of the DeepStack blocks in block order, each with its merger's index.
    pub fn encode(&self, pixels: &Tensor, layout: &Layout) -> (Tensor, Vec<(usize, Tensor)>) {
        let mut x = pixels.to_kind(self.patch_weight.kind()).linear(&self.patch_weight, Some(&self.patch_bias));
        let n = x.size()[0];
        let d = self.pos_embed.size()[1];
        let pos = (self.pos_embed.index_select(0, &layout.taps.view([-1])).view([n, 4, d]) * layout.weights.unsqueeze(-1))
            .sum_dim_intlist(1, false, None);
        let kind = x.kind();
        x = x + pos.to_kind(kind);
        let mut taps = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            x = b.forward(&x, layout);
            if let Some(j) = self.deepstack_indexes.iter().position(|&k| k == i as i64) {
                taps.push((j, x.shallow_clone()));
            }
        }
        (x, taps)
    }

    /// The trained part: the mergers over the frozen features.
    pub fn merge(&self, last: &Tensor, taps: &[(usize, Tensor)]) -> VisionOut {
        VisionOut {
            tokens: self.merger.forward(last),
            deepstack: taps.iter().map(|(j, t)| self.deepstack[*j].forward(t)).collect(),
        }
    }

    pub fn forward(&self, pixels: &Tensor, layout: &Layout) -> VisionOut {
        let (last, taps) = self.encode(pixels, layout);
        self.merge(&last, &taps)
    }
}
