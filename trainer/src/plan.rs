//! A recipe resolved for this process: the model config, the compute dtype on this device, the trainable
//! set, the ZeRO stage and the run's length. Training, inference and the benchmark take these from here,
//! so a recipe means the same thing in all three.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use tch::{Device, Kind};

use crate::error::{Error, Result};
use crate::model::lora::LoraSpec;
use crate::model::weights::{load_hf, LoadReport};
use crate::model::{ModelConfig, ParamSet, ParamSpec, Part};
use crate::recipe::{glob_match, Checkpointing, Dtype, LengthSection, Recipe, TrainableSection, ZeroStage};

/// The trainable parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum Trainable {
    /// Names matching an `include` glob and no `exclude` glob.
    Globs { include: Vec<String>, exclude: Vec<String> },
    /// LoRA: the adapter factors and the parameters of `modules_to_save`.
    Lora(LoraSpec),
}

impl Trainable {
    pub fn new(s: &TrainableSection) -> Self {
        Self::Globs { include: s.include.clone(), exclude: s.exclude.clone() }
    }

    /// LoRA's set when the model has adapters, else the globs of `s`.
    pub fn of(lora: Option<&LoraSpec>, s: &TrainableSection) -> Self {
        match lora {
            Some(l) => Self::Lora(l.clone()),
            None => Self::new(s),
        }
    }

    pub fn contains(&self, s: &ParamSpec) -> bool {
        match self {
            Self::Globs { include, exclude } => {
                include.iter().any(|p| glob_match(p, &s.name)) && !exclude.iter().any(|p| glob_match(p, &s.name))
            }
            Self::Lora(l) => s.part == Part::Lora || l.saves(&s.name),
        }
    }
}

impl Default for Trainable {
    /// SPEC §4's trainable set (see [`TrainableSection::default`]).
    fn default() -> Self {
        Self::new(&TrainableSection::default())
    }
}

/// What a recipe means on this device.
#[derive(Clone, Debug)]
pub struct Plan {
    pub cfg: ModelConfig,
    /// Compute dtype of parameters and activations.
    pub kind: Kind,
    pub device: Device,
    pub trainable: Trainable,
    pub stage: ZeroStage,
    pub checkpointing: Checkpointing,
    length: LengthSection,
}

impl Recipe {
    /// Resolves the recipe for `device` (reads `model.config` when the model is given by a file).
    pub fn resolve(&self, device: Device) -> Result<Plan> {
        let mut cfg = match (&self.model.preset, &self.model.config) {
            (Some(p), _) => ModelConfig::preset(p)?,
            (None, Some(c)) => ModelConfig::from_file(c)?,
            (None, None) => unreachable!("validated recipe"),
        };
        cfg.id_former = self.model.id_former;
        cfg.lora = self.lora.as_ref().map(|l| l.spec());
        let trainable = Trainable::of(cfg.lora.as_ref(), &self.trainable);
        Ok(Plan {
            cfg,
            kind: compute_kind(self.model.dtype, device),
            device,
            trainable,
            stage: self.zero.stage,
            checkpointing: self.activation_checkpointing,
            length: self.length.clone(),
        })
    }
}

impl Plan {
    /// Optimizer steps of the run: `length.steps`, or `length.epochs` of the main sources' epoch
    /// (`epoch_len` samples) at `samples_per_step()` samples per step (asked only then: with packing it
    /// packs the first window).
    pub fn total_steps(&self, epoch_len: usize, samples_per_step: impl FnOnce() -> Result<f64>) -> Result<u64> {
        Ok(match (self.length.steps, self.length.epochs) {
            (Some(s), _) => s,
            (None, Some(e)) => ((e * epoch_len as f64) / samples_per_step()?).ceil().max(1.0) as u64,
            _ => unreachable!("validated recipe"),
        })
    }

    /// Initial weights: from `init` (an HF checkpoint, or an idavlm checkpoint folder's `model/`), or
    /// fresh from `seed`.
    pub fn initial_params(&self, init: Option<&Path>, seed: u64) -> Result<ParamSet> {
        match init {
            Some(init) => {
                // Adapters created here are drawn from the seed: the same on every rank.
                tch::manual_seed(seed as i64);
                Ok(load_model(init, &self.cfg, self.device, self.kind)?.0)
            }
            None => Ok(ParamSet::init(&self.cfg, self.device, self.kind, seed as i64)),
        }
    }
}

/// The weights of a model path (an HF folder or file, or an idavlm checkpoint folder): its `model/` (see
/// [`model_dir`]) loaded for `cfg`, with the checkpoint's LoRA adapter applied when it has one (loaded
/// into the model's own factors, or merged into the base weights when `cfg` has none). Tensors `cfg` has
/// and the files lack (a new ID-Former, new adapters) are created; all of it is logged and reported.
pub fn load_model(path: &Path, cfg: &ModelConfig, device: Device, kind: Kind) -> Result<(ParamSet, LoadReport)> {
    let p = model_dir(path);
    let (params, mut report) = load_hf(&p, cfg, device, kind)?;
    if let Some(dir) = crate::model::lora::adapter_dir(path) {
        (report.adapters_loaded, report.adapters_merged) = crate::model::weights::apply_adapter(&params, &dir)?;
        tracing::info!(
            "{}: {} adapter(s) loaded, {} merged into the base weights",
            dir.display(),
            report.adapters_loaded,
            report.adapters_merged
        );
    }
    if !report.created_id_former.is_empty() {
        tracing::info!("ID-Former not in {}: created zero-initialised ({} tensors)", p.display(), report.created_id_former.len());
    }
    if report.created_lora > 0 {
        tracing::info!(
            "LoRA factors not in {}: {} created (B = 0: the model starts as the base)",
            p.display(),
            report.created_lora
        );
    }
    Ok((params, report))
}

/// The compute dtype: bf16 on GPUs and f32 on CPUs unless the recipe says.
pub fn compute_kind(d: Dtype, device: Device) -> Kind {
    match (d, device) {
        (Dtype::F32, _) | (Dtype::Auto, Device::Cpu) => Kind::Float,
        _ => Kind::BFloat16,
    }
}

/// The HF-layout model of a path: an idavlm checkpoint folder's `model/`, or the path itself.
pub fn model_dir(p: &Path) -> PathBuf {
    if p.join("model").is_dir() {
        p.join("model")
    } else {
        p.to_path_buf()
    }
}

/// Where a run starts from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resume {
    /// From step 0 (refused when the checkpoint folder already holds another run's checkpoints).
    None,
    /// The newest complete checkpoint in the recipe's folder, if any.
    Auto,
    Path(PathBuf),
}

impl FromStr for Resume {
    type Err = Error;
    /// `none`, `auto`, or a checkpoint folder (which must exist).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Self::None),
            "auto" => Ok(Self::Auto),
            "" => Err(Error::Other("--resume: give auto, none or a checkpoint folder".into())),
            p if Path::new(p).is_dir() => Ok(Self::Path(PathBuf::from(p))),
            p => Err(Error::Other(format!("--resume {p}: no such checkpoint folder (or give auto or none)"))),
        }
    }
}
