//! Every parameter of the model as data: name (SPEC §1.7), shape, initialisation, role. Counting,
//! checkpoint key checks and the ZeRO layout all read this list; nothing here allocates a tensor.

use super::config::ModelConfig;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// N(0, std).
    Normal(f64),
    Zeros,
    Ones,
    /// The resampler's fixed 2-D sin-cos table.
    SinCos2d,
    /// U(-bound, bound) (LoRA's A: PEFT's Kaiming-uniform with a = sqrt 5, bound 1/sqrt(fan_in)).
    Uniform(f64),
}

/// Which part of the model a parameter belongs to (SPEC §1.6 rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    Llm,
    Vit,
    Resampler,
    IdFormer,
    /// `ln_post` and `proj`.
    PostProj,
    /// Qwen3-VL's patch merger and DeepStack mergers (trained with the LLM).
    Merger,
    /// LoRA adapter factors (not part of the published model).
    Lora,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<i64>,
    pub init: Init,
    pub part: Part,
    /// LLM block index, for block-wise scheduling; None outside the blocks.
    pub block: Option<usize>,
}

impl ParamSpec {
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }
}

/// Builds a weight table in order; a family's table is a sequence of these calls.
pub(crate) struct Builder {
    pub(crate) out: Vec<ParamSpec>,
    pub(crate) part: Part,
    pub(crate) block: Option<usize>,
}

impl Builder {
    pub(crate) fn add(&mut self, name: String, shape: &[i64], init: Init) {
        self.out.push(ParamSpec { name, shape: shape.to_vec(), init, part: self.part, block: self.block });
    }
    pub(crate) fn linear(&mut self, prefix: &str, din: i64, dout: i64, bias: bool, std: f64) {
        self.add(format!("{prefix}.weight"), &[dout, din], Init::Normal(std));
        if bias {
            self.add(format!("{prefix}.bias"), &[dout], Init::Zeros);
        }
    }
    pub(crate) fn layer_norm(&mut self, prefix: &str, d: i64) {
        self.add(format!("{prefix}.weight"), &[d], Init::Ones);
        self.add(format!("{prefix}.bias"), &[d], Init::Zeros);
    }
    /// PyTorch `nn.MultiheadAttention` layout.
    pub(crate) fn mha(&mut self, prefix: &str, d: i64, zero_out: bool) {
        self.add(format!("{prefix}.in_proj_weight"), &[3 * d, d], Init::Normal(0.02));
        self.add(format!("{prefix}.in_proj_bias"), &[3 * d], Init::Zeros);
        let out_init = if zero_out { Init::Zeros } else { Init::Normal(0.02) };
        self.add(format!("{prefix}.out_proj.weight"), &[d, d], out_init);
        self.add(format!("{prefix}.out_proj.bias"), &[d], Init::Zeros);
    }
}

pub(crate) const STD: f64 = 0.02;

/// All parameters in a fixed order: vision tower, resampler (+ ID-Former), ln_post/proj, then the LLM
/// (wte, blocks, ln_f, lm_head).
pub fn param_specs(cfg: &ModelConfig) -> Vec<ParamSpec> {
    let mut b = Builder { out: Vec::new(), part: Part::Vit, block: None };
    let v = &cfg.visual;
    let (w, d) = (v.width, cfg.hidden_size);
    // Vision tower.
    b.add("transformer.visual.conv1.weight".into(), &[w, 3, v.patch_size, v.patch_size], Init::Normal(STD));
    b.add("transformer.visual.positional_embedding".into(), &[256, w], Init::Normal(STD));
    b.layer_norm("transformer.visual.ln_pre", w);
    let vff = cfg.vit_mlp_width();
    for i in 0..v.layers {
        let p = format!("transformer.visual.transformer.resblocks.{i}");
        b.layer_norm(&format!("{p}.ln_1"), w);
        b.layer_norm(&format!("{p}.ln_2"), w);
        b.linear(&format!("{p}.attn.in_proj"), w, 3 * w, true, STD);
        b.linear(&format!("{p}.attn.out_proj"), w, w, true, STD);
        b.linear(&format!("{p}.mlp.c_fc"), w, vff, true, STD);
        b.linear(&format!("{p}.mlp.c_proj"), vff, w, true, STD);
    }
    // Resampler.
    b.part = Part::Resampler;
    let ap = "transformer.visual.attn_pool";
    b.add(format!("{ap}.query"), &[v.n_queries, d], Init::Normal(STD));
    b.add(format!("{ap}.pos_embed"), &[v.n_queries, d], Init::SinCos2d);
    b.linear(&format!("{ap}.kv_proj"), w, d, false, STD);
    b.layer_norm(&format!("{ap}.ln_q"), d);
    b.layer_norm(&format!("{ap}.ln_kv"), d);
    b.mha(&format!("{ap}.attn"), d, false);
    if cfg.id_former {
        b.part = Part::IdFormer;
        b.mha(&format!("{ap}.attn1"), d, true);
    }
    b.part = Part::PostProj;
    b.layer_norm("transformer.visual.ln_post", d);
    b.add("transformer.visual.proj".into(), &[d, d], Init::Normal(STD));
    // Language model.
    b.part = Part::Llm;
    let ff = cfg.mlp_width();
    let c_proj_std = STD / (2.0 * cfg.num_hidden_layers as f64).sqrt();
    b.add("transformer.wte.weight".into(), &[cfg.vocab_size, d], Init::Normal(STD));
    for i in 0..cfg.num_hidden_layers {
        b.block = Some(i as usize);
        let p = format!("transformer.h.{i}");
        b.add(format!("{p}.ln_1.weight"), &[d], Init::Ones);
        b.linear(&format!("{p}.attn.c_attn"), d, 3 * d, true, STD);
        b.linear(&format!("{p}.attn.c_proj"), d, d, false, c_proj_std);
        b.add(format!("{p}.ln_2.weight"), &[d], Init::Ones);
        b.linear(&format!("{p}.mlp.w1"), d, ff, false, STD);
        b.linear(&format!("{p}.mlp.w2"), d, ff, false, STD);
        b.linear(&format!("{p}.mlp.c_proj"), ff, d, false, c_proj_std);
    }
    b.block = None;
    b.add("transformer.ln_f.weight".into(), &[d], Init::Ones);
    b.linear("lm_head", d, cfg.vocab_size, false, STD);
    // LoRA factors last, so that the base model's tensors (and their seeded init) do not depend on them.
    if let Some(l) = &cfg.lora {
        b.part = Part::Lora;
        for i in 0..cfg.num_hidden_layers {
            b.block = Some(i as usize);
            for m in super::lora::BLOCK_LINEARS {
                let module = format!("transformer.h.{i}.{m}");
                if l.adapts(&module) {
                    let w = b.out.iter().find(|s| s.name == format!("{module}.weight")).expect("block linear").shape.clone();
                    let (dout, din) = (w[0], w[1]);
                    b.add(format!("{module}.lora_A.weight"), &[l.r, din], Init::Uniform(1.0 / (din as f64).sqrt()));
                    b.add(format!("{module}.lora_B.weight"), &[dout, l.r], Init::Zeros);
                }
            }
        }
        b.block = None;
    }
    b.out
}

/// Parameter counts by part (SPEC §1.6), computed from the config alone.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ParamCounts {
    pub llm: i64,
    pub vit: i64,
    pub resampler: i64,
    pub post_proj: i64,
    pub id_former: i64,
    pub whole_model: i64,
    pub trainable_finetune: i64,
}

pub fn count_params(cfg: &ModelConfig) -> ParamCounts {
    let specs = param_specs(cfg);
    let sum = |p: Part| specs.iter().filter(|s| s.part == p).map(ParamSpec::numel).sum::<i64>();
    let (llm, vit, resampler, post_proj, id_former) =
        (sum(Part::Llm), sum(Part::Vit), sum(Part::Resampler), sum(Part::PostProj), sum(Part::IdFormer));
    ParamCounts {
        llm,
        vit,
        resampler,
        post_proj,
        id_former,
        whole_model: llm + vit + resampler + post_proj,
        trainable_finetune: llm + resampler + id_former,
    }
}
