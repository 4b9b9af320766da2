//! The streaming reader: each rank's micro-batches, in the global order of [`crate::order`], loaded
//! ahead of use on a background thread and decoded on a bounded pool of workers.
//!
//! Reader state is two numbers (the main stream's and the general stream's global positions) plus the
//! seed: resuming from them gives exactly the samples an uninterrupted run would have seen next, at
//! any world size with the same global batch.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::chat::{encode_conversation, ImageRole, Overflow, IGNORE_INDEX};
use crate::error::{Error, Result};
use crate::format::{read_row_group, row_group_sizes, Manifest, Sample};
use crate::order::{inject, micro_positions, Locator, Mixture, SourceLayout};
use crate::preprocess::preprocess_image;
use crate::tokenizer::{Tokenizer, ENDOFTEXT};

/// An opened dataset folder: manifest checked against the shard footers.
#[derive(Clone, Debug)]
pub struct Source {
    pub name: String,
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub layout: SourceLayout,
}

impl Source {
    pub fn open(name: &str, dir: &Path) -> Result<Self> {
        let manifest = Manifest::load(dir)?;
        let mut blocks = Vec::new();
        for (i, sh) in manifest.shards.iter().enumerate() {
            let f = dir.join(&sh.file);
            if !f.is_file() {
                return Err(Error::format(&f, "shard listed in index.json is missing"));
            }
            let sizes = row_group_sizes(&f)?;
            let rows: u64 = sizes.iter().map(|&r| r as u64).sum();
            if rows != sh.rows {
                return Err(Error::format(&f, format!("{rows} rows in the footer, index.json says {}", sh.rows)));
            }
            blocks.extend(sizes.iter().enumerate().map(|(g, &r)| (i as u32, g as u32, r as u32)));
        }
        let layout = SourceLayout { blocks };
        if layout.is_empty() {
            return Err(Error::format(&dir.join(crate::format::MANIFEST), "dataset has no samples"));
        }
        Ok(Self { name: name.to_string(), dir: dir.to_path_buf(), manifest, layout })
    }

    pub fn shard_path(&self, shard: u32) -> PathBuf {
        self.dir.join(&self.manifest.shards[shard as usize].file)
    }
}

/// What to do with a sample whose image does not decode at training time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BadImagePolicy {
    Skip,
    Fail,
}

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub image_size: usize,
    pub max_len: usize,
    pub bad_image: BadImagePolicy,
    /// Image decode workers per rank.
    pub workers: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchKind {
    Id,
    General,
}

/// One micro-batch, padded on the right to its longest sample. Tensors are flat row-major vectors.
#[derive(Clone, Debug)]
pub struct MicroBatch {
    pub kind: BatchKind,
    pub step: u64,
    pub micro: usize,
    pub sample_ids: Vec<String>,
    pub batch: usize,
    pub seq: usize,
    /// (batch, seq), padded with `<|endoftext|>`.
    pub input_ids: Vec<i64>,
    /// (batch, seq), -100 on padding and unsupervised tokens.
    pub labels: Vec<i64>,
    /// (images, 3, size, size).
    pub pixels: Vec<f32>,
    pub image_rows: Vec<usize>,
    pub image_starts: Vec<usize>,
    pub image_roles: Vec<ImageRole>,
    /// Samples dropped from this micro-batch: undecodable image, or over max length.
    pub dropped_bad_image: usize,
    pub dropped_overlong: usize,
    /// Reader state once this step's data is consumed (set on every micro-batch of the step).
    pub state_after: ReaderState,
}

impl MicroBatch {
    pub fn num_images(&self) -> usize {
        self.image_rows.len()
    }
    pub fn supervised_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// Reader state saved in checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ReaderState {
    pub seed: u64,
    /// Global position in the main (ID) stream.
    pub main_position: u64,
    /// Global position in the general-data stream of the injection.
    pub general_position: u64,
}

/// Loads samples by locator with a small cache of decoded row groups.
pub struct SampleLoader {
    pub sources: Vec<Source>,
    tok: Arc<Tokenizer>,
    pub opts: LoadOptions,
    cache: Mutex<(HashMap<(usize, u32, u32), Arc<Vec<Sample>>>, VecDeque<(usize, u32, u32)>)>,
}

const CACHE_ROW_GROUPS: usize = 16;

impl SampleLoader {
    pub fn new(sources: Vec<Source>, tok: Arc<Tokenizer>, opts: LoadOptions) -> Self {
        Self { sources, tok, opts, cache: Mutex::new((HashMap::new(), VecDeque::new())) }
    }

    pub fn sample(&self, src: usize, loc: Locator) -> Result<Sample> {
        let key = (src, loc.shard, loc.row_group);
        let cached = self.cache.lock().expect("cache lock").0.get(&key).cloned();
        let rows = match cached {
            Some(r) => r,
            None => {
                let f = self.sources[src].shard_path(loc.shard);
                let rows = Arc::new(read_row_group(&f, loc.row_group as usize)?);
                let mut c = self.cache.lock().expect("cache lock");
                c.0.insert(key, rows.clone());
                c.1.push_back(key);
                while c.1.len() > CACHE_ROW_GROUPS {
                    let old = c.1.pop_front().expect("non-empty");
                    c.0.remove(&old);
                }
                rows
            }
        };
        rows.get(loc.row as usize).cloned().ok_or_else(|| {
            Error::format(
                &self.sources[src].shard_path(loc.shard),
                format!("row {} of row group {} does not exist", loc.row, loc.row_group),
            )
        })
    }

    /// Tokenises and decodes samples into one padded micro-batch.
    pub fn build(
        &self,
        kind: BatchKind,
        step: u64,
        micro: usize,
        reqs: &[(usize, Locator)],
        state_after: ReaderState,
    ) -> Result<MicroBatch> {
        let size = self.opts.image_size;
        let mut encoded = Vec::new();
        let mut overlong = 0;
        for &(src, loc) in reqs {
            let s = self.sample(src, loc)?;
            match encode_conversation(&self.tok, &s.id, &s.conversations, self.opts.max_len, Overflow::TruncateOutsideImages) {
                Ok(e) => {
                    if e.image_paths.len() > s.images.len() {
                        return Err(Error::sample(
                            &s.id,
                            format!("{} <img> spans but {} stored images", e.image_paths.len(), s.images.len()),
                        ));
                    }
                    encoded.push((s, e, src, loc));
                }
                Err(e) => {
                    overlong += 1;
                    metrics::counter!("idavlm_samples_dropped_total", "reason" => "overlong").increment(1);
                    tracing::warn!("dropped: {e}");
                }
            }
        }
        // Decode every image of the micro-batch on the worker pool.
        let jobs: Vec<(usize, usize)> =
            encoded.iter().enumerate().flat_map(|(i, (_, e, _, _))| (0..e.image_paths.len()).map(move |k| (i, k))).collect();
        let results: Vec<Mutex<Option<Result<Vec<f32>>>>> = jobs.iter().map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        std::thread::scope(|sc| {
            for _ in 0..self.opts.workers.max(1).min(jobs.len().max(1)) {
                sc.spawn(|| loop {
                    let j = next.fetch_add(1, Ordering::Relaxed);
                    if j >= jobs.len() {
                        break;
                    }
                    let (i, k) = jobs[j];
                    let (s, e, _, _) = &encoded[i];
                    let blob = &s.images[k];
                    let what = format!("{} of sample {}", e.image_paths[k], s.id);
                    let r = if blob.path != e.image_paths[k] {
                        Err(Error::sample(
                            &s.id,
                            format!("image {k}: text names {:?}, stored image is {:?}", e.image_paths[k], blob.path),
                        ))
                    } else {
                        preprocess_image(&blob.bytes, size, &what)
                    };
                    *results[j].lock().expect("result lock") = Some(r);
                });
            }
        });
        let mut pixels_of: Vec<Vec<Vec<f32>>> = encoded.iter().map(|_| Vec::new()).collect();
        let mut bad = vec![false; encoded.len()];
        for (j, r) in results.into_iter().enumerate() {
            let (i, _) = jobs[j];
            match r.into_inner().expect("result lock").expect("every job ran") {
                Ok(p) => pixels_of[i].push(p),
                Err(e) => {
                    let (_, _, src, loc) = &encoded[i];
                    let file = self.sources[*src].shard_path(loc.shard);
                    if self.opts.bad_image == BadImagePolicy::Fail {
                        return Err(Error::format(&file, format!("row group {}: {e}", loc.row_group)));
                    }
                    if !bad[i] {
                        metrics::counter!("idavlm_samples_dropped_total", "reason" => "bad_image").increment(1);
                        tracing::warn!("{}: skipped sample: {e}", file.display());
                    }
                    bad[i] = true;
                }
            }
        }
        let kept: Vec<usize> = (0..encoded.len()).filter(|&i| !bad[i]).collect();
        let seq = kept.iter().map(|&i| encoded[i].1.input_ids.len()).max().unwrap_or(0);
        let mut mb = MicroBatch {
            kind,
            step,
            micro,
            sample_ids: Vec::new(),
            batch: kept.len(),
            seq,
            input_ids: Vec::with_capacity(kept.len() * seq),
            labels: Vec::with_capacity(kept.len() * seq),
            pixels: Vec::new(),
            image_rows: Vec::new(),
            image_starts: Vec::new(),
            image_roles: Vec::new(),
            dropped_bad_image: bad.iter().filter(|&&b| b).count(),
            dropped_overlong: overlong,
            state_after,
        };
        for (row, &i) in kept.iter().enumerate() {
            let (s, e, _, _) = &encoded[i];
            mb.sample_ids.push(s.id.clone());
            mb.input_ids.extend(e.input_ids.iter().map(|&t| t as i64));
            mb.input_ids.extend(std::iter::repeat_n(ENDOFTEXT as i64, seq - e.input_ids.len()));
            mb.labels.extend(&e.labels);
            mb.labels.extend(std::iter::repeat_n(IGNORE_INDEX, seq - e.labels.len()));
            for (k, p) in std::mem::take(&mut pixels_of[i]).into_iter().enumerate() {
                mb.pixels.extend(p);
                mb.image_rows.push(row);
                mb.image_starts.push(e.image_starts[k]);
                mb.image_roles.push(e.image_roles[k]);
            }
        }
        Ok(mb)
    }
}

/// All micro-batches of one optimizer step for this rank, in order (ID micro-batches, each followed by
/// its injected general micro-batch when the coin says so).
#[derive(Clone, Debug)]
pub struct StepBatches {
    pub step: u64,
    pub micro_batches: Vec<MicroBatch>,
    pub state_after: ReaderState,
}

/// How a run consumes data: the shape of a step and the injection of SPEC §3.
#[derive(Clone, Debug)]
pub struct StepShape {
    pub micro_batch: usize,
    pub accum: usize,
    pub world: usize,
    pub rank: usize,
    pub inject_probability: f64,
}

/// The reader of one rank: the main mixture, the optional general stream, and the loader.
pub struct Reader {
    pub loader: Arc<SampleLoader>,
    main: Mixture,
    /// Index of the general source in `loader.sources` and its mixture, when injection is on.
    general: Option<(usize, Mixture)>,
    main_sources: Vec<usize>,
    pub shape: StepShape,
}

impl Reader {
    /// `main`: (source index in `sources`, per-epoch count); `general`: the injection's source index.
    pub fn new(
        sources: Vec<Source>,
        tok: Arc<Tokenizer>,
        opts: LoadOptions,
        seed: u64,
        main: &[(usize, u64)],
        general: Option<usize>,
        shape: StepShape,
    ) -> Result<Self> {
        if main.is_empty() {
            return Err(Error::Invalid("no main data source".into()));
        }
        let key = |s: &Source| -> u64 {
            // Seed each source's order by its name, so reordering the recipe's list keeps each order.
            s.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
        };
        let main_mix = Mixture::new(
            seed,
            main.iter().map(|&(s, _)| sources[s].layout.clone()).collect(),
            main.iter().map(|&(_, c)| c).collect(),
            main.iter().map(|&(s, _)| key(&sources[s])).collect(),
        );
        let general = general.map(|g| {
            (g, Mixture::new(seed, vec![sources[g].layout.clone()], vec![sources[g].layout.len()], vec![key(&sources[g])]))
        });
        let main_sources = main.iter().map(|&(s, _)| s).collect();
        Ok(Self { loader: Arc::new(SampleLoader::new(sources, tok, opts)), main: main_mix, general, main_sources, shape })
    }

    pub fn main_epoch_len(&self) -> u64 {
        self.main.epoch_len()
    }

    /// The requests of one optimizer step for this rank, and the state after it.
    #[allow(clippy::type_complexity)]
    pub fn plan_step(&mut self, step: u64, state: ReaderState) -> (Vec<(BatchKind, usize, Vec<(usize, Locator)>)>, ReaderState) {
        let sh = self.shape.clone();
        let mut out = Vec::new();
        let mut general_pos = state.general_position;
        for j in 0..sh.accum {
            let reqs = micro_positions(state.main_position, j, sh.rank, sh.world, sh.micro_batch)
                .map(|g| {
                    let (s, _, loc) = self.main.at(g);
                    (self.main_sources[s], loc)
                })
                .collect();
            out.push((BatchKind::Id, j, reqs));
            if let Some((gsrc, gmix)) = self.general.as_mut() {
                if inject(state.seed, step, j, sh.inject_probability) {
                    let start = general_pos + (sh.rank * sh.micro_batch) as u64;
                    let reqs = (start..start + sh.micro_batch as u64).map(|g| (*gsrc, gmix.at(g).2)).collect();
                    out.push((BatchKind::General, j, reqs));
                    general_pos += (sh.world * sh.micro_batch) as u64;
                }
            }
        }
        let after = ReaderState {
            seed: state.seed,
            main_position: state.main_position + (sh.accum * sh.world * sh.micro_batch) as u64,
            general_position: general_pos,
        };
        (out, after)
    }

    /// Starts loading steps `first_step..` from `state` on a background thread, `prefetch_steps` steps
    /// ahead. The thread stops when the receiver is dropped or after the first error.
    pub fn stream(mut self, first_step: u64, state: ReaderState, prefetch_steps: usize) -> Receiver<Result<StepBatches>> {
        let (tx, rx) = sync_channel(prefetch_steps.max(1));
        std::thread::Builder::new()
            .name("idavlm-reader".into())
            .spawn(move || {
                let mut state = state;
                let mut step = first_step;
                loop {
                    let (reqs, after) = self.plan_step(step, state);
                    let built: Result<Vec<MicroBatch>> =
                        reqs.into_iter().map(|(kind, micro, r)| self.loader.build(kind, step, micro, &r, after)).collect();
                    let failed = built.is_err();
                    if tx.send(built.map(|micro_batches| StepBatches { step, micro_batches, state_after: after })).is_err()
                        || failed
                    {
                        return;
                    }
                    state = after;
                    step += 1;
                }
            })
            .expect("spawn reader thread");
        rx
    }
}
