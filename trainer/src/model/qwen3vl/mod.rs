//! Qwen3-VL (2B / 4B / 8B dense, SPEC-QWEN3VL.md) as idavlm's second model family, with IDA-VLM's
//! ID-Former after the main merger (§14.3): the weight table ([`params`]), the HF config
//! ([`config`]), the vision tower and mergers ([`vision`]), the Qwen3 decoder and M-RoPE ([`text`]),
//! and [`Qwen3Vl`], the plain model over a [`ParamSet`], exact to transformers' own.

pub mod config;
pub mod params;
pub mod text;
pub mod vision;

use std::path::Path;

use tch::{Device, Kind, Tensor};

pub use config::Qwen3VlConfig;
use idavlm_shards::chat::{image_roles, ImageRole};
use idavlm_shards::qwen3vl::positions::{rope_index, Grid};
use idavlm_shards::qwen3vl::{IMAGE_PAD, VISION_START};
use params::{LLM, VISUAL};
use text::{DecoderLayer, MRope};
use vision::{Layout, Merger, VisionBlock, VisionTower};

use crate::error::{Error, Result};
use crate::model::fused::upload;
use crate::model::layers::{LayerNorm, Linear, Mha, RmsNorm};
use crate::model::{Getter, ParamSet};

/// One micro-batch as the model takes it.
pub struct Input {
    /// (B, S) int64, one `<|image_pad|>` per merged visual token.
    pub input_ids: Tensor,
    /// (B, S) int64, −100 where not supervised (unshifted).
    pub labels: Tensor,
    /// (3, B, S) int64: the t, h, w rows of M-RoPE, per sample.
    pub positions: Tensor,
    /// (Σ t·h·w, 1536) f32 patch rows of every image of the micro-batch, in order of appearance.
    pub pixels: Tensor,
    pub grids: Vec<Grid>,
    pub image_roles: Vec<ImageRole>,
    /// Each image's sample (the ID-Former's group).
    pub image_groups: Vec<usize>,
    /// A packed row's sample lengths; empty when every row is one sample.
    pub seq_lens: Vec<usize>,
}

/// One sample on the host: ids, labels, its images' grids and patch rows.
pub struct Sample<'a> {
    pub ids: &'a [u32],
    pub labels: &'a [i64],
    pub grids: &'a [Grid],
    pub pixels: &'a [f32],
}

impl Input {
    /// The model input of equal-length samples, one per row: positions from the template's rule,
    /// image roles from the text ("Name is <|vision_start|>" marks a reference).
    pub fn from_samples(samples: &[Sample], device: Device) -> Result<Self> {
        let b = samples.len() as i64;
        let s = samples.first().map_or(0, |x| x.ids.len()) as i64;
        let (mut ids, mut labels, mut pos) = (vec![], vec![], [vec![], vec![], vec![]]);
        let (mut grids, mut pixels, mut roles, mut groups) = (vec![], vec![], vec![], vec![]);
        for (row, x) in samples.iter().enumerate() {
            if x.ids.len() as i64 != s || x.labels.len() != x.ids.len() {
                return Err(Error::Other(format!("sample {row}: rows of one micro-batch must have equal lengths")));
            }
            let p = rope_index(x.ids, x.grids, 2).map_err(|e| Error::Other(format!("sample {row}: {e}")))?;
            for (all, r) in pos.iter_mut().zip(p) {
                all.extend(r);
            }
            let starts: Vec<usize> = (0..x.ids.len()).filter(|&i| x.ids[i] == VISION_START).collect();
            roles.extend(image_roles(x.ids, &starts));
            groups.extend(std::iter::repeat_n(row, x.grids.len()));
            ids.extend(x.ids.iter().map(|&t| t as i64));
            labels.extend_from_slice(x.labels);
            grids.extend_from_slice(x.grids);
            pixels.extend_from_slice(x.pixels);
        }
        let rows = pixels.len() as i64 / 1536;
        let pos: Vec<i64> = pos.concat();
        Ok(Self {
            input_ids: upload(&Tensor::from_slice(&ids).view([b, s]), device),
            labels: upload(&Tensor::from_slice(&labels).view([b, s]), device),
            positions: upload(&Tensor::from_slice(&pos).view([3, b, s]), device),
            pixels: upload(&Tensor::from_slice(&pixels).view([rows, 1536]), device),
            grids,
            image_roles: roles,
            image_groups: groups,
            seq_lens: vec![],
        })
    }
}

pub struct Qwen3Vl {
    pub cfg: Qwen3VlConfig,
    pub vision: VisionTower,
    /// §14.3: test images' merger tokens attend to their sample's reference tokens.
    pub id_former: Option<Mha>,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `embed_tokens` itself when tied.
    pub lm_head: Tensor,
    /// Run the ViT with autograd (its gradients exist; the stages keep it frozen, the parity test
    /// checks them).
    pub train_vision: bool,
}

fn lin(g: Getter, p: &str, bias: bool) -> Linear {
    Linear { weight: g(&format!("{p}.weight")), bias: bias.then(|| g(&format!("{p}.bias"))), lora: None }
}
fn ln(g: Getter, p: &str) -> LayerNorm {
    LayerNorm { weight: g(&format!("{p}.weight")), bias: g(&format!("{p}.bias")), eps: 1e-6 }
}

impl Qwen3Vl {
    /// The model's view over `params` (tensors shared, not copied).
    pub fn new(cfg: &Qwen3VlConfig, params: &ParamSet) -> Self {
        let g = |n: &str| params.get(n).shallow_clone();
        let (t, v) = (&cfg.text, &cfg.vision);
        let width = cfg.merged_width();
        let merger = |p: &str, postshuffle: bool| Merger {
            norm: ln(&g, &format!("{p}.norm")),
            fc1: lin(&g, &format!("{p}.linear_fc1"), true),
            fc2: lin(&g, &format!("{p}.linear_fc2"), true),
            postshuffle,
            width,
        };
        let blocks = (0..v.depth)
            .map(|i| {
                let p = format!("{VISUAL}.blocks.{i}");
                VisionBlock {
                    norm1: ln(&g, &format!("{p}.norm1")),
                    norm2: ln(&g, &format!("{p}.norm2")),
                    qkv: lin(&g, &format!("{p}.attn.qkv"), true),
                    proj: lin(&g, &format!("{p}.attn.proj"), true),
                    fc1: lin(&g, &format!("{p}.mlp.linear_fc1"), true),
                    fc2: lin(&g, &format!("{p}.mlp.linear_fc2"), true),
                    heads: v.num_heads,
                }
            })
            .collect();
        let vision = VisionTower {
            patch_weight: g(&format!("{VISUAL}.patch_embed.proj.weight")).reshape([v.hidden_size, -1]),
            patch_bias: g(&format!("{VISUAL}.patch_embed.proj.bias")),
            pos_embed: g(&format!("{VISUAL}.pos_embed.weight")),
            blocks,
            merger: merger(&format!("{VISUAL}.merger"), false),
            deepstack: (0..v.deepstack_visual_indexes.len())
                .map(|j| merger(&format!("{VISUAL}.deepstack_merger_list.{j}"), true))
                .collect(),
            deepstack_indexes: v.deepstack_visual_indexes.clone(),
        };
        let id_former = cfg.id_former.then(|| {
            let p = format!("{VISUAL}.id_former");
            Mha {
                in_proj_weight: g(&format!("{p}.in_proj_weight")),
                in_proj_bias: g(&format!("{p}.in_proj_bias")),
                out_proj: lin(&g, &format!("{p}.out_proj"), true),
                heads: Self::id_former_heads(cfg),
            }
        });
        let eps = t.rms_norm_eps;
        let layers = (0..t.num_hidden_layers)
            .map(|l| {
                let p = format!("{LLM}.layers.{l}");
                let norm = |n: &str| RmsNorm { weight: g(&format!("{p}.{n}.weight")), eps };
                DecoderLayer {
                    input_layernorm: norm("input_layernorm"),
                    q_proj: lin(&g, &format!("{p}.self_attn.q_proj"), false),
                    k_proj: lin(&g, &format!("{p}.self_attn.k_proj"), false),
                    v_proj: lin(&g, &format!("{p}.self_attn.v_proj"), false),
                    o_proj: lin(&g, &format!("{p}.self_attn.o_proj"), false),
                    q_norm: norm("self_attn.q_norm"),
                    k_norm: norm("self_attn.k_norm"),
                    post_attention_layernorm: norm("post_attention_layernorm"),
                    gate_proj: lin(&g, &format!("{p}.mlp.gate_proj"), false),
                    up_proj: lin(&g, &format!("{p}.mlp.up_proj"), false),
                    down_proj: lin(&g, &format!("{p}.mlp.down_proj"), false),
                    heads: t.num_attention_heads,
                    kv_heads: t.num_key_value_heads,
                    head_dim: t.head_dim,
                }
            })
            .collect();
        let embed_tokens = g(&format!("{LLM}.embed_tokens.weight"));
        let lm_head = if cfg.tie_word_embeddings { embed_tokens.shallow_clone() } else { g("lm_head.weight") };
        Self {
            cfg: cfg.clone(),
            vision,
            id_former,
            embed_tokens,
            layers,
            norm: RmsNorm { weight: g(&format!("{LLM}.norm.weight")), eps },
            lm_head,
            train_vision: false,
        }
    }

    /// §14.3: width H in heads of 128 (at least one).
    pub fn id_former_heads(cfg: &Qwen3VlConfig) -> i64 {
        (cfg.text.hidden_size / 128).max(1)
    }

    /// Loads a HF checkpoint folder (config.json + safetensors) or weights for `cfg`.
    pub fn load(path: &Path, cfg: &Qwen3VlConfig, device: Device, kind: Kind) -> Result<ParamSet> {
        let ignored: &[&str] = if cfg.tie_word_embeddings { &["lm_head.weight"] } else { &[] };
        let (params, _) = crate::model::weights::load_specs(path, params::param_specs(cfg), ignored, device, kind)?;
        let beside = path.join(ID_FORMER_FILE);
        if cfg.id_former && beside.is_file() {
            // The ID-Former exported beside the model replaces the fresh one.
            let loaded = Tensor::read_safetensors(&beside).map_err(|e| Error::weights(&beside, e.to_string()))?;
            for (name, t) in loaded {
                let i = params.position(&name).ok_or_else(|| Error::weights(&beside, format!("unexpected key {name}")))?;
                let mut dst = params.tensors[i].shallow_clone();
                if dst.size() != t.size() {
                    return Err(Error::weights(&beside, format!("{name}: shape {:?}, the config expects {:?}", t.size(), dst.size())));
                }
                tch::no_grad(|| dst.copy_(&t));
            }
        }
        Ok(params)
    }

    pub fn device(&self) -> Device {
        self.embed_tokens.device()
    }

    /// The ID-Former over the merger's tokens (T, H), image by image: each test image's tokens X become
    /// X + MHA(X, M, M) with M its sample's reference tokens, gradient stopped.
    fn apply_id_former(&self, tokens: Tensor, input: &Input) -> Tensor {
        let Some(mha) = &self.id_former else { return tokens };
        let counts: Vec<i64> = input.grids.iter().map(|g| g.tokens(2) as i64).collect();
        let mut offsets = vec![0i64];
        for c in &counts {
            offsets.push(offsets.last().unwrap() + c);
        }
        let slice = |i: usize| tokens.narrow(0, offsets[i], counts[i]);
        let mut parts: Vec<Tensor> = Vec::with_capacity(counts.len());
        for i in 0..counts.len() {
            if input.image_roles[i] != ImageRole::Test {
                parts.push(slice(i));
                continue;
            }
            let refs: Vec<Tensor> = (0..counts.len())
                .filter(|&j| input.image_groups[j] == input.image_groups[i] && input.image_roles[j] == ImageRole::Reference)
                .map(slice)
                .collect();
            if refs.is_empty() {
                parts.push(slice(i));
                continue;
            }
            let mem = Tensor::cat(&refs, 0).detach().unsqueeze(0);
            let x = slice(i).unsqueeze(0);
            parts.push((mha.forward(&x, &mem, &mem) + &x).squeeze_dim(0));
        }
        Tensor::cat(&parts, 0)
    }

    /// Input embeddings with the visual tokens scattered into the `<|image_pad|>` positions, those
    /// positions (flat over B·S) and the DeepStack features to add after the first layers.
    pub fn embed(&self, input: &Input) -> (Tensor, Option<(Tensor, Vec<Tensor>)>) {
        let (b, s) = input.input_ids.size2().expect("input_ids (B, S)");
        let h = self.cfg.text.hidden_size;
        let x = Tensor::embedding(&self.embed_tokens, &input.input_ids, -1, false, false);
        if input.grids.is_empty() {
            return (x, None);
        }
        let layout = Layout::new(&self.cfg, &input.grids, self.device());
        let (last, taps) = if self.train_vision {
            self.vision.encode(&input.pixels, &layout)
        } else {
            tch::no_grad(|| self.vision.encode(&input.pixels, &layout))
        };
        let out = self.vision.merge(&last, &taps);
        let tokens = self.apply_id_former(out.tokens, input);
        let at = input.input_ids.reshape([b * s]).eq(IMAGE_PAD as i64).nonzero().squeeze_dim(1);
        assert_eq!(at.size()[0], tokens.size()[0], "image features and <|image_pad|> tokens do not match");
        let x = x.reshape([b * s, h]).index_copy(0, &at, &tokens.to_kind(x.kind())).reshape([b, s, h]);
        (x, Some((at, out.deepstack)))
    }

    /// The M-RoPE tables of a micro-batch.
    pub fn rope(&self, input: &Input, kind: Kind) -> MRope {
        let seg = (!input.seq_lens.is_empty())
            .then(|| crate::model::attention::Segments::new(&input.seq_lens, self.device()));
        MRope::new(&self.cfg.text, &input.positions, kind, seg)
    }

    /// The decoder's final hidden states (B, S, H), after the last norm.
    pub fn hidden(&self, input: &Input) -> Tensor {
        let (mut x, visual) = self.embed(input);
        let rope = self.rope(input, x.kind());
        let (b, s, h) = x.size3().expect("(B, S, H)");
        for (l, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &rope);
            if let Some((at, feats)) = &visual {
                if let Some(f) = feats.get(l) {
                    // DeepStack: hidden[visual positions] += feature, a plain add.
                    x = x.reshape([b * s, h]).index_add(0, at, &f.to_kind(x.kind())).reshape([b, s, h]);
                }
            }
        }
        self.norm.forward(&x)
    }

    /// Logits (B, S, V).
    pub fn forward_logits(&self, input: &Input) -> Tensor {
        self.hidden(input).linear::<Tensor>(&self.lm_head, None)
    }

    /// Shifted cross-entropy in f32, mean over supervised tokens (HF's `ForCausalLMLoss`).
    pub fn forward_loss(&self, input: &Input) -> Tensor {
        crate::model::QwenVl::loss(&self.forward_logits(input), &input.labels)
    }
}

/// The file beside an exported model that holds the ID-Former (transformers' Qwen3-VL has no such
/// module: the folder loads there as the base model, and idavlm loads both).
pub const ID_FORMER_FILE: &str = "id_former.safetensors";

/// Writes `params` as a HF Qwen3-VL folder that `Qwen3VLForConditionalGeneration.from_pretrained`
/// loads: config.json (no ID-Former key), the safetensors in `kind` (no `lm_head` when tied), and the
/// ID-Former's tensors, when the model has them, in [`ID_FORMER_FILE`]. Returns the names written
/// beside the model.
pub fn export_hf(cfg: &Qwen3VlConfig, params: &ParamSet, dir: &Path, kind: Kind, max_shard_bytes: usize) -> Result<Vec<String>> {
    use crate::model::Part;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let (mut base, mut extra) = (Vec::new(), Vec::new());
    for (s, t) in params.iter() {
        match s.part {
            Part::IdFormer => extra.push((s.name.clone(), t.shallow_clone())),
            Part::Lora => {}
            _ => base.push((s.name.clone(), t.shallow_clone())),
        }
    }
    crate::model::weights::save_hf(&base, dir, kind, max_shard_bytes)?;
    let cfg_path = dir.join("config.json");
    let text = serde_json::to_vec_pretty(&cfg.to_hf()).expect("config json");
    std::fs::write(&cfg_path, text).map_err(|e| Error::io(&cfg_path, e))?;
    if !extra.is_empty() {
        let host: Vec<(String, Tensor)> = extra.iter().map(|(n, t)| (n.clone(), t.to_kind(kind).to_device(Device::Cpu))).collect();
        let meta = [("note".to_string(), "IDA-VLM ID-Former: not part of Qwen3-VL; idavlm loads it beside the model".to_string())]
            .into_iter()
            .collect();
        crate::model::weights::write_safetensors(&dir.join(ID_FORMER_FILE), &host, &meta)?;
    }
    Ok(extra.into_iter().map(|(n, _)| n).collect())
}
