//! Qwen-VL-Chat (+ the optional ID-Former) as a plain model: no ranks, no buffers, no optimiser.
//!
//! [`ParamSet`] owns the named tensors (names of SPEC §1.7, order of [`params::param_specs`]);
//! [`QwenVl`] is a view over them that knows the forward pass. The training step drives the pieces
//! separately (vision, stem, each block, head) so that it can checkpoint activations and schedule
//! communication block by block; [`QwenVl::forward_loss`] runs them in one go.

pub mod attention;
pub mod choice;
pub mod config;
pub mod fused;
pub mod layers;
pub mod llm;
pub mod lora;
pub mod params;
pub mod qwen3vl;
pub mod resampler;
pub mod vision;
pub mod weights;

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

pub use config::{ModelConfig, VisualConfig};
use idavlm_shards::chat::ImageRole;
use idavlm_shards::tokenizer::IMAGE_BODY;
use layers::{LayerNorm, Linear, Mha, RmsNorm};
use llm::{KvCache, QwenBlock, Rope};
pub use params::{count_params, param_specs, Init, ParamCounts, ParamSpec, Part};
use resampler::Resampler;
use vision::{VisionTower, VitBlock};

/// The model's tensors by name, in spec order.
pub struct ParamSet {
    pub specs: Vec<ParamSpec>,
    pub tensors: Vec<Tensor>,
    index: HashMap<String, usize>,
}

impl ParamSet {
    pub fn from_tensors(specs: Vec<ParamSpec>, tensors: Vec<Tensor>) -> Self {
        assert_eq!(specs.len(), tensors.len());
        let index = specs.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
        Self { specs, tensors, index }
    }

    /// Fresh weights per the init rules of SPEC §1.1/§1.5, deterministic in `seed` for a device type.
    /// Each tensor is drawn in f32 in spec order, then cast to `kind`.
    pub fn init(cfg: &ModelConfig, device: Device, kind: Kind, seed: i64) -> Self {
        Self::init_specs(param_specs(cfg), device, kind, seed)
    }

    /// Fresh weights of any family's table, drawn as [`ParamSet::init`] does.
    pub fn init_specs(specs: Vec<ParamSpec>, device: Device, kind: Kind, seed: i64) -> Self {
        tch::manual_seed(seed);
        let tensors = tch::no_grad(|| specs.iter().map(|s| init_tensor(s, device).to_kind(kind)).collect());
        Self::from_tensors(specs, tensors)
    }

    pub fn get(&self, name: &str) -> &Tensor {
        &self.tensors[*self.index.get(name).unwrap_or_else(|| panic!("no parameter {name}"))]
    }

    pub fn position(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&ParamSpec, &Tensor)> {
        self.specs.iter().zip(&self.tensors)
    }
}

/// One parameter's initial value in f32 on `device`.
pub fn init_tensor(spec: &ParamSpec, device: Device) -> Tensor {
    let opts = (Kind::Float, device);
    match spec.init {
        Init::Normal(std) => Tensor::randn(spec.shape.as_slice(), opts) * std,
        Init::Zeros => Tensor::zeros(spec.shape.as_slice(), opts),
        Init::Ones => Tensor::ones(spec.shape.as_slice(), opts),
        Init::Uniform(bound) => Tensor::rand(spec.shape.as_slice(), opts) * (2.0 * bound) - bound,
        Init::SinCos2d => {
            let (n, d) = (spec.shape[0], spec.shape[1]);
            let grid = (n as f64).sqrt().round() as i64;
            Tensor::from_slice(&layers::sincos_2d(d, grid)).reshape([n, d]).to_device(device)
        }
    }
}

/// Model inputs of one micro-batch.
pub struct ModelInput {
    /// (B, S) int64.
    pub input_ids: Tensor,
    /// (B, S) int64, -100 where not supervised.
    pub labels: Tensor,
    /// (N, 3, H, W) normalised pixels of all images of the micro-batch, in order of appearance per row.
    pub pixels: Tensor,
    pub image_rows: Vec<usize>,
    /// Index of each image's `<img>` token in its row.
    pub image_starts: Vec<usize>,
    pub image_roles: Vec<ImageRole>,
    /// Each image's sample, by which the ID-Former groups references and test images: the row when
    /// rows are samples, the sample's place in the row when the row is packed.
    pub image_groups: Vec<usize>,
    /// A packed micro-batch (one row of several samples): the samples' lengths, in order; empty when
    /// every row is one sample.
    pub seq_lens: Vec<usize>,
    /// The positions (flattened over rows, each row's last position left out) whose next label is
    /// supervised, made on the host with the labels ([`ModelInput::supervised_positions`]); None: the
    /// head finds them on the device, which makes the host wait for the GPU.
    pub supervised: Option<Tensor>,
}

impl ModelInput {
    /// The value of [`ModelInput::supervised`] for (B, S) row-major host labels.
    pub fn supervised_positions(labels: &[i64], b: usize, s: usize, device: Device) -> Tensor {
        let rows: Vec<i64> = (0..b)
            .flat_map(|r| (0..s - 1).filter(move |&t| labels[r * s + t + 1] != -100).map(move |t| (r * (s - 1) + t) as i64))
            .collect();
        fused::upload(&Tensor::from_slice(&rows), device)
    }

    /// The same inputs, tensors shared.
    pub fn shallow_clone(&self) -> Self {
        Self {
            supervised: self.supervised.as_ref().map(|t| t.shallow_clone()),
            input_ids: self.input_ids.shallow_clone(),
            labels: self.labels.shallow_clone(),
            pixels: self.pixels.shallow_clone(),
            image_rows: self.image_rows.clone(),
            image_starts: self.image_starts.clone(),
            image_roles: self.image_roles.clone(),
            image_groups: self.image_groups.clone(),
            seq_lens: self.seq_lens.clone(),
        }
    }
}

/// Everything before the LLM blocks: the frozen vision tower, the resampler (+ ID-Former), ln_post,
/// proj and the token embedding.
pub struct Stem {
    pub cfg: ModelConfig,
    pub vision: VisionTower,
    pub resampler: Resampler,
    pub ln_post: LayerNorm,
    pub proj: Tensor,
    pub wte: Tensor,
}

/// The final RMSNorm and lm_head.
pub struct Head {
    pub ln_f: RmsNorm,
    pub lm_head: Linear,
}

pub type Getter<'a> = &'a dyn Fn(&str) -> Tensor;

fn lin(g: Getter, p: &str, bias: bool) -> Linear {
    Linear { weight: g(&format!("{p}.weight")), bias: bias.then(|| g(&format!("{p}.bias"))), lora: None }
}
fn ln(g: Getter, p: &str) -> LayerNorm {
    LayerNorm { weight: g(&format!("{p}.weight")), bias: g(&format!("{p}.bias")), eps: 1e-6 }
}
fn mha(g: Getter, p: &str, heads: i64) -> Mha {
    Mha {
        in_proj_weight: g(&format!("{p}.in_proj_weight")),
        in_proj_bias: g(&format!("{p}.in_proj_bias")),
        out_proj: lin(g, &format!("{p}.out_proj"), true),
        heads,
    }
}

impl Stem {
    pub fn new(cfg: &ModelConfig, g: Getter) -> Self {
        let v = &cfg.visual;
        let vision = VisionTower {
            conv1: g("transformer.visual.conv1.weight"),
            positional_embedding: g("transformer.visual.positional_embedding"),
            ln_pre: ln(g, "transformer.visual.ln_pre"),
            blocks: (0..v.layers)
                .map(|i| {
                    let p = format!("transformer.visual.transformer.resblocks.{i}");
                    VitBlock {
                        ln_1: ln(g, &format!("{p}.ln_1")),
                        ln_2: ln(g, &format!("{p}.ln_2")),
                        in_proj: lin(g, &format!("{p}.attn.in_proj"), true),
                        out_proj: lin(g, &format!("{p}.attn.out_proj"), true),
                        c_fc: lin(g, &format!("{p}.mlp.c_fc"), true),
                        c_proj: lin(g, &format!("{p}.mlp.c_proj"), true),
                        heads: v.heads,
                    }
                })
                .collect(),
            patch: v.patch_size,
        };
        let ap = "transformer.visual.attn_pool";
        let rh = cfg.resampler_heads();
        let resampler = Resampler {
            query: g(&format!("{ap}.query")),
            pos_embed: g(&format!("{ap}.pos_embed")),
            kv_proj: lin(g, &format!("{ap}.kv_proj"), false),
            ln_q: ln(g, &format!("{ap}.ln_q")),
            ln_kv: ln(g, &format!("{ap}.ln_kv")),
            attn: mha(g, &format!("{ap}.attn"), rh),
            attn1: cfg.id_former.then(|| mha(g, &format!("{ap}.attn1"), rh)),
        };
        Self {
            cfg: cfg.clone(),
            vision,
            resampler,
            ln_post: ln(g, "transformer.visual.ln_post"),
            proj: g("transformer.visual.proj"),
            wte: g("transformer.wte.weight"),
        }
    }

    pub fn dtype(&self) -> Kind {
        self.wte.kind()
    }

    /// Frozen vision tower: pixels -> ViT features (N, P, width). Callers run it under `no_grad`.
    pub fn vision_features(&self, pixels: &Tensor) -> Tensor {
        self.vision.forward(&pixels.to_kind(self.vision.conv1.kind()))
    }

    /// ViT features -> visual vectors (N, 256, D): resampler (+ ID-Former, which groups the images by
    /// `groups`: one group per sample), ln_post, proj.
    pub fn visual_tokens(&self, feats: &Tensor, groups: &[usize], roles: &[ImageRole]) -> Tensor {
        let out = self.resampler.forward(&feats.to_kind(self.dtype()), groups, roles);
        self.ln_post.forward(&out.to_kind(self.ln_post.weight.kind())).matmul(&self.proj).to_kind(self.dtype())
    }

    /// Token embeddings (B, S, D) with each image span's 256 body positions replaced by its visual vectors.
    pub fn embed(&self, input_ids: &Tensor, visual: Option<&Tensor>, rows: &[usize], starts: &[usize]) -> Tensor {
        let (b, s) = input_ids.size2().expect("input_ids (B, S)");
        let d = self.cfg.hidden_size;
        let emb = Tensor::embedding(&self.wte, input_ids, -1, false, false);
        let Some(visual) = visual else { return emb };
        if rows.is_empty() {
            return emb;
        }
        let body = IMAGE_BODY as i64;
        let idx: Vec<i64> = rows
            .iter()
            .zip(starts)
            .flat_map(|(&r, &st)| {
                let base = r as i64 * s + st as i64 + 1;
                base..base + body
            })
            .collect();
        let idx = fused::upload(&Tensor::from_slice(&idx), emb.device());
        emb.reshape([b * s, d]).index_copy(0, &idx, &visual.reshape([-1, d]).to_kind(emb.kind())).reshape([b, s, d])
    }

    /// Embeddings of a whole micro-batch including the vision path (vision under no_grad: it is frozen).
    pub fn forward(&self, input: &ModelInput) -> Tensor {
        let visual = (!input.image_rows.is_empty()).then(|| {
            let feats = tch::no_grad(|| self.vision_features(&input.pixels));
            self.visual_tokens(&feats, &input.image_groups, &input.image_roles)
        });
        self.embed(&input.input_ids, visual.as_ref(), &input.image_rows, &input.image_starts)
    }
}

impl Head {
    pub fn new(cfg: &ModelConfig, g: Getter) -> Self {
        Self {
            ln_f: RmsNorm { weight: g("transformer.ln_f.weight"), eps: cfg.layer_norm_epsilon },
            lm_head: lin(g, "lm_head", false),
        }
    }

    /// (B, S, D) -> logits (B, S, V).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.lm_head.forward(&self.ln_f.forward(x))
    }

    /// The shifted cross-entropy computed only where it is non-zero: the hidden states whose next label
    /// is supervised go through ln_f and lm_head; mean over those tokens (0 when there are none). Equal
    /// to [`QwenVl::loss`] on full logits, at a fraction of the lm_head cost.
    /// `supervised`: those positions when the host knows them (see [`ModelInput::supervised`]).
    pub fn loss(&self, x: &Tensor, labels: &Tensor, supervised: Option<&Tensor>) -> Tensor {
        let (b, s, d) = x.size3().expect("(B, S, D)");
        let target = labels.narrow(1, 1, s - 1).reshape([b * (s - 1)]);
        let keep = match supervised {
            Some(k) => k.shallow_clone(),
            None => target.ne(-100).nonzero().squeeze_dim(1),
        };
        let n = keep.size()[0];
        if n == 0 {
            // Keeps the graph connected so backward still runs (and yields zero gradients).
            return x.sum(Kind::Float) * 0.0;
        }
        let h = x.narrow(1, 0, s - 1).reshape([b * (s - 1), d]).index_select(0, &keep);
        let logits = self.forward(&h);
        let target = target.index_select(0, &keep);
        if fused::runs_on(&logits) {
            // One kernel each way over the logits as they are (no f32 copy, no saved log-probabilities).
            return fused::cross_entropy_rows(&logits.contiguous(), &target).mean(Kind::Float);
        }
        Self::cross_entropy_reference(&logits, &target)
    }

    /// The loss of rows of logits against their (all supervised) targets as libtorch computes it: f32
    /// log-softmax, mean over rows. The reference of [`fused::cross_entropy_rows`].
    pub fn cross_entropy_reference(logits: &Tensor, target: &Tensor) -> Tensor {
        logits.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(target, None, tch::Reduction::Mean, -100, 0.0)
    }
}

pub struct QwenVl {
    pub cfg: ModelConfig,
    pub stem: Stem,
    pub blocks: Vec<QwenBlock>,
    pub head: Head,
}

impl QwenVl {
    /// Builds the model's view over `params` (tensors are shared, not copied).
    pub fn new(cfg: &ModelConfig, params: &ParamSet) -> Self {
        let g = |n: &str| params.get(n).shallow_clone();
        Self {
            cfg: cfg.clone(),
            stem: Stem::new(cfg, &g),
            blocks: (0..cfg.num_hidden_layers).map(|i| Self::block_from(cfg, i as usize, &g)).collect(),
            head: Head::new(cfg, &g),
        }
    }

    /// LLM block `i` over tensors found by name (used to build blocks over flat ZeRO buffers too), with
    /// the LoRA adapters of `cfg.lora`.
    pub fn block_from(cfg: &ModelConfig, i: usize, g: Getter) -> QwenBlock {
        let p = format!("transformer.h.{i}");
        let eps = cfg.layer_norm_epsilon;
        let lin = |m: &str, bias: bool| {
            let module = format!("{p}.{m}");
            let mut l = lin(g, &module, bias);
            if let Some(spec) = cfg.lora.as_ref().filter(|s| s.adapts(&module)) {
                l.lora = Some(lora::Adapter {
                    a: g(&format!("{module}.lora_A.weight")),
                    b: g(&format!("{module}.lora_B.weight")),
                    scale: spec.scale(),
                    dropout: spec.dropout,
                });
            }
            l
        };
        QwenBlock {
            ln_1: RmsNorm { weight: g(&format!("{p}.ln_1.weight")), eps },
            c_attn: lin("attn.c_attn", true),
            c_proj: lin("attn.c_proj", false),
            ln_2: RmsNorm { weight: g(&format!("{p}.ln_2.weight")), eps },
            w1: lin("mlp.w1", false),
            w2: lin("mlp.w2", false),
            mlp_c_proj: lin("mlp.c_proj", false),
            heads: cfg.num_attention_heads,
        }
    }

    pub fn dtype(&self) -> Kind {
        self.stem.dtype()
    }
    pub fn device(&self) -> Device {
        self.stem.wte.device()
    }

    /// Training RoPE for positions 0..seq_len.
    pub fn rope(cfg: &ModelConfig, seq_len: i64, device: Device) -> Rope {
        let (cos, sin) = layers::rope_tables(cfg.kv_channels, cfg.rotary_emb_base, 0, seq_len, 1.0, device);
        Rope { cos, sin, logn: None, keys: None, segments: None }
    }

    /// Training RoPE of a packed row: positions restart at 0 for each sample (lengths `lens`), whose
    /// attention is confined to itself.
    pub fn rope_packed(cfg: &ModelConfig, lens: &[usize], device: Device) -> Rope {
        let seg = attention::Segments::new(lens, device);
        let (cos, sin) = layers::rope_tables(cfg.kv_channels, cfg.rotary_emb_base, 0, seg.max_len.max(1), 1.0, device);
        let pos = fused::upload(&Tensor::from_slice(&seg.positions()), device);
        Rope { cos: cos.index_select(0, &pos), sin: sin.index_select(0, &pos), logn: None, keys: None, segments: Some(seg) }
    }

    /// The training RoPE of a micro-batch: per sample when it is packed.
    pub fn rope_for(cfg: &ModelConfig, input: &ModelInput, device: Device) -> Rope {
        if input.seq_lens.is_empty() {
            Self::rope(cfg, input.input_ids.size()[1], device)
        } else {
            Self::rope_packed(cfg, &input.seq_lens, device)
        }
    }

    /// Inference RoPE for positions `start..start+len` with Qwen's dynamic NTK (alpha fixed from the
    /// prompt length at prefill) and logn query scaling beyond `seq_length`.
    pub fn rope_infer(&self, start: i64, len: i64, ntk_alpha: f64) -> Rope {
        let (cos, sin) =
            layers::rope_tables(self.cfg.kv_channels, self.cfg.rotary_emb_base, start, len, ntk_alpha, self.device());
        let limit = self.cfg.seq_length;
        let logn = (start + len > limit).then(|| {
            let f: Vec<f32> = (start..start + len)
                .map(|p| if p + 1 > limit { ((p + 1) as f64).ln() / (limit as f64).ln() } else { 1.0 } as f32)
                .collect();
            Tensor::from_slice(&f).to_device(self.device())
        });
        Rope { cos, sin, logn, keys: None, segments: None }
    }

    /// Inference RoPE for a left-padded batch: row r's columns hold its positions `starts[r]..` (negative
    /// on padding, whose values nothing reads), each row with its own NTK alpha; `keys` (B, T) marks the
    /// real positions among all keys up to this call. One row without padding is exactly
    /// [`Self::rope_infer`].
    pub fn rope_rows(&self, starts: &[i64], len: i64, alphas: &[f64], keys: Option<Tensor>) -> Rope {
        if starts.len() == 1 {
            return Rope { keys, ..self.rope_infer(starts[0], len, alphas[0]) };
        }
        let rows: Vec<Rope> = starts.iter().zip(alphas).map(|(&s, &a)| self.rope_infer(s, len, a)).collect();
        let cos = Tensor::stack(&rows.iter().map(|r| &r.cos).collect::<Vec<_>>(), 0);
        let sin = Tensor::stack(&rows.iter().map(|r| &r.sin).collect::<Vec<_>>(), 0);
        let logn = rows.iter().any(|r| r.logn.is_some()).then(|| {
            let ones = Tensor::ones([len], (Kind::Float, self.device()));
            Tensor::stack(&rows.iter().map(|r| r.logn.as_ref().unwrap_or(&ones)).collect::<Vec<_>>(), 0)
        });
        Rope { cos, sin, logn, keys, segments: None }
    }

    /// Qwen's dynamic NTK alpha for a prompt of `len` tokens: 2^ceil(log2(len/seq_length)+1) - 1, at least 1.
    pub fn ntk_alpha(&self, len: i64) -> f64 {
        let context = (len as f64 / self.cfg.seq_length as f64).log2() + 1.0;
        (2f64.powf(context.ceil()) - 1.0).max(1.0)
    }

    /// Shifted cross-entropy over full logits in f32, ignore index -100, mean over supervised tokens.
    pub fn loss(logits: &Tensor, labels: &Tensor) -> Tensor {
        let (b, s, v) = logits.size3().expect("logits (B, S, V)");
        let lg = logits.narrow(1, 0, s - 1).reshape([b * (s - 1), v]).to_kind(Kind::Float);
        let lb = labels.narrow(1, 1, s - 1).reshape([b * (s - 1)]);
        lg.cross_entropy_loss::<Tensor>(&lb, None, tch::Reduction::Mean, -100, 0.0)
    }

    /// Full forward to logits (B, S, V).
    pub fn forward_logits(&self, input: &ModelInput) -> Tensor {
        let mut x = self.stem.forward(input);
        let rope = Self::rope_for(&self.cfg, input, self.device());
        for b in &self.blocks {
            x = b.forward(&x, &rope, None);
        }
        self.head.forward(&x)
    }

    pub fn forward_loss(&self, input: &ModelInput) -> Tensor {
        Self::loss(&self.forward_logits(input), &input.labels)
    }

    /// Incremental decoding: embeddings of the new positions `x` (B, S, D) through every block with the
    /// caches, returning logits of the new positions.
    pub fn decode_step(&self, x: Tensor, rope: &Rope, caches: &mut [Option<KvCache>]) -> Tensor {
        let mut x = x;
        for (b, c) in self.blocks.iter().zip(caches.iter_mut()) {
            x = b.forward(&x, rope, Some(c));
        }
        self.head.forward(&x)
    }
}
