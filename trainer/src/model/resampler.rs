//! The resampler (`attn_pool`, SPEC §1.3) and IDA-VLM's ID-Former (`attn_pool.attn1`, SPEC §1.5).

use tch::Tensor;

use super::fused::upload;
use super::layers::{resize_pos_table, LayerNorm, Linear, Mha};
use idavlm_shards::chat::ImageRole;

#[derive(Debug)]
pub struct Resampler {
    pub query: Tensor,
    pub pos_embed: Tensor,
    pub kv_proj: Linear,
    pub ln_q: LayerNorm,
    pub ln_kv: LayerNorm,
    pub attn: Mha,
    pub attn1: Option<Mha>,
}

impl Resampler {
    /// The shared cross-attention of 256 queries over keys `h + pos_k` and values `h`: (N, P, D) -> (N, 256, D).
    fn pool(&self, h: &Tensor, pos_k: &Tensor) -> Tensor {
        let n = h.size()[0];
        let q = (self.ln_q.forward(&self.query) + &self.pos_embed).unsqueeze(0).expand([n, -1, -1], false);
        self.attn.forward(&q, &(h + pos_k), h)
    }

    /// ViT features (N, P, W) -> visual tokens (N, 256, D). `rows[n]` is image n's sample (its row, or its
    /// place in a packed row) and
    /// `roles[n]` its role; test images go through the ID-Former when the module is present.
    pub fn forward(&self, feats: &Tensor, rows: &[usize], roles: &[ImageRole]) -> Tensor {
        let n = feats.size()[0];
        assert_eq!(rows.len() as i64, n);
        assert_eq!(roles.len() as i64, n);
        let x = self.ln_kv.forward(&self.kv_proj.forward(feats));
        let pos_k = resize_pos_table(&self.pos_embed, x.size()[1]);
        let Some(attn1) = &self.attn1 else { return self.pool(&x, &pos_k) };
        let test: Vec<i64> = (0..n).filter(|&i| roles[i as usize] == ImageRole::Test).collect();
        if test.is_empty() {
            return self.pool(&x, &pos_k);
        }
        let dev = feats.device();
        let plain: Vec<i64> = (0..n).filter(|&i| roles[i as usize] != ImageRole::Test).collect();
        let plain_idx = upload(&Tensor::from_slice(&plain), dev);
        let plain_out = self.pool(&x.index_select(0, &plain_idx), &pos_k);
        // Position of each image inside plain_out.
        let slot = |i: i64| plain.iter().position(|&p| p == i);
        let mut test_outs = Vec::new();
        let mut test_order = Vec::new();
        let mut row_ids: Vec<usize> = test.iter().map(|&i| rows[i as usize]).collect();
        row_ids.dedup();
        for row in row_ids {
            let refs: Vec<i64> = (0..n)
                .filter(|&i| rows[i as usize] == row && roles[i as usize] == ImageRole::Reference)
                .map(|i| slot(i).expect("a reference is a plain image") as i64)
                .collect();
            let tests: Vec<i64> = test.iter().copied().filter(|&i| rows[i as usize] == row).collect();
            let (r, t) = (refs.len() as i64, tests.len() as i64);
            // M: stop-gradient of the row's reference outputs, (T, R*256, D).
            let mem = plain_out.index_select(0, &upload(&Tensor::from_slice(&refs), dev)).detach();
            let d = mem.size()[2];
            let mem = mem.reshape([1, r * mem.size()[1], d]).expand([t, -1, -1], false);
            let xt = x.index_select(0, &upload(&Tensor::from_slice(&tests), dev));
            let h = attn1.forward(&(&xt + &pos_k), &mem, &mem) + &xt;
            test_outs.push(self.pool(&h, &pos_k));
            test_order.extend(tests);
        }
        // Reassemble in image order.
        let mut parts = vec![plain_out];
        parts.extend(test_outs);
        let all = Tensor::cat(&parts, 0);
        let order: Vec<i64> = plain.iter().chain(test_order.iter()).copied().collect();
        let mut inverse = vec![0i64; n as usize];
        for (pos, &img) in order.iter().enumerate() {
            inverse[img as usize] = pos as i64;
        }
        all.index_select(0, &upload(&Tensor::from_slice(&inverse), dev))
    }
}
