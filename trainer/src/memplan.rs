//! Memory-planned activation recomputation: how many LLM blocks keep their autograd graph (saved
//! activations) through the step instead of being recomputed in the backward.
//!
//! `activation_checkpointing: full` recomputes every block (least memory), `none` keeps every graph
//! (least compute), `auto` (the default) keeps as many as fit: on a GPU the first step runs with full
//! recomputation, the device memory in use after it is measured, and every later micro-batch keeps the
//! last K blocks' graphs where K blocks' saved activations (estimated from the micro-batch's shape, with
//! a margin) fit between that measurement and `memory.limit_gib` (default: the card's memory less 4 GiB).
//! On CPUs `auto` means `full`. A number N keeps the last N blocks' graphs whatever the memory.

use tch::{Device, Kind, Tensor};

use crate::comm::Communicator;
use crate::error::Result;
use crate::model::ModelConfig;
pub use crate::recipe::Checkpointing;

/// Extra margin on the estimate of a block's saved activations (allocator rounding, transients).
const MARGIN: f64 = 1.15;

/// Bytes one LLM block keeps for its backward at micro-batch shape (batch, seq), in the compute dtype of
/// `elt` bytes, plus `block_params` gathered parameters a kept graph holds until its backward
/// ([`crate::zero::Sharded::kept_block_numel`]: ZeRO-3 without reshard after forward; 0 otherwise).
///
/// Through autograd: per RMSNorm its f32 input and its scaled output, the linears' inputs, the QKV
/// projection (kept alive by the V view), rotated Q and K, the attention output and its reshaped copy,
/// and the MLP's two projections, SiLU and product. The explicit block (`explicit`, csrc/block.cpp):
/// rotated Q and K, V, the attention output with its f32 log-sum-exp, the residual stream after
/// attention, the MLP's two projections and the norms' f32 inverse RMS, and unless it recomputes them
/// ([`crate::model::llm::explicit_recomputes`]) the norms' outputs and the SwiGLU product.
pub fn block_activation_bytes(
    cfg: &ModelConfig,
    batch: usize,
    seq: usize,
    elt: usize,
    block_params: usize,
    explicit: bool,
) -> u64 {
    let bs = (batch * seq) as u64;
    let (d, f) = (cfg.hidden_size as u64, cfg.mlp_width() as u64);
    let e = elt as u64;
    let params = block_params as u64 * e;
    if explicit {
        let inner = if crate::model::llm::explicit_recomputes() { 0 } else { bs * (2 * d + f) * e };
        return bs * (5 * d + 2 * f) * e + inner + bs * (cfg.num_attention_heads as u64 + 2) * 4 + params;
    }
    // Two norms: f32 input (4) + scaled output (e) + the linear's input copy (e).
    let norms = 2 * bs * d * (4 + 2 * e);
    // QKV (3), rotated Q and K (2), attention output and its contiguous copy (2).
    let attn = bs * d * 7 * e;
    // w1 and w2 outputs, SiLU, product.
    let mlp = bs * f * 4 * e;
    norms + attn + mlp + params
}

/// How many blocks of each micro-batch to recompute.
#[derive(Clone, Debug)]
pub struct Planner {
    mode: Checkpointing,
    layers: usize,
    cfg: ModelConfig,
    elt: usize,
    block_params: usize,
    limit_bytes: Option<u64>,
    /// `auto` on a GPU: bytes free for kept graphs, known after the first step.
    avail: Option<u64>,
    logged: bool,
    /// Whether the blocks run the explicit formulation (see [`block_activation_bytes`]).
    explicit: bool,
}

impl Planner {
    pub fn new(mode: Checkpointing, cfg: &ModelConfig, elt: usize, block_params: usize, limit_gib: Option<f64>) -> Self {
        Self {
            mode,
            layers: cfg.num_hidden_layers as usize,
            cfg: cfg.clone(),
            elt,
            block_params,
            limit_bytes: limit_gib.map(|g| (g * (1u64 << 30) as f64) as u64),
            avail: None,
            logged: false,
            explicit: false,
        }
    }

    /// Counts the explicit block's saved tensors instead of autograd's (see
    /// [`crate::model::llm::explicit_runs`]).
    pub fn with_explicit_blocks(mut self, explicit: bool) -> Self {
        self.explicit = explicit;
        self
    }

    /// The number of leading blocks to recompute for a micro-batch of this shape (the rest keep their
    /// graphs).
    pub fn recomputed(&self, batch: usize, seq: usize) -> usize {
        match (self.mode, self.avail) {
            (Checkpointing::Full, _) | (Checkpointing::Auto, None) => self.layers,
            (Checkpointing::None, _) => 0,
            (Checkpointing::Keep(n), _) => self.layers - n.min(self.layers),
            (Checkpointing::Auto, Some(avail)) => {
                let per = self.per_block(batch, seq);
                self.layers - ((avail as f64 / per) as usize).min(self.layers)
            }
        }
    }

    fn per_block(&self, batch: usize, seq: usize) -> f64 {
        block_activation_bytes(&self.cfg, batch, seq, self.elt, self.block_params, self.explicit).max(1) as f64 * MARGIN
    }

    /// After a step run with full recomputation: measures the device memory in use (the driver's total
    /// less free, the peak so far) and fixes the budget of kept graphs (`auto` on a GPU only). A
    /// collective: every rank takes the smallest budget of all, so that all ranks recompute the same
    /// blocks (ZeRO-3's gathers must pair up).
    pub fn calibrate(&mut self, comm: &dyn Communicator, device: Device) -> Result<()> {
        if self.mode != Checkpointing::Auto || self.avail.is_some() || !device.is_cuda() {
            return Ok(());
        }
        let used = crate::runtime::cuda_max_memory_allocated().unwrap_or(u64::MAX);
        let total = cudarc::driver::result::mem_get_info().map(|(_, t)| t as u64).unwrap_or(0);
        let limit = self.limit_bytes.unwrap_or(total.saturating_sub(4 << 30));
        let mine = Tensor::from_slice(&[(limit.saturating_sub(used) as f64 / GIB) as f32]).to_device(device);
        let all = Tensor::zeros([comm.world() as i64], (Kind::Float, device));
        comm.all_gather(&mine, &all)?;
        let least = Vec::<f32>::try_from(all.to_device(Device::Cpu)).expect("budgets").into_iter().fold(f32::INFINITY, f32::min);
        self.avail = Some((least.max(0.0) as f64 * GIB) as u64);
        tracing::info!(
            "activation plan: {:.1} GiB in use after a step with full recomputation, limit {:.1} GiB: {:.1} GiB for kept graphs (the least of all ranks)",
            used as f64 / GIB,
            limit as f64 / GIB,
            self.avail.unwrap_or(0) as f64 / GIB
        );
        if used > limit && used != u64::MAX {
            tracing::warn!(
                "memory: {:.1} GiB in use with every block recomputed is over `memory.limit_gib` ({:.1} GiB): no \
                 activations are kept, and the job itself does not fit the limit (more ranks shard the state \
                 further; ZeRO-3 shards the weights too)",
                used as f64 / GIB,
                limit as f64 / GIB
            );
        }
        Ok(())
    }

    /// Logs the plan for a micro-batch shape once (the first step it applies to).
    pub fn log_once(&mut self, batch: usize, seq: usize) {
        if self.logged || self.mode != Checkpointing::Auto || self.avail.is_none() {
            return;
        }
        self.logged = true;
        let r = self.recomputed(batch, seq);
        let keep = self.layers - r;
        let per = self.per_block(batch, seq);
        tracing::info!(
            "activation plan at {batch} x {seq} tokens: {keep} of {} blocks keep their activations ({:.2} GiB each with margin, {:.1} GiB), {r} recomputed",
            self.layers,
            per / GIB,
            keep as f64 * per / GIB
        );
    }
}

const GIB: f64 = (1u64 << 30) as f64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipes_read_bools_and_names() {
        let v: Vec<Checkpointing> = serde_yaml_ng::from_str("[true, false, auto, full, none, 24]").unwrap();
        use Checkpointing::*;
        assert_eq!(v, [Full, None, Auto, Full, None, Keep(24)]);
        assert_eq!(serde_yaml_ng::to_string(&v).unwrap(), "- full\n- none\n- auto\n- full\n- none\n- 24\n");
        assert!(serde_yaml_ng::from_str::<Checkpointing>("some").is_err());
    }

    #[test]
    fn auto_keeps_what_fits() {
        let cfg = ModelConfig::qwen_vl_chat();
        let mut p = Planner::new(Checkpointing::Auto, &cfg, 2, 0, None);
        assert_eq!(p.recomputed(2, 2048), 32, "before calibration: full recomputation");
        let per = block_activation_bytes(&cfg, 2, 2048, 2, 0, false) as f64 * MARGIN;
        p.avail = Some((10.5 * per).ceil() as u64 + 1);
        assert_eq!(p.recomputed(2, 2048), 22);
        assert_eq!(p.recomputed(1, 2048), 11, "half the tokens: twice the blocks kept, 21");
        p.avail = Some(u64::MAX / 2);
        assert_eq!(p.recomputed(2, 2048), 0);
        // W1's block at 2 x 2048 in bf16: about 0.8 GiB.
        let gib = block_activation_bytes(&cfg, 2, 2048, 2, 0, false) as f64 / GIB;
        assert!((0.7..0.9).contains(&gib), "{gib}");
        // The explicit block keeps Q, K, V, the attention output, the residual and the MLP's two
        // projections, 4096 x (5 x 4096 + 2 x 11008) x 2 bytes, and the norms' outputs and the SwiGLU
        // product, 4096 x (2 x 4096 + 11008) x 2: about 0.47 GiB.
        let gib = block_activation_bytes(&cfg, 2, 2048, 2, 0, true) as f64 / GIB;
        assert!((0.45..0.5).contains(&gib), "{gib}");
    }
}
