//! ViT-bigG/14 (SPEC §1.2): patch conv without bias, the 16x16 position table resized bicubically to the
//! patch grid, ln_pre, pre-norm blocks with per-head interleaved in_proj and exact GELU. Frozen in
//! fine-tuning: callers run it under `no_grad`.

use tch::Tensor;

use super::layers::{resize_pos_table, LayerNorm, Linear};

#[derive(Debug)]
pub struct VitBlock {
    pub ln_1: LayerNorm,
    pub ln_2: LayerNorm,
    pub in_proj: Linear,
    pub out_proj: Linear,
    pub c_fc: Linear,
    pub c_proj: Linear,
    pub heads: i64,
}

impl VitBlock {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (n, l, d) = x.size3().expect("(N, L, D)");
        let hd = d / self.heads;
        // in_proj output per head is [q_h | k_h | v_h]: view (N, L, H, 3*hd) and split the last axis.
        let qkv = self.in_proj.forward(&self.ln_1.forward(x)).view([n, l, self.heads, 3 * hd]);
        let p = qkv.split(hd, -1);
        let (q, k, v) = (p[0].transpose(1, 2), p[1].transpose(1, 2), p[2].transpose(1, 2));
        let a = Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, false, None, false);
        let x = x + self.out_proj.forward(&a.transpose(1, 2).reshape([n, l, d]));
        x.shallow_clone() + self.c_proj.forward(&self.c_fc.forward(&self.ln_2.forward(&x)).gelu("none"))
    }
}

#[derive(Debug)]
pub struct VisionTower {
    pub conv1: Tensor,
    pub positional_embedding: Tensor,
    pub ln_pre: LayerNorm,
    pub blocks: Vec<VitBlock>,
    pub patch: i64,
}

impl VisionTower {
    /// pixels (N, 3, H, W) in the model dtype -> patch features (N, (H/p)*(W/p), width).
    pub fn forward(&self, pixels: &Tensor) -> Tensor {
        let x = pixels.conv2d::<Tensor>(&self.conv1, None, [self.patch, self.patch], [0, 0], [1, 1], 1);
        let (n, c, gh, gw) = x.size4().expect("conv output (N, C, H, W)");
        let x = x.reshape([n, c, gh * gw]).permute([0, 2, 1]);
        let x = x + resize_pos_table(&self.positional_embedding, gh * gw);
        let mut x = self.ln_pre.forward(&x);
        for b in &self.blocks {
            x = b.forward(&x);
        }
        x
    }
}
