//! Recipes: the YAML of a training stage, typed (serde), with `extends:` and `--set key.path=value`.
//!
//! Errors name the key path and the file and line that set it (from the YAML parser's positions; the
//! `--set` argument when one did): an unknown key, a wrong type, a missing field and a bad value all
//! fail before any work starts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;

use crate::error::{Error, Result};

pub mod keys;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Another recipe this one overrides (path relative to this file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extends: Option<String>,
    pub model: ModelSection,
    #[serde(default)]
    pub trainable: TrainableSection,
    pub data: DataSection,
    pub optimizer: OptimizerSection,
    #[serde(default)]
    pub schedule: ScheduleSection,
    pub batch: BatchSection,
    /// `auto` (keep as many blocks' activations as fit, recompute the rest; full recomputation on
    /// CPUs), `full` or `none`; `true` / `false` read as `full` / `none`.
    #[serde(default)]
    pub activation_checkpointing: Checkpointing,
    #[serde(default)]
    pub memory: MemorySection,
    #[serde(default)]
    pub zero: ZeroSection,
    pub checkpoint: CheckpointSection,
    #[serde(default)]
    pub logging: LoggingSection,
    #[serde(default)]
    pub seed: u64,
    pub length: LengthSection,
    /// Stop after this many optimizer steps in a row with a non-finite loss or gradient norm.
    #[serde(default = "default_nonfinite")]
    pub max_nonfinite_in_row: u32,
    #[serde(default)]
    pub comm: CommSection,
    /// LoRA adapters instead of full fine-tuning (the `trainable` section then does not apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSection>,
    /// Evaluation during training: held-out loss and MM-ID scoring every N steps and at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalSection>,
    /// Which formulation the GPU paths run (all fast paths by default; each off runs the libtorch
    /// formulation it is tested against).
    #[serde(default)]
    pub kernels: crate::model::choice::Kernels,
}

/// `eval:` in recipes. Every rank takes a share of the work; the results are logged with the step
/// (`eval/loss`, `eval/matching`, `eval/location_acc`, `eval/location_iou`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Evaluate after every this many optimizer steps (0: only at the end).
    #[serde(default)]
    pub every_steps: u64,
    /// Also after the last step.
    #[serde(default = "yes")]
    pub at_end: bool,
    /// A held-out Parquet dataset in the training format: `eval/loss` is the mean over its supervised
    /// tokens (the first `max_samples` rows in storage order).
    #[serde(default)]
    pub data: Option<PathBuf>,
    #[serde(default)]
    pub max_samples: Option<usize>,
    /// An MM-ID-format benchmark (JSON file or Parquet eval folder): its matching and location items
    /// are answered greedily and scored as `idavlm-infer` does (the first `mmid_limit` of them).
    #[serde(default)]
    pub mmid: Option<PathBuf>,
    #[serde(default)]
    pub mmid_limit: Option<usize>,
    #[serde(default = "default_eval_new_tokens")]
    pub max_new_tokens: usize,
    /// Samples per forward (loss) and prompts per generation batch, per rank.
    #[serde(default = "default_eval_batch")]
    pub batch: usize,
    /// An LLM judge (any OpenAI-compatible endpoint) for `mmid`'s QA and caption items: they are
    /// answered and judged every `judge_every` evaluations (`eval/qa`, `eval/caption`). Off without
    /// it: every verdict is a paid request (each is cached, by default in `checkpoint.dir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<idavlm_shards::mmid::judge::JudgeConfig>,
    /// Judge at every this many evaluations (1: every evaluation; the final one always).
    #[serde(default = "default_judge_every")]
    pub judge_every: u64,
    /// Only the first N QA and caption items are answered and judged.
    #[serde(default)]
    pub judge_limit: Option<usize>,
    /// The answer length of QA and caption items.
    #[serde(default = "default_judge_new_tokens")]
    pub judge_max_new_tokens: usize,
}

fn default_eval_new_tokens() -> usize {
    32
}
fn default_judge_every() -> u64 {
    1
}
fn default_judge_new_tokens() -> usize {
    256
}
fn default_eval_batch() -> usize {
    8
}

/// `activation_checkpointing` in recipes (see [`crate::memplan`]): `auto`, `full`, `none` or a number of blocks to keep (`true`
/// and `false` are read as `full` and `none`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Checkpointing {
    #[default]
    Auto,
    Full,
    None,
    /// Keep the last N blocks' graphs, recompute the others.
    Keep(usize),
}

impl Serialize for Checkpointing {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::Auto => s.serialize_str("auto"),
            Self::Full => s.serialize_str("full"),
            Self::None => s.serialize_str("none"),
            Self::Keep(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for Checkpointing {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Keep(u64),
            Name(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(Self::Full),
            Raw::Bool(false) => Ok(Self::None),
            Raw::Keep(n) => Ok(Self::Keep(n as usize)),
            Raw::Name(n) => n.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl std::str::FromStr for Checkpointing {
    type Err = String;
    /// `auto`, `full`, `none` or a number of blocks to keep (the command line's form).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "full" => Ok(Self::Full),
            "none" => Ok(Self::None),
            o => o.parse().map(Self::Keep).map_err(|_| format!("{o:?} is not auto, full, none or a number of blocks to keep")),
        }
    }
}

/// Device memory the run may plan with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MemorySection {
    /// GiB of device memory per GPU that `activation_checkpointing: auto` plans up to (default: the
    /// card's memory less 4 GiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_gib: Option<f64>,
}

/// LoRA fine-tuning, with the original Qwen-VL `finetune_lora_ds.sh` defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    #[serde(default = "default_lora_r")]
    pub r: usize,
    #[serde(default = "default_lora_alpha")]
    pub alpha: f64,
    #[serde(default = "default_lora_dropout")]
    pub dropout: f64,
    /// Module names as PEFT's `target_modules` list (a name or its dotted tail): LLM block linears.
    #[serde(default = "default_lora_targets")]
    pub targets: Vec<String>,
    /// Modules trained in full beside the adapters (`attn_pool` for the resampler and ID-Former).
    #[serde(default = "default_modules_to_save")]
    pub modules_to_save: Vec<String>,
}

fn default_lora_r() -> usize {
    64
}
fn default_lora_alpha() -> f64 {
    16.0
}
fn default_lora_dropout() -> f64 {
    0.05
}
fn default_lora_targets() -> Vec<String> {
    ["c_attn", "attn.c_proj", "w1", "w2"].map(String::from).to_vec()
}
fn default_modules_to_save() -> Vec<String> {
    ["wte", "lm_head"].map(String::from).to_vec()
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            r: default_lora_r(),
            alpha: default_lora_alpha(),
            dropout: default_lora_dropout(),
            targets: default_lora_targets(),
            modules_to_save: default_modules_to_save(),
        }
    }
}

impl LoraSection {
    pub fn spec(&self) -> crate::model::lora::LoraSpec {
        crate::model::lora::LoraSpec {
            r: self.r as i64,
            alpha: self.alpha,
            dropout: self.dropout,
            targets: self.targets.clone(),
            modules_to_save: self.modules_to_save.clone(),
        }
    }
}

fn yes() -> bool {
    true
}

fn default_nonfinite() -> u32 {
    5
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// `tiny` or `qwen-vl-chat`; or give `config` (a HF config.json).
    #[serde(default)]
    pub preset: Option<String>,
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// HF checkpoint (folder or .safetensors) or an idavlm checkpoint folder (its `model/` is used).
    #[serde(default)]
    pub init: Option<PathBuf>,
    #[serde(default)]
    pub id_former: bool,
    #[serde(default)]
    pub dtype: Dtype,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Dtype {
    /// bf16 on GPUs, f32 on CPUs.
    #[default]
    Auto,
    Bf16,
    F32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainableSection {
    /// Glob patterns (`*` matches any run of characters) of parameter names to train.
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
}

impl Default for TrainableSection {
    /// SPEC §4: the LLM and the resampler (and the ID-Former when present); ViT, ln_post and proj frozen.
    fn default() -> Self {
        Self {
            include: vec![
                "transformer.wte.*".into(),
                "transformer.h.*".into(),
                "transformer.ln_f.*".into(),
                "lm_head.*".into(),
                "transformer.visual.attn_pool.*".into(),
            ],
            exclude: vec![],
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    pub name: String,
    pub path: PathBuf,
    /// Samples drawn from this source per epoch (default: its size).
    #[serde(default)]
    pub count: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub sources: Vec<SourceSection>,
    /// General data injected after ID micro-batches (SPEC §3).
    #[serde(default)]
    pub general: Option<SourceSection>,
    #[serde(default)]
    pub inject_probability: f64,
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    #[serde(default = "default_bad_image")]
    pub bad_image: idavlm_shards::reader::BadImagePolicy,
    /// Image decode threads per rank.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Optimizer steps of data loaded ahead.
    #[serde(default = "default_prefetch")]
    pub prefetch_steps: usize,
    /// The resize's pass order: `pillow13` (default, the pinned Pillow) or `pillow12` (Pillow <= 12.2,
    /// to reproduce data preprocessed with an older Pillow, as the original Qwen-VL code was).
    #[serde(default)]
    pub resize: idavlm_shards::preprocess::ResizeOrder,
    /// Check each shard's sha256 against its index.json when the reader first reads it (off only for
    /// trusted storage).
    #[serde(default = "yes")]
    pub verify_checksums: bool,
    /// With `batch.packing`: samples packed together (best fit, longest first) before the next ones
    /// are looked at. Larger packs tighter; every rank reads and tokenises each window's samples.
    #[serde(default = "default_pack_window")]
    pub pack_window: usize,
}

fn default_pack_window() -> usize {
    512
}
fn default_max_len() -> usize {
    2048
}
fn default_bad_image() -> idavlm_shards::reader::BadImagePolicy {
    idavlm_shards::reader::BadImagePolicy::Skip
}
fn default_workers() -> usize {
    2
}
fn default_prefetch() -> usize {
    2
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSection {
    pub lr: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// Global-norm clipping threshold; none when absent.
    #[serde(default)]
    pub clip_grad_norm: Option<f64>,
    /// Per-module learning rates and weight decay: the first group whose glob matches a parameter's
    /// name sets its values; unmatched parameters keep `lr` and `weight_decay`. The schedule scales
    /// every group's lr by the same factor.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<OptimizerGroup>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerGroup {
    /// `*`-glob over parameter names (e.g. `transformer.visual.attn_pool.*`).
    #[serde(rename = "match")]
    pub pattern: String,
    /// Peak learning rate (default: `optimizer.lr`).
    #[serde(default)]
    pub lr: Option<f64>,
    #[serde(default)]
    pub weight_decay: Option<f64>,
}

fn default_betas() -> [f64; 2] {
    [0.9, 0.95]
}
fn default_eps() -> f64 {
    1e-8
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// DeepSpeed WarmupLR with log warm-up, then constant (SPEC §4).
    #[default]
    WarmupLog,
    WarmupLinear,
    /// Linear warm-up, then cosine decay to `min_lr`.
    Cosine,
    Constant,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    #[serde(default)]
    pub kind: ScheduleKind,
    /// Default: max(2, ceil(1% of the run's steps)).
    #[serde(default)]
    pub warmup_steps: Option<u64>,
    #[serde(default)]
    pub min_lr: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSection {
    /// Samples per micro-batch per rank (with packing: of the injected general micro-batches only).
    pub micro: usize,
    /// Micro-batches per optimizer step per rank.
    pub accum: usize,
    /// How token losses are averaged into the step's loss: `micro_batch` (the original's) by default,
    /// `tokens` (the only choice with packing, and its default).
    #[serde(default)]
    pub loss_mean: Option<LossMean>,
    /// Packed ID micro-batches: whole samples one after another in one row of at most `tokens` tokens,
    /// each attending only to itself with positions from 0 (off by default: one padded row per sample).
    #[serde(default)]
    pub packing: Option<PackingSection>,
}

impl BatchSection {
    pub fn loss_mean(&self) -> LossMean {
        self.loss_mean.unwrap_or(if self.packing.is_some() { LossMean::Tokens } else { LossMean::MicroBatch })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackingSection {
    /// Token budget of a packed micro-batch; at least `data.max_len`.
    pub tokens: usize,
}

/// How the loss of a step averages its tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossMean {
    /// Each micro-batch's loss is the mean over its supervised tokens; the step averages those means over
    /// micro-batches and ranks (Hugging Face Trainer + DeepSpeed, as the original IDA-VLM training).
    #[default]
    MicroBatch,
    /// The mean over every supervised token of the global step (one extra all-reduce of a count per
    /// step): the same gradient however samples are grouped into micro-batches and ranks.
    Tokens,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZeroSection {
    #[serde(default)]
    pub stage: ZeroStage,
    /// The dtype gradients are reduced over ranks in: `f32` (default) or `bf16` (half the bytes).
    #[serde(default)]
    pub reduce_dtype: ReduceDtype,
    /// Stage 3: a block whose activations are kept frees its gathered parameters after its forward and
    /// gathers them again for its backward (default true, as FSDP's `reshard_after_forward`); false
    /// keeps them gathered until the backward (one all-gather less per kept block, a whole block's
    /// parameters more memory per kept block).
    #[serde(default = "yes")]
    pub reshard_after_forward: bool,
}

impl Default for ZeroSection {
    fn default() -> Self {
        Self { stage: ZeroStage::default(), reduce_dtype: ReduceDtype::default(), reshard_after_forward: true }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ReduceDtype {
    #[default]
    F32,
    Bf16,
}

impl ReduceDtype {
    pub fn kind(self) -> tch::Kind {
        match self {
            Self::F32 => tch::Kind::Float,
            Self::Bf16 => tch::Kind::BFloat16,
        }
    }
}

/// What ZeRO partitions over the ranks (see [`crate::zero`]). Written as the number 1, 2 or 3 in
/// recipes, manifests and on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum ZeroStage {
    /// Optimizer state (f32 master, AdamW moments).
    One,
    /// Optimizer state and gradients.
    #[default]
    Two,
    /// Optimizer state, gradients and the compute-dtype parameters.
    Three,
}

impl TryFrom<u8> for ZeroStage {
    type Error = String;
    fn try_from(n: u8) -> std::result::Result<Self, String> {
        match n {
            1 => Ok(Self::One),
            2 => Ok(Self::Two),
            3 => Ok(Self::Three),
            n => Err(format!("ZeRO stage {n} is not 1, 2 or 3")),
        }
    }
}

impl From<ZeroStage> for u8 {
    fn from(s: ZeroStage) -> u8 {
        match s {
            ZeroStage::One => 1,
            ZeroStage::Two => 2,
            ZeroStage::Three => 3,
        }
    }
}

impl std::str::FromStr for ZeroStage {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let n: u8 = s.trim().parse().map_err(|_| format!("ZeRO stage {s:?} is not 1, 2 or 3"))?;
        Self::try_from(n)
    }
}

impl std::fmt::Display for ZeroStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", u8::from(*self))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    pub dir: PathBuf,
    #[serde(default)]
    pub every_steps: Option<u64>,
    #[serde(default = "default_keep")]
    pub keep: usize,
    /// Also write the model in the HF layout (rank 0) with each checkpoint.
    #[serde(default = "yes")]
    pub save_model: bool,
    /// Write a checkpoint when the run ends.
    #[serde(default = "yes")]
    pub at_end: bool,
    /// Write checkpoints in the background: training stalls only while this rank's state is copied to
    /// host memory.
    #[serde(rename = "async", default = "yes")]
    pub background: bool,
    /// Seconds between the scheduler's preemption signal and the kill (Slurm `--signal=B:USR1@N`): the
    /// run warns when its measured save time would not fit.
    #[serde(default = "default_preempt_budget")]
    pub preempt_budget_s: f64,
}

fn default_preempt_budget() -> f64 {
    90.0
}

fn default_keep() -> usize {
    3
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingSection {
    #[serde(default = "one")]
    pub every_steps: u64,
    #[serde(default)]
    pub metrics_file: Option<PathBuf>,
    /// `ADDR:PORT` for a Prometheus endpoint on rank 0.
    #[serde(default)]
    pub prometheus: Option<String>,
    /// Loss-curve picture (SVG) written at the end.
    #[serde(default)]
    pub plot: Option<PathBuf>,
    /// A folder for TensorBoard event files (rank 0 writes the scalars of every step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensorboard: Option<PathBuf>,
    #[serde(default = "yes")]
    pub progress_bar: bool,
    /// Time every step by phase (data, stem/blocks/head forward and backward, gradient reduction,
    /// parameter gather, optimizer): `phase_s` in the metrics and a `phases:` log line. The device is
    /// synchronised at each phase boundary, so steps run slightly slower; rank 0's split.
    #[serde(default)]
    pub phase_split: bool,
    /// Record one optimizer step as a timeline (`{step: N, dir: DIR}`, N from 1): libtorch's profiler
    /// over CPU ops, CUDA calls and kernels, the step's phases as named ranges, one Chrome trace per rank
    /// (`DIR/step-0000000N.rR.json`; `scripts/trace-gaps.py` splits one into kernel time and GPU idle
    /// gaps). The recorded step runs slightly slower.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceSection>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceSection {
    pub step: u64,
    pub dir: PathBuf,
}

impl Default for LoggingSection {
    fn default() -> Self {
        Self {
            every_steps: 1,
            metrics_file: None,
            prometheus: None,
            plot: None,
            tensorboard: None,
            progress_bar: true,
            phase_split: false,
            trace: None,
        }
    }
}
fn one() -> u64 {
    1
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LengthSection {
    #[serde(default)]
    pub steps: Option<u64>,
    #[serde(default)]
    pub epochs: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommSection {
    /// A collective that takes longer aborts every rank.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
}

impl Default for CommSection {
    fn default() -> Self {
        Self { timeout_s: default_timeout() }
    }
}
fn default_timeout() -> u64 {
    600
}

/// Where each key was written: the recipe files read (child first) with the position of every key
/// path in them, from the YAML parser's own marks, and the `--set` overrides.
struct Sources {
    layers: Vec<(PathBuf, HashMap<String, usize>)>,
    /// (key path in serde's form, the `--set` argument), in command-line order.
    sets: Vec<(String, String)>,
}

impl Sources {
    fn new() -> Self {
        Self { layers: Vec::new(), sets: Vec::new() }
    }

    /// Adds a file's text: the line of each key path (`a.b[0].c`, as serde_path_to_error prints paths).
    fn add(&mut self, file: &Path, text: &str) {
        self.layers.push((file.to_path_buf(), key_lines(text)));
    }

    /// `file:line` of a key path, or the `--set` that gave it: the last `--set` of the path or a parent
    /// of it, else the first file (child first) that writes the path, else the nearest parent written.
    fn locate(&self, path: &str) -> Option<String> {
        let covers = |k: &str| path == k || path.strip_prefix(k).is_some_and(|r| r.starts_with('.') || r.starts_with('['));
        if let Some((_, arg)) = self.sets.iter().rev().find(|(k, _)| covers(k)) {
            return Some(format!("--set {arg}"));
        }
        let mut p = path;
        loop {
            for (file, lines) in &self.layers {
                if let Some(l) = lines.get(p) {
                    return Some(format!("{}:{l}", file.display()));
                }
            }
            p = &p[..p.rfind(['.', '['])?];
        }
    }
}

/// A key path as serde_path_to_error prints it: `data.sources.0.path` -> `data.sources[0].path`.
fn serde_path(dotted: &str) -> String {
    let mut out = String::new();
    for part in dotted.split('.') {
        if part.parse::<usize>().is_ok() {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(part);
        }
    }
    out
}

/// The 1-based line of every key path and sequence item of a YAML text. A text that does not parse
/// gives what was read before the error (the parse itself reports the error).
fn key_lines(text: &str) -> HashMap<String, usize> {
    use saphyr_parser::{Event, Parser};
    enum Frame {
        /// A mapping at `path`; `key` is the key whose value comes next (None: a key comes next).
        Map {
            path: String,
            key: Option<String>,
        },
        Seq {
            path: String,
            next: usize,
        },
    }
    let mut out = HashMap::new();
    let mut stack: Vec<Frame> = Vec::new();
    // The path of the value that starts now (recording it), or None when a mapping key comes next.
    let value_path = |stack: &mut Vec<Frame>, out: &mut HashMap<String, usize>, line: usize| -> Option<String> {
        match stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Map { path, key }) => {
                let k = key.take()?;
                Some(if path.is_empty() { k } else { format!("{path}.{k}") })
            }
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                out.insert(p.clone(), line);
                Some(p)
            }
        }
    };
    for ev in Parser::new_from_str(text) {
        let Ok((ev, span)) = ev else { break };
        let line = span.start.line();
        match ev {
            // A scalar where a mapping key comes next is that key: its path is recorded where written.
            Event::Scalar(v, ..) if value_path(&mut stack, &mut out, line).is_none() => {
                if let Some(Frame::Map { path, key }) = stack.last_mut() {
                    let p = if path.is_empty() { v.to_string() } else { format!("{path}.{v}") };
                    out.entry(p).or_insert(line);
                    *key = Some(v.to_string());
                }
            }
            Event::Scalar(..) => {}
            Event::Alias(_) => {
                value_path(&mut stack, &mut out, line);
            }
            Event::MappingStart(..) => {
                let path = value_path(&mut stack, &mut out, line).unwrap_or_default();
                stack.push(Frame::Map { path, key: None });
            }
            Event::SequenceStart(..) => {
                let path = value_path(&mut stack, &mut out, line).unwrap_or_default();
                stack.push(Frame::Seq { path, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
            }
            _ => {}
        }
    }
    out
}

fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

fn read_layer(path: &Path, sources: &mut Sources, depth: usize) -> Result<Value> {
    if depth > 8 {
        return Err(Error::Recipe(format!("{}: `extends` nests more than 8 deep (a cycle?)", path.display())));
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::Recipe(format!("recipe {}: {e}", path.display())))?;
    let v: Value = serde_yaml_ng::from_str(&text).map_err(|e| Error::Recipe(format!("recipe {}: {e}", path.display())))?;
    sources.add(path, &text);
    let Some(parent) = v.get("extends").and_then(|e| e.as_str()).map(str::to_string) else { return Ok(v) };
    let base_path = path.parent().unwrap_or(Path::new(".")).join(parent);
    let mut base = read_layer(&base_path, sources, depth + 1)?;
    merge(&mut base, v);
    Ok(base)
}

/// Applies `key.path=value` (value parsed as YAML).
fn apply_set(root: &mut Value, set: &str) -> Result<()> {
    let (key, val) = set.split_once('=').ok_or_else(|| Error::Recipe(format!("--set {set:?}: expected key.path=value")))?;
    let val: Value = serde_yaml_ng::from_str(val).map_err(|e| Error::Recipe(format!("--set {key}: {e}")))?;
    let mut cur = root;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        // A number indexes a list: `data.sources.0.path`.
        if cur.is_sequence() {
            let seq = cur.as_sequence_mut().expect("checked sequence");
            let n = seq.len();
            let idx = p.parse::<usize>().map_err(|_| {
                Error::Recipe(format!(
                    "--set {key}: {} is a list; index it with a number (0..{n}), not {p:?}",
                    parts[..i].join(".")
                ))
            })?;
            let slot = seq
                .get_mut(idx)
                .ok_or_else(|| Error::Recipe(format!("--set {key}: {} has {n} item(s), no index {idx}", parts[..i].join("."))))?;
            if i + 1 == parts.len() {
                *slot = val;
                return Ok(());
            }
            cur = slot;
            continue;
        }
        if !cur.is_mapping() {
            return Err(Error::Recipe(format!("--set {key}: {} is neither a mapping nor a list", parts[..i].join("."))));
        }
        let m = cur.as_mapping_mut().expect("checked mapping");
        let k = Value::String(p.to_string());
        if i + 1 == parts.len() {
            m.insert(k, val);
            return Ok(());
        }
        if !m.contains_key(&k) {
            m.insert(k.clone(), Value::Mapping(Default::default()));
        }
        cur = m.get_mut(&k).expect("just inserted");
    }
    Ok(())
}

/// Loads a recipe file with its `extends` chain and `--set` overrides.
pub fn load(path: &Path, sets: &[String]) -> Result<Recipe> {
    let mut sources = Sources::new();
    let mut v = read_layer(path, &mut sources, 0)?;
    for s in sets {
        apply_set(&mut v, s)?;
        if let Some((k, _)) = s.split_once('=') {
            sources.sets.push((serde_path(k), s.clone()));
        }
    }
    from_value(v, &sources, path)
}

/// Parses a recipe from YAML text (used for recipes embedded in checkpoints).
pub fn from_str(text: &str, origin: &Path) -> Result<Recipe> {
    let v: Value = serde_yaml_ng::from_str(text).map_err(|e| Error::Recipe(format!("recipe {}: {e}", origin.display())))?;
    let mut sources = Sources::new();
    sources.add(origin, text);
    from_value(v, &sources, origin)
}

fn from_value(mut v: Value, sources: &Sources, path: &Path) -> Result<Recipe> {
    if let Some(m) = v.as_mapping_mut() {
        m.remove("extends");
    }
    let r: Recipe = serde_path_to_error::deserialize(v).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner().to_string();
        // A missing field is reported at the mapping that lacks it (the document's start for a
        // top-level section).
        let at = sources.locate(&key).unwrap_or_else(|| format!("{}:1", path.display()));
        if key == "." {
            return Error::Recipe(format!("recipe ({at}): {inner}"));
        }
        Error::Recipe(format!("recipe key `{key}` ({at}): {inner}"))
    })?;
    r.validate().map_err(|(key, msg)| {
        let at = sources.locate(&key).unwrap_or_else(|| path.display().to_string());
        Error::Recipe(format!("recipe key `{key}` ({at}): {msg}"))
    })?;
    Ok(r)
}

impl Recipe {
    /// Checks values serde cannot: returns (key path, message).
    pub fn validate(&self) -> std::result::Result<(), (String, String)> {
        let err = |k: &str, m: String| Err((k.to_string(), m));
        match (&self.model.preset, &self.model.config) {
            (None, None) => return err("model.preset", "give model.preset (tiny, qwen-vl-chat) or model.config".into()),
            (Some(_), Some(_)) => return err("model.config", "give either model.preset or model.config, not both".into()),
            (Some(p), None) if p != "tiny" && p != "qwen-vl-chat" => {
                return err("model.preset", format!("unknown preset {p:?} (known: tiny, qwen-vl-chat)"))
            }
            _ => {}
        }
        if let Some(g) = self.memory.limit_gib.filter(|g| !(g.is_finite() && *g > 0.0)) {
            return err("memory.limit_gib", format!("{g} is not a finite positive number"));
        }
        if self.batch.micro == 0 {
            return err("batch.micro", "must be at least 1".into());
        }
        if self.logging.trace.as_ref().is_some_and(|t| t.step == 0) {
            return err("logging.trace.step", "steps count from 1".into());
        }
        if self.batch.accum == 0 {
            return err("batch.accum", "must be at least 1".into());
        }
        if let Some(p) = &self.batch.packing {
            if let Err(e) = idavlm_shards::pack::check_budget(p.tokens, self.data.max_len) {
                return err("batch.packing.tokens", format!("{e} (data.max_len)"));
            }
            if self.batch.loss_mean == Some(LossMean::MicroBatch) {
                return err(
                    "batch.loss_mean",
                    "micro_batch averages per micro-batch, and packed micro-batches hold varying numbers of samples: \
                     use tokens (the default with packing)"
                        .into(),
                );
            }
            if self.data.pack_window == 0 {
                return err("data.pack_window", "must be at least 1".into());
            }
        }
        if let Some(e) = &self.eval {
            if e.data.is_none() && e.mmid.is_none() {
                return err("eval", "give eval.data (held-out loss), eval.mmid (MM-ID scoring) or both".into());
            }
            if e.batch == 0 {
                return err("eval.batch", "must be at least 1".into());
            }
            if e.every_steps == 0 && !e.at_end {
                return err("eval.every_steps", "0 with eval.at_end false never evaluates".into());
            }
            if let Some(j) = &e.judge {
                if e.mmid.is_none() {
                    return err("eval.judge", "judges the QA and caption items of eval.mmid, which is not given".into());
                }
                if let Err(m) = j.check("") {
                    let m = m.to_string();
                    let (field, why) = m.split_once(": ").unwrap_or(("", &m));
                    return err(&format!("eval.judge.{field}").trim_end_matches('.').to_string(), why.to_string());
                }
                if e.judge_every == 0 {
                    return err("eval.judge_every", "must be at least 1 (remove eval.judge to never judge)".into());
                }
            }
        }
        if self.data.sources.is_empty() {
            return err("data.sources", "at least one source".into());
        }
        if !(0.0..=1.0).contains(&self.data.inject_probability) {
            return err("data.inject_probability", format!("{} is not in [0, 1]", self.data.inject_probability));
        }
        if self.data.inject_probability > 0.0 && self.data.general.is_none() {
            return err("data.inject_probability", "injection needs data.general".into());
        }
        if self.optimizer.lr < 0.0 || !self.optimizer.lr.is_finite() {
            return err("optimizer.lr", format!("{} is not a finite non-negative number", self.optimizer.lr));
        }
        for (i, b) in self.optimizer.betas.iter().enumerate() {
            // beta = 1 never updates the moment (beta2 = 1 divides by a zero bias correction: NaN).
            if !(0.0..1.0).contains(b) {
                return err("optimizer.betas", format!("betas[{i}] = {b} is not in [0, 1)"));
            }
        }
        if !(self.optimizer.eps > 0.0 && self.optimizer.eps.is_finite()) {
            return err("optimizer.eps", format!("{} is not a finite positive number", self.optimizer.eps));
        }
        if self.optimizer.weight_decay < 0.0 || !self.optimizer.weight_decay.is_finite() {
            return err("optimizer.weight_decay", format!("{} is not a finite non-negative number", self.optimizer.weight_decay));
        }
        for (i, g) in self.optimizer.groups.iter().enumerate() {
            for (what, v) in [("lr", g.lr), ("weight_decay", g.weight_decay)] {
                if let Some(v) = v.filter(|v| !(v.is_finite() && *v >= 0.0)) {
                    return err(&format!("optimizer.groups[{i}].{what}"), format!("{v} is not a finite non-negative number"));
                }
            }
            if g.lr.is_some() && self.optimizer.lr <= 0.0 {
                return err(
                    &format!("optimizer.groups[{i}].lr"),
                    "group learning rates scale with optimizer.lr, which is 0".into(),
                );
            }
        }
        if let Some(l) = &self.lora {
            if self.trainable != TrainableSection::default() {
                return err(
                    "trainable",
                    "does not apply with `lora` (the adapters and lora.modules_to_save are trained): remove it, or list \
                     modules to train in full in lora.modules_to_save"
                        .into(),
                );
            }
            if l.r == 0 {
                return err("lora.r", "must be at least 1".into());
            }
            if !(l.alpha > 0.0 && l.alpha.is_finite()) {
                return err("lora.alpha", format!("{} is not a finite positive number", l.alpha));
            }
            if !(0.0..1.0).contains(&l.dropout) {
                return err("lora.dropout", format!("{} is not in [0, 1)", l.dropout));
            }
            l.spec().check().or_else(|m| err("lora.targets", m))?;
        }
        if let Some(c) = self.optimizer.clip_grad_norm {
            if !(c > 0.0 && c.is_finite()) {
                return err("optimizer.clip_grad_norm", format!("{c} is not a finite positive number"));
            }
        }

        match (self.length.steps, self.length.epochs) {
            (None, None) => return err("length", "give length.steps or length.epochs".into()),
            (Some(_), Some(_)) => return err("length.epochs", "give length.steps or length.epochs, not both".into()),
            _ => {}
        }
        if self.checkpoint.keep == 0 {
            return err("checkpoint.keep", "must keep at least one checkpoint".into());
        }
        Ok(())
    }

    /// The resolved recipe as YAML (written into checkpoints).
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).expect("recipe serialises")
    }
}

/// `*`-glob match of a parameter name.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let mut rest = name;
    for (i, p) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(p) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(p);
        } else {
            match rest.find(p) {
                Some(k) => rest = &rest[k + p.len()..],
                None => return false,
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The line (1-based) of the first line of `text` equal to `line` after trimming, after `after`.
    fn line_of(text: &str, after: &str, line: &str) -> usize {
        let start = text.lines().position(|l| l.trim() == after).expect("anchor line");
        start + 1 + text.lines().skip(start).position(|l| l.trim() == line).expect("line")
    }

    fn demo_with(edit: impl Fn(&str) -> String) -> (tempfile::TempDir, PathBuf, String) {
        let demo = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../recipes/demo.yaml")).expect("demo.yaml");
        let text = edit(&demo);
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("demo.yaml");
        std::fs::write(&p, &text).expect("write");
        (d, p, text)
    }

    #[test]
    fn error_located_at_the_key_of_its_own_section() {
        // `every_steps` is also a key of `checkpoint`, written earlier in the file.
        let (_d, p, text) = demo_with(|t| t.replace("logging:\n  every_steps: 10", "logging:\n  every_steps: often"));
        let e = load(&p, &[]).unwrap_err().to_string();
        let want = format!("{}:{}", p.display(), line_of(&text, "logging:", "every_steps: often"));
        assert!(e.contains("`logging.every_steps`") && e.contains(&want), "{e}\nwanted {want}");
    }

    #[test]
    fn error_located_in_the_general_source_not_the_first_source() {
        let (_d, p, text) = demo_with(|t| t.replace("path: runs/demo/data/general", "path: [1, 2]"));
        let e = load(&p, &[]).unwrap_err().to_string();
        let want = format!("{}:{}", p.display(), line_of(&text, "general:", "path: [1, 2]"));
        assert!(e.contains("`data.general.path`") && e.contains(&want), "{e}\nwanted {want}");
        // A list item's key: `data.sources[0].path`.
        let (_d, p, text) = demo_with(|t| t.replace("path: runs/demo/data/id", "path: {a: 1}"));
        let e = load(&p, &[]).unwrap_err().to_string();
        let want = format!("{}:{}", p.display(), line_of(&text, "sources:", "path: {a: 1}"));
        assert!(e.contains("`data.sources[0].path`") && e.contains(&want), "{e}\nwanted {want}");
    }

    /// The kernel choice is a recipe setting: `--set` changes it, the resolved recipe records it, and a
    /// bad value names the key.
    #[test]
    fn kernel_choices_are_recipe_keys_recorded_in_the_resolved_recipe() {
        let (_d, p, _) = demo_with(|t| t.to_string());
        let r = load(&p, &[]).unwrap();
        assert_eq!(r.kernels, crate::model::choice::Kernels::default());
        let r = load(&p, &["kernels.explicit_block=false".into(), "kernels.mha_attention=sdpa".into()]).unwrap();
        assert!(!r.kernels.explicit_block && r.kernels.mha_attention == crate::model::choice::MhaAttention::Sdpa);
        let resolved = serde_yaml_ng::to_string(&r).unwrap();
        assert!(resolved.contains("explicit_block: false") && resolved.contains("mha_attention: sdpa"), "{resolved}");
        let e = load(&p, &["kernels.mha_attention=cudnn".into()]).unwrap_err().to_string();
        assert!(e.contains("`kernels.mha_attention`"), "{e}");
    }

    #[test]
    fn error_of_a_set_value_names_the_set() {
        let (_d, p, _) = demo_with(|t| t.to_string());
        let e = load(&p, &["logging.every_steps=often".into()]).unwrap_err().to_string();
        assert!(e.contains("`logging.every_steps` (--set logging.every_steps=often)"), "{e}");
        let e = load(&p, &["data.sources.0.count=-3".into()]).unwrap_err().to_string();
        assert!(e.contains("(--set data.sources.0.count=-3)"), "{e}");
        // Validation errors too; a key the --set did not touch still points into the file.
        let e = load(&p, &["zero.stage=4".into()]).unwrap_err().to_string();
        assert!(e.contains("`zero.stage` (--set zero.stage=4)") && e.contains("not 1, 2 or 3"), "{e}");
        let e = load(&p, &["logging.every_steps=3".into(), "optimizer.eps=0".into()]).unwrap_err().to_string();
        assert!(e.contains("(--set optimizer.eps=0)"), "{e}");
    }

    #[test]
    fn key_lines_follow_the_parser() {
        let text = "a:\n  b: 1\n  c:\n    - x: 2\n      y: 3\n    - 4\nd: [5, 6]\n";
        let k = key_lines(text);
        let get = |p: &str| k.get(p).copied();
        assert_eq!(
            [
                get("a"),
                get("a.b"),
                get("a.c"),
                get("a.c[0]"),
                get("a.c[0].x"),
                get("a.c[0].y"),
                get("a.c[1]"),
                get("d"),
                get("d[1]")
            ],
            [Some(1), Some(2), Some(3), Some(4), Some(4), Some(5), Some(6), Some(7), Some(7)]
        );
    }

    #[test]
    fn globs() {
        assert!(glob_match("transformer.h.*", "transformer.h.3.mlp.w1.weight"));
        assert!(glob_match("lm_head.*", "lm_head.weight"));
        assert!(!glob_match("lm_head.*", "transformer.lm_head.weight"));
        assert!(glob_match("*.attn1.*", "transformer.visual.attn_pool.attn1.out_proj.bias"));
        assert!(glob_match("exact", "exact"));
    }
}
