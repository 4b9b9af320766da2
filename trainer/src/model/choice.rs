//! Which formulation the model's GPU paths run: the recipe's `kernels:` section (recorded in the
//! resolved recipe of every run), or the bench's flags. Each switch turned off runs the libtorch
//! formulation its fast path is tested against; all on is the default. Process-wide: a worker applies
//! its recipe's choice once, before the model runs.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

/// `kernels:` in recipes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kernels {
    /// The NVRTC kernels (RoPE, SwiGLU, cross-entropy, AdamW, gradient casts and adds) where libnvrtc
    /// is found; false: libtorch's ops.
    #[serde(default = "yes")]
    pub fused: bool,
    /// The LLM block with its written-out backward (csrc/block.cpp) on CUDA in bf16; false: the
    /// autograd block.
    #[serde(default = "yes")]
    pub explicit_block: bool,
    /// The explicit block recomputes its norms' outputs and SwiGLU product in the backward instead of
    /// keeping them (0.32 instead of 0.47 GiB per kept block at W1's shape).
    #[serde(default)]
    pub block_recompute: bool,
    /// The resampler's and ID-Former's attention on GPUs: `flash` (no per-shape plan) or `sdpa`
    /// (libtorch's choice: cuDNN on Hopper, which builds a plan for every new shape).
    #[serde(default)]
    pub mha_attention: MhaAttention,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum MhaAttention {
    #[default]
    Flash,
    Sdpa,
}

fn yes() -> bool {
    true
}

impl Default for Kernels {
    fn default() -> Self {
        Self { fused: true, explicit_block: true, block_recompute: false, mha_attention: MhaAttention::Flash }
    }
}

static FUSED: AtomicBool = AtomicBool::new(true);
static EXPLICIT: AtomicBool = AtomicBool::new(true);
static RECOMPUTE: AtomicBool = AtomicBool::new(false);
static MHA_FLASH: AtomicBool = AtomicBool::new(true);

/// Makes `k` the process's choice.
pub fn apply(k: &Kernels) {
    FUSED.store(k.fused, Ordering::Relaxed);
    EXPLICIT.store(k.explicit_block, Ordering::Relaxed);
    RECOMPUTE.store(k.block_recompute, Ordering::Relaxed);
    MHA_FLASH.store(k.mha_attention == MhaAttention::Flash, Ordering::Relaxed);
}

/// The process's choice.
pub fn current() -> Kernels {
    Kernels {
        fused: FUSED.load(Ordering::Relaxed),
        explicit_block: EXPLICIT.load(Ordering::Relaxed),
        block_recompute: RECOMPUTE.load(Ordering::Relaxed),
        mha_attention: if MHA_FLASH.load(Ordering::Relaxed) { MhaAttention::Flash } else { MhaAttention::Sdpa },
    }
}
