//! Evaluation during training (`eval:` in recipes): the loss over a held-out Parquet split and the
//! MM-ID scoring of a benchmark's matching and location items, every `every_steps` steps and at the
//! end. Every rank takes a share (item i goes to rank i mod world) and the sums are all-reduced.
//!
//! The held-out loss runs the training forward without a graph through the ZeRO state, so under ZeRO-3
//! every rank runs the same number of micro-batches (an empty one where its share is shorter). The
//! MM-ID answers are generated greedily with the KV cache on a full copy of the weights in the compute
//! dtype that every rank gathers for the evaluation and frees after it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::infer::{generate_batch, score, test_image_size, GenOptions, Item};
use crate::model::{Head, ModelConfig, QwenVl, Stem};
use crate::recipe::{DataSection, EvalSection};
use crate::step::{forward_loss, model_input};
use crate::zero::{BucketParams, Role, Sharded, Use};
use idavlm_shards::order::Locator;
use idavlm_shards::reader::{BadImagePolicy, BatchKind, LoadOptions, MicroRequest, ReaderState, SampleLoader, Source};
use idavlm_shards::tokenizer::Tokenizer;

/// The figures of one evaluation (None: not configured, or no item of that type).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EvalScores {
    pub loss: Option<f64>,
    pub matching: Option<f64>,
    pub location_acc: Option<f64>,
    pub location_iou: Option<f64>,
}

pub struct Evaluator {
    every: u64,
    at_end: bool,
    batch: usize,
    image_size: i64,
    gen: GenOptions,
    tok: Arc<Tokenizer>,
    /// The held-out split: its loader and every sample (storage order, capped).
    heldout: Option<(SampleLoader, Vec<Locator>)>,
    /// The scored MM-ID items and their image root.
    mmid: Option<(Vec<Item>, PathBuf)>,
}

impl Evaluator {
    /// Opens what `eval` names (checking the held-out shards and every benchmark image before training).
    pub fn new(e: &EvalSection, data: &DataSection, image_size: i64, tok: Arc<Tokenizer>) -> Result<Self> {
        let heldout = match &e.data {
            Some(dir) => {
                let src = Source::open_with("eval", dir, data.verify_checksums)?;
                let mut locs: Vec<Locator> = src.layout.locators().collect();
                locs.truncate(e.max_samples.unwrap_or(usize::MAX));
                let opts = LoadOptions {
                    image_size: image_size as usize,
                    max_len: data.max_len,
                    bad_image: BadImagePolicy::Fail,
                    workers: data.workers,
                    resize: data.resize,
                };
                Some((SampleLoader::new(vec![src], tok.clone(), opts), locs))
            }
            None => None,
        };
        let mmid = match &e.mmid {
            Some(path) => {
                let root = if path.is_dir() { path.clone() } else { path.parent().unwrap_or(Path::new(".")).to_path_buf() };
                let mut items: Vec<Item> = crate::infer::read_bench(path)?
                    .into_iter()
                    .filter(|i| (i.kind == "matching" || i.kind == "location") && i.unscorable().is_none())
                    .collect();
                items.truncate(e.mmid_limit.unwrap_or(usize::MAX));
                if items.is_empty() {
                    return Err(Error::Recipe(format!(
                        "recipe key `eval.mmid`: {} has no scorable matching or location item",
                        path.display()
                    )));
                }
                idavlm_shards::mmid::check_items(&items, &root)?;
                Some((items, root))
            }
            None => None,
        };
        Ok(Self {
            every: e.every_steps,
            at_end: e.at_end,
            batch: e.batch.max(1),
            image_size,
            gen: GenOptions { max_new_tokens: e.max_new_tokens, top_p: None, seed: 0, resize: data.resize },
            tok,
            heldout,
            mmid,
        })
    }

    /// Whether step `k` (just taken) of `total` is evaluated.
    pub fn due(&self, k: u64, total: u64) -> bool {
        (self.every > 0 && k.is_multiple_of(self.every)) || (self.at_end && k == total)
    }

    /// Evaluates the current weights (every rank calls it).
    pub fn run(&self, st: &Sharded, comm: &dyn Communicator, cfg: &ModelConfig) -> Result<EvalScores> {
        let _guard = tch::no_grad_guard();
        // LoRA's dropout is a training-time draw.
        let mut cfg = cfg.clone();
        if let Some(l) = cfg.lora.as_mut() {
            l.dropout = 0.0;
        }
        let (rank, world) = (comm.rank(), comm.world());
        let mut scores = EvalScores::default();
        if let Some((loader, locs)) = &self.heldout {
            let mine: Vec<(usize, Locator)> = locs.iter().skip(rank).step_by(world).map(|&l| (0, l)).collect();
            // The same number of forwards on every rank (ZeRO-3 gathers pair up).
            let rounds = locs.len().div_ceil(world).div_ceil(self.batch);
            let (mut sum, mut tokens) = (0.0, 0.0);
            for r in 0..rounds {
                let samples = mine.iter().skip(r * self.batch).take(self.batch).copied().collect();
                let req = MicroRequest { kind: BatchKind::Id, micro: r, samples, packed: false, dropped_overlong: 0 };
                let mb = loader.build(&req, 0, ReaderState::default())?;
                let n = mb.supervised_tokens() as f64;
                sum += forward_loss(st, comm, &cfg, &model_input(&mb, self.image_size, st.device))? * n;
                tokens += n;
            }
            let t = comm.sum_over_ranks(&[sum, tokens], st.device)?;
            scores.loss = (t[1] > 0.0).then(|| t[0] / t[1]);
        }
        if let Some((items, root)) = &self.mmid {
            let buckets = gather_all(st, comm, &cfg)?;
            let all: Vec<&BucketParams> = buckets.iter().collect();
            let g = st.getter(&all);
            let model = QwenVl {
                cfg: cfg.clone(),
                stem: Stem::new(&cfg, &g),
                blocks: (0..cfg.num_hidden_layers as usize).map(|i| QwenVl::block_from(&cfg, i, &g)).collect(),
                head: Head::new(&cfg, &g),
            };
            // matching: correct, items; location: IoU > 0.5, IoU sum, items.
            let mut acc = [0.0f64; 5];
            let mine: Vec<&Item> = items.iter().skip(rank).step_by(world).collect();
            for chunk in mine.chunks(self.batch) {
                let answers = generate_batch(&model, &self.tok, chunk, root, &self.gen)?;
                for (item, (text, _)) in chunk.iter().zip(answers) {
                    let size = (item.kind == "location").then(|| test_image_size(item, root)).flatten();
                    let s = score(item, &text, size).0.unwrap_or(0.0);
                    if item.kind == "matching" {
                        acc[0] += s;
                        acc[1] += 1.0;
                    } else {
                        acc[2] += (s > 0.5) as i32 as f64;
                        acc[3] += s;
                        acc[4] += 1.0;
                    }
                }
            }
            drop(model);
            let t = comm.sum_over_ranks(&acc, st.device)?;
            scores.matching = (t[1] > 0.0).then(|| t[0] / t[1]);
            scores.location_acc = (t[4] > 0.0).then(|| t[2] / t[4]);
            scores.location_iou = (t[4] > 0.0).then(|| t[3] / t[4]);
        }
        Ok(scores)
    }
}

/// Every role's parameters gathered (views; a full copy under ZeRO-3), for a local model.
fn gather_all(st: &Sharded, comm: &dyn Communicator, cfg: &ModelConfig) -> Result<Vec<BucketParams>> {
    let mut out = vec![st.gather_now(comm, Role::Stem, Use::Views)?];
    for i in 0..cfg.num_hidden_layers as usize {
        out.push(st.gather_now(comm, Role::Block(i), Use::Views)?);
    }
    out.push(st.gather_now(comm, Role::Head, Use::Views)?);
    Ok(out)
}
