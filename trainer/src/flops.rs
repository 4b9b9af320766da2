//! Model FLOPs of a micro-batch by the formula of PERF.md, generalised to any config (recomputation not
//! counted): LLM forward + backward, frozen ViT forward only, resampler forward + backward (doubled as an
//! upper bound when the ID-Former runs).

use crate::model::ModelConfig;

/// Dense bf16 peak of an H100 SXM, the MFU denominator of PERF.md.
pub const H100_PEAK_BF16: f64 = 989e12;

pub fn micro_batch_flops(cfg: &ModelConfig, batch: usize, seq: usize, images: usize) -> f64 {
    rows_flops(cfg, batch as f64 * seq as f64, batch as f64 * (seq as f64).powi(2), images)
}

/// A packed row of samples of lengths `lens`: attention only within each sample.
pub fn packed_flops(cfg: &ModelConfig, lens: &[usize], images: usize) -> f64 {
    let tokens: usize = lens.iter().sum();
    rows_flops(cfg, tokens as f64, lens.iter().map(|&l| (l as f64).powi(2)).sum(), images)
}

/// `tokens` LLM tokens whose attention spans `pairs` (query, key) pairs counted as in PERF.md (B x S^2
/// for padded rows).
fn rows_flops(cfg: &ModelConfig, tokens: f64, pairs: f64, images: usize) -> f64 {
    let i = images as f64;
    let d = cfg.hidden_size as f64;
    let l = cfg.num_hidden_layers as f64;
    let ff = cfg.mlp_width() as f64;
    let v = cfg.vocab_size as f64;
    let llm_mat = l * (d * 3.0 * d + d * d + 3.0 * d * ff) + d * v;
    let llm = 6.0 * llm_mat * tokens + 12.0 * l * d * pairs;
    let vd = cfg.visual.width as f64;
    let vff = cfg.vit_mlp_width() as f64;
    let vl = cfg.visual.layers as f64;
    let p = cfg.num_patches() as f64;
    let ps = cfg.visual.patch_size as f64;
    let vit_mat = vl * (vd * 3.0 * vd + vd * vd + 2.0 * vd * vff) + 3.0 * ps * ps * vd;
    let vit = i * (2.0 * vit_mat * p + vl * 4.0 * p * p * vd);
    let q = cfg.visual.n_queries as f64;
    let mut res = i * (6.0 * (vd * d + 2.0 * d * d) * p + 6.0 * 2.0 * d * d * q + 12.0 * q * p * d);
    if cfg.id_former {
        res *= 2.0;
    }
    llm + vit + res
}

/// Peak dense bf16 FLOP/s of a CUDA device by name, where known.
pub fn device_peak(name: &str) -> Option<f64> {
    let n = name.to_ascii_uppercase();
    if n.contains("H100") || n.contains("H200") {
        Some(H100_PEAK_BF16)
    } else if n.contains("A100") {
        Some(312e12)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Same number as `step_flops` of ../shared/bench/fsdp2_qwenvl.py for W1 (2 x 2048 tokens, 8 images).
    #[test]
    fn w1_matches_the_peer_formula() {
        let mut cfg = ModelConfig::qwen_vl_chat();
        cfg.id_former = true;
        let d = 4096f64;
        let ff = 11008f64;
        let llm_mat = 32.0 * (d * 3.0 * d + d * d + 3.0 * d * ff) + d * 151936.0;
        let llm = 6.0 * llm_mat * 2.0 * 2048.0 + 12.0 * 32.0 * d * 2048.0 * 2.0 * 2048.0;
        let (vd, vff) = (1664f64, 8192f64);
        let vit_mat = 48.0 * (vd * 3.0 * vd + vd * vd + 2.0 * vd * vff) + 3.0 * 14.0 * 14.0 * vd;
        let vit = 8.0 * (2.0 * vit_mat * 1024.0 + 48.0 * 4.0 * 1024.0 * 1024.0 * vd);
        let res = 2.0 * 8.0 * (6.0 * (vd * d + 2.0 * d * d) * 1024.0 + 6.0 * 2.0 * d * d * 256.0 + 12.0 * 256.0 * 1024.0 * d);
        let want = llm + vit + res;
        assert!((micro_batch_flops(&cfg, 2, 2048, 8) - want).abs() / want < 1e-12);
    }
}
