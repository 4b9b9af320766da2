//! Evaluation during training (`eval:` in recipes): the loss over a held-out Parquet split and the
//! MM-ID scoring of a benchmark's matching and location items, every `every_steps` steps and at the
//! end; with `eval.judge`, its QA and caption items too, answered and scored by the LLM judge every
//! `judge_every` evaluations. Every rank takes a share (item i goes to rank i mod world) and the sums
//! are all-reduced.
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
use idavlm_shards::mmid::judge::{request_for, Cache, Judge};
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
    /// Mean judge scores (1-10) of the QA and caption items, on judged evaluations.
    pub qa: Option<f64>,
    pub caption: Option<f64>,
}

/// The judged part of the evaluation: the QA and caption items, the client and its cache.
struct Judged {
    items: Vec<Item>,
    judge: Judge,
    cache: Cache,
    every: u64,
    gen: GenOptions,
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
    judged: Option<Judged>,
}

impl Evaluator {
    /// Opens what `eval` names (checking the held-out shards and every benchmark image before training,
    /// and setting up the judge: its key variable must be set) for the model `cfg` describes (its image
    /// size and chat template). `ckpt_dir` holds the judge's default cache.
    pub fn new(e: &EvalSection, data: &DataSection, cfg: &ModelConfig, tok: Arc<Tokenizer>, ckpt_dir: &Path) -> Result<Self> {
        let image_size = cfg.visual.image_size;
        let heldout = match &e.data {
            Some(dir) => {
                let src = Source::open_with("eval", dir, data.verify_checksums)?;
                src.require_template(cfg.template())?;
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
        let (mut mmid, mut judged) = (None, None);
        if let Some(path) = &e.mmid {
            let root = if path.is_dir() { path.clone() } else { path.parent().unwrap_or(Path::new(".")).to_path_buf() };
            let all = crate::infer::read_bench(path)?;
            let mut items: Vec<Item> = all
                .iter()
                .filter(|i| (i.kind == "matching" || i.kind == "location") && i.unscorable().is_none())
                .cloned()
                .collect();
            items.truncate(e.mmid_limit.unwrap_or(usize::MAX));
            if let Some(cfg) = &e.judge {
                let mut jitems: Vec<Item> = all
                    .iter()
                    .filter(|i| idavlm_shards::mmid::judge::judged(&i.kind))
                    .cloned()
                    .collect();
                jitems.truncate(e.judge_limit.unwrap_or(usize::MAX));
                if jitems.is_empty() {
                    return Err(Error::Recipe(format!(
                        "recipe key `eval.judge`: {} has no QA or caption item to judge",
                        path.display()
                    )));
                }
                idavlm_shards::mmid::check_items(&jitems, &root)?;
                let judge = Judge::new(cfg).map_err(|e| Error::Recipe(format!("recipe key `eval.judge`: {e}")))?;
                let cache = Cache::open(&cfg.cache.clone().unwrap_or_else(|| ckpt_dir.join("judge-cache.jsonl")))?;
                let gen = GenOptions { max_new_tokens: e.judge_max_new_tokens, top_p: None, seed: 0, resize: data.resize };
                judged = Some(Judged { items: jitems, judge, cache, every: e.judge_every, gen });
            } else if items.is_empty() {
                return Err(Error::Recipe(format!(
                    "recipe key `eval.mmid`: {} has no scorable matching or location item",
                    path.display()
                )));
            }
            idavlm_shards::mmid::check_items(&items, &root)?;
            mmid = Some((items, root));
        }
        Ok(Self {
            every: e.every_steps,
            at_end: e.at_end,
            batch: e.batch.max(1),
            image_size,
            gen: GenOptions { max_new_tokens: e.max_new_tokens, top_p: None, seed: 0, resize: data.resize },
            tok,
            heldout,
            mmid,
            judged,
        })
    }

    /// Whether step `k` (just taken) of `total` is evaluated.
    pub fn due(&self, k: u64, total: u64) -> bool {
        (self.every > 0 && k.is_multiple_of(self.every)) || (self.at_end && k == total)
    }

    /// Whether the evaluation after step `k` of `total` also judges: every `judge_every`-th evaluation
    /// (counted from the step, so a resumed run judges at the same steps) and the final one.
    fn judges(&self, k: u64, total: u64) -> bool {
        let Some(j) = &self.judged else { return false };
        k == total || (self.every > 0 && (k / self.every).is_multiple_of(j.every))
    }

    /// Evaluates the current weights after step `k` of `total` (every rank calls it).
    pub fn run(&self, st: &Sharded, comm: &dyn Communicator, cfg: &ModelConfig, k: u64, total: u64) -> Result<EvalScores> {
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
            // QA sum, QA items, caption sum, caption items, ranks whose judge failed.
            let mut judged = [0.0f64; 5];
            if let Some(j) = self.judged.as_ref().filter(|_| self.judges(k, total)) {
                match judge_share(j, &model, &self.tok, root, rank, world, self.batch) {
                    Ok(sums) => judged[..4].copy_from_slice(&sums),
                    Err(e) => {
                        tracing::warn!("rank {rank}: the judge failed, eval/qa and eval/caption are left out of this evaluation: {e}");
                        judged[4] = 1.0;
                    }
                }
            }
            drop(model);
            let t = comm.sum_over_ranks(&acc, st.device)?;
            scores.matching = (t[1] > 0.0).then(|| t[0] / t[1]);
            scores.location_acc = (t[4] > 0.0).then(|| t[2] / t[4]);
            scores.location_iou = (t[4] > 0.0).then(|| t[3] / t[4]);
            if self.judges(k, total) {
                let t = comm.sum_over_ranks(&judged, st.device)?;
                if t[4] == 0.0 {
                    scores.qa = (t[1] > 0.0).then(|| t[0] / t[1]);
                    scores.caption = (t[3] > 0.0).then(|| t[2] / t[3]);
                }
            }
        }
        Ok(scores)
    }
}

/// Answers this rank's share of the QA and caption items and judges them: [QA score sum, QA items
/// scored, caption score sum, caption items scored] (unparsable and failed verdicts left out).
fn judge_share(
    j: &Judged,
    model: &QwenVl,
    tok: &Tokenizer,
    root: &Path,
    rank: usize,
    world: usize,
    batch: usize,
) -> Result<[f64; 4]> {
    use idavlm_shards::mmid::judge::{classify, Task};
    let mine: Vec<&Item> = j.items.iter().skip(rank).step_by(world).collect();
    let mut requests = Vec::new();
    for chunk in mine.chunks(batch) {
        for (item, (text, _)) in chunk.iter().zip(generate_batch(model, tok, chunk, root, &j.gen)?) {
            requests.push(request_for(&item.kind, &item.question, &text, &item.answer).expect("a judged type"));
        }
    }
    let (verdicts, _) = j.judge.judge_all(&requests, &j.cache, &|| {})?;
    let mut sums = [0.0; 4];
    for (item, v) in mine.iter().zip(verdicts) {
        let (Some(score), Some((task, _))) = (v.score(), classify(&item.kind)) else { continue };
        let at = if task == Task::Qa { 0 } else { 2 };
        sums[at] += score as f64;
        sums[at + 1] += 1.0;
    }
    Ok(sums)
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
