//! Qwen3-VL's `config.json` (transformers' `Qwen3VLConfig`, both the 4.57 layout with `rope_theta` /
//! `rope_scaling` and the 5.x layout with `rope_parameters`), the released sizes as presets, and a
//! tiny one for tests and the demo.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// `vision_config`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    pub depth: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_heads: i64,
    pub out_hidden_size: i64,
    pub num_position_embeddings: i64,
    pub deepstack_visual_indexes: Vec<i64>,
    #[serde(default = "d_patch")]
    pub patch_size: i64,
    #[serde(default = "d_temporal")]
    pub temporal_patch_size: i64,
    #[serde(default = "d_merge")]
    pub spatial_merge_size: i64,
    #[serde(default = "d_in_channels")]
    pub in_channels: i64,
    #[serde(default = "d_vision_act")]
    pub hidden_act: String,
}

/// `text_config`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub mrope_section: [i64; 3],
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: i64,
    #[serde(default = "d_text_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
}

/// A Qwen3-VL model: the two halves, the tied head and IDA-VLM's ID-Former (§14.3; set by the recipe,
/// never written into an exported config.json).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Qwen3VlConfig {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub id_former: bool,
}

fn d_patch() -> i64 {
    16
}
fn d_temporal() -> i64 {
    2
}
fn d_merge() -> i64 {
    2
}
fn d_in_channels() -> i64 {
    3
}
fn d_vision_act() -> String {
    "gelu_pytorch_tanh".into()
}
fn d_text_act() -> String {
    "silu".into()
}
fn d_eps() -> f64 {
    1e-6
}
fn d_max_pos() -> i64 {
    262_144
}

/// The HF model type this family reads; any other is refused by name.
pub const MODEL_TYPE: &str = "qwen3_vl";

impl Qwen3VlConfig {
    fn sized(h: i64, layers: i64, heads: i64, inter: i64, vit: (i64, i64, i64), ds: [i64; 3], tied: bool) -> Self {
        Self {
            text: TextConfig {
                vocab_size: 151_936,
                hidden_size: h,
                intermediate_size: inter,
                num_hidden_layers: layers,
                num_attention_heads: heads,
                num_key_value_heads: 8,
                head_dim: 128,
                rms_norm_eps: 1e-6,
                rope_theta: 5_000_000.0,
                mrope_section: [24, 20, 20],
                max_position_embeddings: 262_144,
                hidden_act: d_text_act(),
                attention_bias: false,
            },
            vision: VisionConfig {
                depth: vit.0,
                hidden_size: vit.1,
                intermediate_size: vit.2,
                num_heads: 16,
                out_hidden_size: h,
                num_position_embeddings: 2304,
                deepstack_visual_indexes: ds.to_vec(),
                patch_size: 16,
                temporal_patch_size: 2,
                spatial_merge_size: 2,
                in_channels: 3,
                hidden_act: d_vision_act(),
            },
            tie_word_embeddings: tied,
            id_former: false,
        }
    }

    /// Qwen3-VL-2B-Instruct (SPEC-QWEN3VL.md §1).
    pub fn qwen3_vl_2b() -> Self {
        Self::sized(2048, 28, 16, 6144, (24, 1024, 4096), [5, 11, 17], true)
    }
    /// Qwen3-VL-4B-Instruct: q_proj is 4096 wide, not the hidden 2560.
    pub fn qwen3_vl_4b() -> Self {
        Self::sized(2560, 36, 32, 9728, (24, 1024, 4096), [5, 11, 17], true)
    }
    /// Qwen3-VL-8B-Instruct: untied head, ViT head size 72.
    pub fn qwen3_vl_8b() -> Self {
        Self::sized(4096, 36, 32, 12288, (27, 1152, 4304), [8, 16, 24], false)
    }
    /// The same architecture in tiny sizes, every trap kept: GQA, q_proj wider than hidden, a ViT
    /// head size of 24, DeepStack inside a 4-block ViT, a tied head; the real vocabulary.
    pub fn tiny() -> Self {
        let mut c = Self::sized(64, 4, 4, 96, (4, 72, 112), [0, 1, 3], true);
        c.text.num_key_value_heads = 2;
        c.text.head_dim = 32;
        c.text.mrope_section = [6, 5, 5];
        c.text.max_position_embeddings = 4096;
        c.vision.num_heads = 3;
        c.vision.num_position_embeddings = 64;
        c
    }

    /// A preset by name.
    pub fn preset(name: &str) -> Option<Self> {
        Some(match name {
            "qwen3-vl-2b" => Self::qwen3_vl_2b(),
            "qwen3-vl-4b" => Self::qwen3_vl_4b(),
            "qwen3-vl-8b" => Self::qwen3_vl_8b(),
            "qwen3-vl-tiny" => Self::tiny(),
            _ => return None,
        })
    }

    /// Reads a HF `config.json` of model_type `qwen3_vl`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Self::from_hf(&v).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// From the parsed HF config.
    pub fn from_hf(v: &Value) -> std::result::Result<Self, String> {
        match v.get("model_type").and_then(Value::as_str) {
            Some(MODEL_TYPE) => {}
            Some(other) => return Err(format!("model_type {other:?} is not Qwen3-VL's {MODEL_TYPE:?}")),
            None => return Err("no model_type".into()),
        }
        let t = v.get("text_config").ok_or("no text_config")?;
        let vis = v.get("vision_config").ok_or("no vision_config")?;
        // rope: 5.x nests everything in rope_parameters; 4.57 has rope_theta beside rope_scaling.
        let rope = t.get("rope_parameters").or_else(|| t.get("rope_scaling")).cloned().unwrap_or(Value::Null);
        let theta = rope
            .get("rope_theta")
            .or_else(|| t.get("rope_theta"))
            .and_then(Value::as_f64)
            .ok_or("text_config: no rope_theta")?;
        if let Some(kind) = rope.get("rope_type").or_else(|| rope.get("type")).and_then(Value::as_str) {
            if kind != "default" {
                return Err(format!("text_config rope_type {kind:?}: only the default M-RoPE is supported"));
            }
        }
        if rope.get("mrope_interleaved").and_then(Value::as_bool) == Some(false) {
            return Err("text_config: mrope_interleaved false (Qwen2-VL's chunked M-RoPE) is not Qwen3-VL's".into());
        }
        let section: [i64; 3] = serde_json::from_value(rope.get("mrope_section").cloned().unwrap_or(Value::Null))
            .map_err(|_| "text_config: mrope_section must be three integers")?;
        let mut tv = t.clone();
        let obj = tv.as_object_mut().ok_or("text_config is not an object")?;
        obj.insert("rope_theta".into(), theta.into());
        obj.insert("mrope_section".into(), serde_json::to_value(section).unwrap());
        if obj.get("num_key_value_heads").is_none_or(Value::is_null) {
            let nh = obj.get("num_attention_heads").cloned().unwrap_or(Value::Null);
            obj.insert("num_key_value_heads".into(), nh);
        }
        if obj.get("head_dim").is_none_or(Value::is_null) {
            let (h, nh) = (obj.get("hidden_size").and_then(Value::as_i64), obj.get("num_attention_heads").and_then(Value::as_i64));
            if let (Some(h), Some(nh)) = (h, nh) {
                obj.insert("head_dim".into(), (h / nh.max(1)).into());
            }
        }
        let text: TextConfig = serde_json::from_value(tv).map_err(|e| format!("text_config: {e}"))?;
        let vision: VisionConfig = serde_json::from_value(vis.clone()).map_err(|e| format!("vision_config: {e}"))?;
        // tie_word_embeddings sits at the top in 5.x and in the released files, in text_config in some.
        let tie = v
            .get("tie_word_embeddings")
            .or_else(|| t.get("tie_word_embeddings"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        for (key, want) in [("image_token_id", 151_655), ("vision_start_token_id", 151_652), ("vision_end_token_id", 151_653)] {
            if let Some(id) = v.get(key).and_then(Value::as_i64) {
                if id != want {
                    return Err(format!("{key} is {id}, the Qwen3-VL template's is {want}"));
                }
            }
        }
        let cfg = Self { text, vision, tie_word_embeddings: tie, id_former: false };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The HF config.json of this model (without the ID-Former, which transformers does not know).
    pub fn to_hf(&self) -> Value {
        let t = &self.text;
        let v = &self.vision;
        serde_json::json!({
            "architectures": ["Qwen3VLForConditionalGeneration"],
            "model_type": MODEL_TYPE,
            "image_token_id": 151_655, "video_token_id": 151_656,
            "vision_start_token_id": 151_652, "vision_end_token_id": 151_653,
            "tie_word_embeddings": self.tie_word_embeddings,
            "dtype": "bfloat16",
            "text_config": {
                "model_type": "qwen3_vl_text",
                "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads, "head_dim": t.head_dim, "hidden_act": t.hidden_act,
                "rms_norm_eps": t.rms_norm_eps, "max_position_embeddings": t.max_position_embeddings,
                "attention_bias": t.attention_bias, "attention_dropout": 0.0,
                "bos_token_id": 151_643, "eos_token_id": 151_645,
                "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                    "mrope_section": t.mrope_section, "mrope_interleaved": true},
            },
            "vision_config": {
                "model_type": "qwen3_vl_vision",
                "depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads, "out_hidden_size": v.out_hidden_size,
                "num_position_embeddings": v.num_position_embeddings,
                "deepstack_visual_indexes": v.deepstack_visual_indexes, "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size,
                "in_channels": v.in_channels, "hidden_act": v.hidden_act,
            },
        })
    }

    /// The relations the model code relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let (t, v) = (&self.text, &self.vision);
        if t.num_attention_heads % t.num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                t.num_attention_heads, t.num_key_value_heads
            ));
        }
        if t.mrope_section.iter().sum::<i64>() * 2 != t.head_dim {
            return Err(format!("mrope_section {:?} must sum to head_dim/2 ({})", t.mrope_section, t.head_dim / 2));
        }
        if v.out_hidden_size != t.hidden_size {
            return Err(format!("vision out_hidden_size ({}) must equal hidden_size ({})", v.out_hidden_size, t.hidden_size));
        }
        if v.hidden_size % v.num_heads != 0 || (v.hidden_size / v.num_heads) % 4 != 0 {
            return Err(format!("vision hidden_size ({}) / num_heads ({}) must be a multiple of 4", v.hidden_size, v.num_heads));
        }
        let side = (v.num_position_embeddings as f64).sqrt() as i64;
        if side * side != v.num_position_embeddings {
            return Err(format!("num_position_embeddings ({}) must be a square", v.num_position_embeddings));
        }
        if let Some(&k) = v.deepstack_visual_indexes.iter().find(|&&k| k < 0 || k >= v.depth) {
            return Err(format!("deepstack_visual_indexes has {k}, the ViT has {} blocks", v.depth));
        }
        if v.deepstack_visual_indexes.len() as i64 > t.num_hidden_layers {
            return Err("more DeepStack mergers than LLM layers".into());
        }
        if (v.patch_size, v.temporal_patch_size, v.spatial_merge_size, v.in_channels) != (16, 2, 2, 3) {
            return Err("patch 16, temporal patch 2, merge 2 and 3 channels are the layout of the data path".into());
        }
        if v.hidden_act != "gelu_pytorch_tanh" || t.hidden_act != "silu" || t.attention_bias {
            return Err("hidden_act gelu_pytorch_tanh (vision), silu (text) and no attention bias are Qwen3-VL's".into());
        }
        Ok(())
    }

    pub fn grid_side(&self) -> i64 {
        (self.vision.num_position_embeddings as f64).sqrt() as i64
    }
    pub fn vit_head_dim(&self) -> i64 {
        self.vision.hidden_size / self.vision.num_heads
    }
    /// Width of a merged visual token before the merger's MLP: 4 · d_v.
    pub fn merged_width(&self) -> i64 {
        self.vision.hidden_size * self.vision.spatial_merge_size * self.vision.spatial_merge_size
    }
}
