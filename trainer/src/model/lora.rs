//! LoRA (Hu et al. 2021) on the LLM's linear layers, in PEFT's conventions so that adapters move between
//! idavlm and the Hugging Face stack: a targeted linear `y = x W^T + b` becomes
//! `y = x W^T + b + (alpha / r) * dropout(x) A^T B^T` with `A` (r, in) drawn like PEFT's default
//! (Kaiming-uniform, a = sqrt 5: U(-1/sqrt(in), 1/sqrt(in))) and `B` (out, r) zero, so the adapted model
//! starts as the base model. Parameters are named `{module}.lora_A.weight` / `{module}.lora_B.weight`;
//! PEFT's files prefix them with `base_model.model.` (see [`peft_key`]).
//!
//! A target names modules as PEFT's list form does: a module matches when its name equals the target or
//! ends with `.` + target. Only the LLM blocks' linears (c_attn, attn.c_proj, mlp.w1, mlp.w2,
//! mlp.c_proj) can be adapted; a target that also names a vision-tower or resampler linear is refused.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// The adapters of a model: rank, scaling, dropout, which modules, and which modules train in full
/// beside them (written into the PEFT config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub r: i64,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<String>,
    pub modules_to_save: Vec<String>,
}

/// The linears of one LLM block (module names below `transformer.h.{i}`).
pub const BLOCK_LINEARS: [&str; 5] = ["attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj"];

/// Linear modules of the stem and head (vision tower block `{i}` shown as `resblocks.0`) that LoRA
/// cannot adapt here.
const OTHER_LINEARS: [&str; 7] = [
    "transformer.visual.transformer.resblocks.0.attn.in_proj",
    "transformer.visual.transformer.resblocks.0.attn.out_proj",
    "transformer.visual.transformer.resblocks.0.mlp.c_fc",
    "transformer.visual.transformer.resblocks.0.mlp.c_proj",
    "transformer.visual.attn_pool.kv_proj",
    "transformer.visual.attn_pool.attn.out_proj",
    "lm_head",
];

/// PEFT's rule for a target in a list: the whole name, or its dotted tail.
pub fn name_matches(target: &str, module: &str) -> bool {
    module == target || module.ends_with(&format!(".{target}"))
}

impl LoraSpec {
    /// alpha / r.
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// Whether the module (e.g. `transformer.h.3.attn.c_attn`) carries an adapter.
    pub fn adapts(&self, module: &str) -> bool {
        self.targets.iter().any(|t| name_matches(t, module))
    }

    /// Whether a parameter belongs to a module trained in full beside the adapters (`wte` matches
    /// `transformer.wte.weight`).
    pub fn saves(&self, param: &str) -> bool {
        let module = param.rsplit_once('.').map(|(m, _)| m).unwrap_or(param);
        self.modules_to_save
            .iter()
            .any(|t| name_matches(t, module) || module.starts_with(&format!("{t}.")) || module.contains(&format!(".{t}.")))
    }

    /// Checks the targets against the model: each names at least one LLM block linear and no other
    /// linear. Returns the message for the recipe key `lora.targets`.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.targets.is_empty() {
            return Err("no target modules".into());
        }
        for t in &self.targets {
            if let Some(o) = OTHER_LINEARS.iter().find(|o| name_matches(t, o)) {
                return Err(format!(
                    "{t:?} also names {o}: only the LLM blocks' linears ({}) take adapters here",
                    BLOCK_LINEARS.join(", ")
                ));
            }
            if !BLOCK_LINEARS.iter().any(|m| name_matches(t, &format!("transformer.h.0.{m}"))) {
                return Err(format!("{t:?} names no LLM block linear ({})", BLOCK_LINEARS.join(", ")));
            }
        }
        Ok(())
    }

    /// PEFT's `adapter_config.json` for these adapters.
    pub fn peft_config(&self) -> serde_json::Value {
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": null,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.targets,
            "modules_to_save": self.modules_to_save,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": false,
            "use_dora": false,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null,
        })
    }

    /// Reads the adapters' settings back from a PEFT `adapter_config.json`.
    pub fn from_peft_config(v: &serde_json::Value) -> std::result::Result<Self, String> {
        let num = |k: &str| v.get(k).and_then(|x| x.as_f64()).ok_or_else(|| format!("no number {k:?}"));
        let list = |k: &str| -> Vec<String> {
            v.get(k)
                .and_then(|x| x.as_array())
                .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
                .unwrap_or_default()
        };
        if v.get("peft_type").and_then(|x| x.as_str()) != Some("LORA") {
            return Err("peft_type is not LORA".into());
        }
        if v.get("use_rslora").and_then(|x| x.as_bool()) == Some(true)
            || v.get("use_dora").and_then(|x| x.as_bool()) == Some(true)
        {
            return Err("rsLoRA and DoRA adapters are not supported".into());
        }
        Ok(Self {
            r: num("r")? as i64,
            alpha: num("lora_alpha")?,
            dropout: num("lora_dropout").unwrap_or(0.0),
            targets: list("target_modules"),
            modules_to_save: list("modules_to_save"),
        })
    }
}

/// PEFT's file names in an adapter folder (`CKPT/adapter/`).
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// The adapter folder that goes with a model path: `CKPT/adapter` for a checkpoint folder `CKPT` or its
/// `CKPT/model`; None when there is none.
pub fn adapter_dir(p: &std::path::Path) -> Option<std::path::PathBuf> {
    let candidates = [p.join("adapter"), p.parent().map(|q| q.join("adapter")).unwrap_or_default()];
    let is_model = p.file_name().is_some_and(|n| n == "model");
    candidates.into_iter().enumerate().find(|(i, d)| (*i == 0 || is_model) && d.join(ADAPTER_CONFIG).is_file()).map(|(_, d)| d)
}

/// Whether a parameter name is a LoRA factor.
pub fn is_adapter(name: &str) -> bool {
    name.contains(".lora_A.") || name.contains(".lora_B.")
}

/// The key PEFT's `adapter_model.safetensors` uses for a parameter (adapter factors and modules to save
/// alike).
pub fn peft_key(name: &str) -> String {
    format!("base_model.model.{name}")
}

/// The parameter name of a PEFT key, if it is one.
pub fn from_peft_key(key: &str) -> Option<&str> {
    key.strip_prefix("base_model.model.")
}

/// `W + (alpha / r) B A`, computed in f32 and returned in W's dtype.
pub fn merged(w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Tensor {
    tch::no_grad(|| {
        let delta = b.to_kind(Kind::Float).matmul(&a.to_kind(Kind::Float)) * scale;
        (w.to_kind(Kind::Float) + delta).to_kind(w.kind())
    })
}

/// A linear's adapter, for the forward pass.
#[derive(Debug)]
pub struct Adapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
}

impl Adapter {
    /// `(alpha / r) * dropout(x) A^T B^T`. Dropout draws from libtorch's generator: the training step
    /// seeds it per block so that a recomputed block draws the same mask.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = if self.dropout > 0.0 { x.dropout(self.dropout, true) } else { x.shallow_clone() };
        h.linear::<Tensor>(&self.a, None).linear::<Tensor>(&self.b, None) * self.scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(targets: &[&str]) -> LoraSpec {
        LoraSpec {
            r: 4,
            alpha: 16.0,
            dropout: 0.0,
            targets: targets.iter().map(|s| s.to_string()).collect(),
            modules_to_save: vec!["wte".into(), "lm_head".into()],
        }
    }

    #[test]
    fn targets_follow_peft_and_stay_in_the_llm() {
        let s = spec(&["c_attn", "attn.c_proj", "w1", "w2"]);
        assert!(s.check().is_ok());
        assert!(s.adapts("transformer.h.7.attn.c_attn") && s.adapts("transformer.h.0.mlp.w2"));
        assert!(!s.adapts("transformer.h.0.mlp.c_proj") && !s.adapts("transformer.visual.transformer.resblocks.0.attn.out_proj"));
        assert!(spec(&["c_proj"]).check().unwrap_err().contains("resblocks.0.mlp.c_proj"));
        assert!(spec(&["mlp.c_proj"]).check().is_err());
        assert!(spec(&["q_proj"]).check().unwrap_err().contains("names no LLM block linear"));
        assert!(s.saves("transformer.wte.weight") && s.saves("lm_head.weight") && !s.saves("transformer.ln_f.weight"));
    }
}
