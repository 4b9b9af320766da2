//! Model configuration: the Hugging Face `config.json` of Qwen-VL-Chat read straight into serde
//! structs (SPEC §1.8), presets, and derived sizes.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The `visual` section of Qwen-VL's `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisualConfig {
    pub heads: i64,
    pub image_size: i64,
    pub layers: i64,
    pub mlp_ratio: f64,
    pub output_dim: i64,
    pub patch_size: i64,
    pub width: i64,
    #[serde(default = "default_image_start_id")]
    pub image_start_id: i64,
    /// Number of resampler queries; 256 at every size in Qwen-VL.
    #[serde(default = "default_n_queries")]
    pub n_queries: i64,
}

fn default_image_start_id() -> i64 {
    idavlm_shards::tokenizer::IMG_START as i64
}
fn default_n_queries() -> i64 {
    256
}

/// The fields of Qwen-VL's `config.json` that define the model; other keys of the HF file are accepted
/// and ignored (they describe the Python runtime, not the network).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub hidden_size: i64,
    pub num_attention_heads: i64,
    pub kv_channels: i64,
    pub num_hidden_layers: i64,
    /// Twice the MLP width (Qwen's convention).
    pub intermediate_size: i64,
    pub vocab_size: i64,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_rope_base")]
    pub rotary_emb_base: f64,
    #[serde(default = "default_seq_length")]
    pub seq_length: i64,
    pub visual: VisualConfig,
    /// IDA-VLM's ID-Former (`transformer.visual.attn_pool.attn1`); not in the HF file, set by the recipe.
    #[serde(default)]
    pub id_former: bool,
    /// LoRA adapters on LLM block linears (set by the recipe; never part of the HF file).
    #[serde(skip)]
    pub lora: Option<super::lora::LoraSpec>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_rope_base() -> f64 {
    10_000.0
}
fn default_seq_length() -> i64 {
    2048
}

impl ModelConfig {
    /// The chat template this model's data must be tokenised for (a dataset records its own).
    pub fn template(&self) -> &'static str {
        idavlm_shards::chat::TEMPLATE
    }

    /// Full-size Qwen-VL-Chat (SPEC §1).
    pub fn qwen_vl_chat() -> Self {
        Self {
            hidden_size: 4096,
            num_attention_heads: 32,
            kv_channels: 128,
            num_hidden_layers: 32,
            intermediate_size: 22016,
            vocab_size: 151_936,
            layer_norm_epsilon: 1e-6,
            rotary_emb_base: 10_000.0,
            seq_length: 2048,
            visual: VisualConfig {
                heads: 16,
                image_size: 448,
                layers: 48,
                mlp_ratio: 4.9231,
                output_dim: 4096,
                patch_size: 14,
                width: 1664,
                image_start_id: default_image_start_id(),
                n_queries: 256,
            },
            id_former: false,
            lora: None,
        }
    }

    /// Same architecture, tiny sizes: for tests and the CPU demo. The vocabulary keeps every real token id.
    pub fn tiny() -> Self {
        Self {
            hidden_size: 128,
            num_attention_heads: 2,
            kv_channels: 64,
            num_hidden_layers: 2,
            intermediate_size: 2 * 256,
            vocab_size: 151_936,
            layer_norm_epsilon: 1e-6,
            rotary_emb_base: 10_000.0,
            seq_length: 2048,
            visual: VisualConfig {
                heads: 2,
                image_size: 56,
                layers: 2,
                mlp_ratio: 2.0,
                output_dim: 128,
                patch_size: 14,
                width: 64,
                image_start_id: default_image_start_id(),
                n_queries: 256,
            },
            id_former: false,
            lora: None,
        }
    }

    /// A preset by name: `qwen-vl-chat` or `tiny`.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "qwen-vl-chat" => Ok(Self::qwen_vl_chat()),
            "tiny" => Ok(Self::tiny()),
            other => Err(Error::Config(format!("unknown model preset {other:?} (known: qwen-vl-chat, tiny)"))),
        }
    }

    /// Reads a HF `config.json` (or a YAML file with the same keys).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: Self = if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            serde_yaml_ng::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?
        } else {
            serde_json::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?
        };
        cfg.validate().map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Ok(cfg)
    }

    /// Checks the relations SPEC §1.8 requires of any size.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let v = &self.visual;
        if self.num_attention_heads * self.kv_channels != self.hidden_size {
            return Err(format!(
                "num_attention_heads ({}) x kv_channels ({}) must equal hidden_size ({})",
                self.num_attention_heads, self.kv_channels, self.hidden_size
            ));
        }
        if self.intermediate_size % 2 != 0 {
            return Err(format!("intermediate_size ({}) must be even (it is twice the MLP width)", self.intermediate_size));
        }
        if v.output_dim != self.hidden_size {
            return Err(format!("visual.output_dim ({}) must equal hidden_size ({})", v.output_dim, self.hidden_size));
        }
        if v.image_size % v.patch_size != 0 {
            return Err(format!("visual.image_size ({}) must be a multiple of patch_size ({})", v.image_size, v.patch_size));
        }
        if v.width % v.heads != 0 {
            return Err(format!("visual.width ({}) must be divisible by visual.heads ({})", v.width, v.heads));
        }
        if self.hidden_size % 128 != 0 && self.hidden_size % self.resampler_heads() != 0 {
            return Err(format!("hidden_size ({}) must split into resampler heads", self.hidden_size));
        }
        if self.hidden_size % 4 != 0 {
            return Err(format!("hidden_size ({}) must be a multiple of 4 (2-D sin-cos table)", self.hidden_size));
        }
        if v.image_start_id != idavlm_shards::tokenizer::IMG_START as i64 {
            return Err(format!(
                "visual.image_start_id is {}, and the {} chat template marks images with <img> = {}: the model would \
                 look for image spans where the data has none",
                v.image_start_id,
                self.template(),
                idavlm_shards::tokenizer::IMG_START
            ));
        }
        if v.n_queries != 256 {
            return Err(format!("visual.n_queries is {}, Qwen-VL uses 256", v.n_queries));
        }
        if self.kv_channels % 2 != 0 {
            return Err("kv_channels must be even (rotary embedding)".into());
        }
        Ok(())
    }

    pub fn mlp_width(&self) -> i64 {
        self.intermediate_size / 2
    }
    pub fn vit_mlp_width(&self) -> i64 {
        (self.visual.width as f64 * self.visual.mlp_ratio) as i64
    }
    pub fn grid(&self) -> i64 {
        self.visual.image_size / self.visual.patch_size
    }
    pub fn num_patches(&self) -> i64 {
        self.grid() * self.grid()
    }
    /// Resampler heads: hidden / 128 (32 at full size); tiny widths use at least one head.
    pub fn resampler_heads(&self) -> i64 {
        (self.hidden_size / 128).max(1)
    }
}

#[cfg(test)]
mod tests {
    /// `visual.image_start_id` is checked against the template's `<img>` id (a config that disagrees
    /// would train on image spans the data does not have).
    #[test]
    fn an_image_start_id_other_than_the_templates_is_refused() {
        let mut cfg = super::ModelConfig::tiny();
        assert!(cfg.validate().is_ok());
        cfg.visual.image_start_id += 1;
        let e = cfg.validate().unwrap_err();
        assert!(e.contains("visual.image_start_id is 151858") && e.contains("151857"), "{e}");
    }
}
