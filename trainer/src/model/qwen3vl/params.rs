//! Qwen3-VL's weight table: every parameter once, by its HF name (SPEC-QWEN3VL.md §7), with shape,
//! init (transformers' `_init_weights`: N(0, 0.02), norms one, biases zero), part and LLM block.

use super::config::Qwen3VlConfig;
use crate::model::params::{Builder, Init, ParamSpec, Part, STD};

pub const VISUAL: &str = "model.visual";
pub const LLM: &str = "model.language_model";

/// All parameters: ViT, main merger, DeepStack mergers, ID-Former, then the LLM (embedding, layers,
/// final norm, and `lm_head` only when untied).
pub fn param_specs(cfg: &Qwen3VlConfig) -> Vec<ParamSpec> {
    let (t, v) = (&cfg.text, &cfg.vision);
    let mut b = Builder { out: Vec::new(), part: Part::Vit, block: None };
    let (dv, fv, h) = (v.hidden_size, v.intermediate_size, t.hidden_size);
    let row = v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size;
    let (p, tp) = (v.patch_size, v.temporal_patch_size);
    b.add(format!("{VISUAL}.patch_embed.proj.weight"), &[dv, v.in_channels, tp, p, p], Init::Normal(STD));
    debug_assert_eq!(row, v.in_channels * tp * p * p);
    b.add(format!("{VISUAL}.patch_embed.proj.bias"), &[dv], Init::Zeros);
    b.add(format!("{VISUAL}.pos_embed.weight"), &[v.num_position_embeddings, dv], Init::Normal(STD));
    for i in 0..v.depth {
        let pre = format!("{VISUAL}.blocks.{i}");
        b.layer_norm(&format!("{pre}.norm1"), dv);
        b.layer_norm(&format!("{pre}.norm2"), dv);
        b.linear(&format!("{pre}.attn.qkv"), dv, 3 * dv, true, STD);
        b.linear(&format!("{pre}.attn.proj"), dv, dv, true, STD);
        b.linear(&format!("{pre}.mlp.linear_fc1"), dv, fv, true, STD);
        b.linear(&format!("{pre}.mlp.linear_fc2"), fv, dv, true, STD);
    }
    b.part = Part::Merger;
    let m = cfg.merged_width();
    let merger = |b: &mut Builder, pre: &str, norm: i64| {
        b.layer_norm(&format!("{pre}.norm"), norm);
        b.linear(&format!("{pre}.linear_fc1"), m, m, true, STD);
        b.linear(&format!("{pre}.linear_fc2"), m, h, true, STD);
    };
    merger(&mut b, &format!("{VISUAL}.merger"), dv);
    for j in 0..v.deepstack_visual_indexes.len() {
        merger(&mut b, &format!("{VISUAL}.deepstack_merger_list.{j}"), m);
    }
    if cfg.id_former {
        b.part = Part::IdFormer;
        b.mha(&format!("{VISUAL}.id_former"), h, true);
    }
    b.part = Part::Llm;
    let (q, kv) = (t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim);
    b.add(format!("{LLM}.embed_tokens.weight"), &[t.vocab_size, h], Init::Normal(STD));
    for l in 0..t.num_hidden_layers {
        b.block = Some(l as usize);
        let pre = format!("{LLM}.layers.{l}");
        b.add(format!("{pre}.input_layernorm.weight"), &[h], Init::Ones);
        b.linear(&format!("{pre}.self_attn.q_proj"), h, q, false, STD);
        b.linear(&format!("{pre}.self_attn.k_proj"), h, kv, false, STD);
        b.linear(&format!("{pre}.self_attn.v_proj"), h, kv, false, STD);
        b.linear(&format!("{pre}.self_attn.o_proj"), q, h, false, STD);
        b.add(format!("{pre}.self_attn.q_norm.weight"), &[t.head_dim], Init::Ones);
        b.add(format!("{pre}.self_attn.k_norm.weight"), &[t.head_dim], Init::Ones);
        b.add(format!("{pre}.post_attention_layernorm.weight"), &[h], Init::Ones);
        b.linear(&format!("{pre}.mlp.gate_proj"), h, t.intermediate_size, false, STD);
        b.linear(&format!("{pre}.mlp.up_proj"), h, t.intermediate_size, false, STD);
        b.linear(&format!("{pre}.mlp.down_proj"), t.intermediate_size, h, false, STD);
    }
    b.block = None;
    b.add(format!("{LLM}.norm.weight"), &[h], Init::Ones);
    if !cfg.tie_word_embeddings {
        b.linear("lm_head", h, t.vocab_size, false, STD);
    }
    b.out
}

/// Parameter counts by part.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub vision: i64,
    pub mergers: i64,
    pub llm: i64,
    pub id_former: i64,
    /// Unique tensors of the published model (ID-Former left out).
    pub total: i64,
}

pub fn count_params(cfg: &Qwen3VlConfig) -> Counts {
    let specs = param_specs(cfg);
    let sum = |p: Part| specs.iter().filter(|s| s.part == p).map(ParamSpec::numel).sum::<i64>();
    let (vit, mergers, llm, id_former) = (sum(Part::Vit), sum(Part::Merger), sum(Part::Llm), sum(Part::IdFormer));
    Counts { vision: vit + mergers, mergers, llm, id_former, total: vit + mergers + llm }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SPEC-QWEN3VL.md §1 and §8: totals of unique tensors, vision totals, and §14.3's ID-Former.
    #[test]
    fn released_sizes_have_the_specs_parameter_counts() {
        for (cfg, total, vision) in [
            (Qwen3VlConfig::qwen3_vl_2b(), 2_127_532_032, 406_957_056),
            (Qwen3VlConfig::qwen3_vl_4b(), 4_437_815_808, 415_347_712),
            (Qwen3VlConfig::qwen3_vl_8b(), 8_767_123_696, 576_388_336),
        ] {
            let c = count_params(&cfg);
            assert_eq!((c.total, c.vision), (total, vision), "{cfg:?}");
        }
        let mut c8 = Qwen3VlConfig::qwen3_vl_8b();
        c8.id_former = true;
        assert_eq!(count_params(&c8).id_former, 67_125_248);
    }
}
