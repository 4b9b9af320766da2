//! The streaming reader: each rank's micro-batches, in the global order of [`crate::order`], loaded
//! ahead of use on a small tokio runtime (asynchronous row-group reads) and decoded on a bounded pool
//! of blocking workers.
//!
//! Reader state is two numbers (the main stream's and the general stream's global positions) plus the
//! seed: resuming from them gives exactly the samples an uninterrupted run would have seen next, at
//! any world size with the same global batch.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::chat::{encode_conversation, ImageRole, Overflow, IGNORE_INDEX};
use crate::error::{Error, Result};
use crate::format::{load_footer, read_row_group_with, Footer, Manifest, Sample};
use crate::order::{inject, micro_positions, Locator, Mixture, SourceLayout};
use crate::preprocess::{preprocess_image, ResizeOrder};
use crate::tokenizer::{Tokenizer, ENDOFTEXT};

/// An opened dataset folder: manifest checked against the shard footers, which are kept (parsed once)
/// for every later read of the shards' row groups.
#[derive(Clone, Debug)]
pub struct Source {
    pub name: String,
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub layout: SourceLayout,
    /// Parsed footer of each shard, in manifest order.
    pub footers: Vec<Footer>,
    /// Each shard's sha256 is checked against index.json the first time one of its row groups is read
    /// (once per process); off for trusted storage (`data.verify_checksums: false`).
    verify: bool,
    verified: Arc<Vec<std::sync::OnceLock<std::result::Result<(), String>>>>,
}

impl Source {
    /// Opens a dataset folder whose shards are checksum-verified on first use.
    pub fn open(name: &str, dir: &Path) -> Result<Self> {
        Self::open_with(name, dir, true)
    }

    /// As [`Self::open`]; `verify_checksums: false` skips the sha256 of each shard (trusted storage).
    /// Refuses a dataset tokenised for another chat template than `expected` (the model's), naming both.
    pub fn require_template(&self, expected: &str) -> Result<()> {
        if self.manifest.template == expected {
            return Ok(());
        }
        Err(Error::format(
            &self.dir.join(crate::format::MANIFEST),
            format!(
                "dataset {:?} was tokenised for the {} chat template, and this model reads {expected}: convert or build it \
                 again for {expected}",
                self.name, self.manifest.template
            ),
        ))
    }

    pub fn open_with(name: &str, dir: &Path, verify_checksums: bool) -> Result<Self> {
        let manifest = Manifest::load(dir)?;
        let mut blocks = Vec::new();
        let mut footers = Vec::new();
        for (i, sh) in manifest.shards.iter().enumerate() {
            let f = dir.join(&sh.file);
            if !f.is_file() {
                return Err(Error::format(&f, "shard listed in index.json is missing"));
            }
            let footer = load_footer(&f)?;
            let sizes: Vec<usize> = footer.metadata().row_groups().iter().map(|g| g.num_rows() as usize).collect();
            footers.push(footer);
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
        let verified = Arc::new((0..manifest.shards.len()).map(|_| std::sync::OnceLock::new()).collect());
        Ok(Self { name: name.to_string(), dir: dir.to_path_buf(), manifest, layout, footers, verify: verify_checksums, verified })
    }

    /// Checks shard `shard`'s sha256 against index.json, once per process (blocking: hashes the file).
    pub fn ensure_verified(&self, shard: u32) -> Result<()> {
        if !self.verify {
            return Ok(());
        }
        let f = self.shard_path(shard);
        let r = self.verified[shard as usize].get_or_init(|| {
            let want = &self.manifest.shards[shard as usize].sha256;
            match crate::format::sha256_file(&f) {
                Ok(sum) if &sum == want => Ok(()),
                Ok(sum) => Err(format!(
                    "sha256 {sum}, index.json says {want}: the shard is corrupt or was changed after conversion \
                     (copy it again; `data.verify_checksums: false` skips this check for trusted storage)"
                )),
                // The shard's path is added once, below.
                Err(Error::Io { cause, .. }) => Err(cause.to_string()),
                Err(e) => Err(e.to_string()),
            }
        });
        r.clone().map_err(|e| Error::format(&f, e))
    }

    /// Every row of the dataset in storage order (shard by shard, row group by row group).
    pub fn read_all(&self) -> Result<Vec<Sample>> {
        let mut out = Vec::new();
        for &(shard, rg, _) in &self.layout.blocks {
            self.ensure_verified(shard)?;
            out.extend(read_row_group_with(&self.shard_path(shard), &self.footers[shard as usize], rg as usize)?);
        }
        Ok(out)
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
    /// Which Pillow's resize pass order the pixels follow.
    pub resize: ResizeOrder,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchKind {
    Id,
    General,
}

/// One micro-batch, padded on the right to its longest sample, or one packed row of several samples
/// (`seq_lens` non-empty). Tensors are flat row-major vectors.
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
    /// Each image's sample: its row, or its place in the packed row.
    pub image_groups: Vec<usize>,
    /// A packed micro-batch: the lengths of the samples one after another in its single row (each
    /// sample's first label is -100, so no loss crosses into it from the sample before). Empty when
    /// each row is one sample.
    pub seq_lens: Vec<usize>,
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
    /// Tokens the loss predicts: supervised labels after each row's first position (the loss is shifted).
    pub fn supervised_tokens(&self) -> usize {
        if self.seq == 0 {
            return 0;
        }
        self.labels.chunks_exact(self.seq).map(|row| row[1..].iter().filter(|&&l| l != IGNORE_INDEX).count()).sum()
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
    /// With packing: micro-batches already taken from the packing window that starts at
    /// `main_position` (the window is packed again on resume; the packing depends only on its samples).
    #[serde(default)]
    pub pack_bins: u64,
    /// The packing those micro-batches came from (None: not packed).
    #[serde(default)]
    pub packing: Option<PackShape>,
}

type RowGroupKey = (usize, u32, u32);
type Rows = Arc<Vec<Sample>>;

/// A cached row group: filled once, by whichever request comes first; later requests for the same
/// row group wait for that read instead of starting another.
type Slot = Arc<tokio::sync::OnceCell<Rows>>;

/// One sample of a micro-batch, tokenised, with where it came from.
struct Prepared {
    rows: Rows,
    row: usize,
    src: usize,
    loc: Locator,
    enc: crate::chat::Encoded,
}

impl Prepared {
    fn sample(&self) -> &Sample {
        &self.rows[self.row]
    }
}

/// Loads samples by locator: a small cache of decoded row groups, the
/// tokenisation and the image decoding of micro-batches.
pub struct SampleLoader {
    pub sources: Vec<Source>,
    tok: Arc<Tokenizer>,
    pub opts: LoadOptions,
    cache: Mutex<(HashMap<RowGroupKey, Slot>, VecDeque<RowGroupKey>)>,
    /// Each row group's `num_tokens` column, read once (4 bytes a sample): the lengths packing plans with.
    counts: Mutex<HashMap<RowGroupKey, Arc<Vec<i32>>>>,
}

/// Row groups kept decoded; the prefetch of a few steps touches fewer than this.
const CACHE_ROW_GROUPS: usize = 32;

impl SampleLoader {
    pub fn new(sources: Vec<Source>, tok: Arc<Tokenizer>, opts: LoadOptions) -> Self {
        Self { sources, tok, opts, cache: Mutex::new((HashMap::new(), VecDeque::new())), counts: Mutex::default() }
    }

    fn slot(&self, key: RowGroupKey) -> Slot {
        let mut c = self.cache.lock().expect("cache lock");
        if let Some(s) = c.0.get(&key) {
            return s.clone();
        }
        let s = Slot::default();
        c.0.insert(key, s.clone());
        c.1.push_back(key);
        while c.1.len() > CACHE_ROW_GROUPS {
            let old = c.1.pop_front().expect("non-empty");
            c.0.remove(&old);
        }
        s
    }

    /// `loc`'s shard, its checksum verified (hashed once, blocking), and its parsed footer.
    fn verified_shard(&self, src: usize, loc: Locator) -> Result<(PathBuf, &Footer)> {
        self.sources[src].ensure_verified(loc.shard)?;
        Ok((self.sources[src].shard_path(loc.shard), &self.sources[src].footers[loc.shard as usize]))
    }

    /// A row group, read with blocking I/O on a miss.
    fn rows_blocking(&self, src: usize, loc: Locator) -> Result<Rows> {
        let slot = self.slot((src, loc.shard, loc.row_group));
        if let Some(r) = slot.get() {
            return Ok(r.clone());
        }
        let (f, footer) = self.verified_shard(src, loc)?;
        let rows = Arc::new(read_row_group_with(&f, footer, loc.row_group as usize)?);
        let _ = slot.set(rows.clone());
        Ok(rows)
    }

    /// A row group, read asynchronously on a miss (one read per row group however many ask).
    async fn rows_async(&self, src: usize, loc: Locator) -> Result<Rows> {
        let slot = self.slot((src, loc.shard, loc.row_group));
        let rows = slot
            .get_or_try_init(|| async {
                // The first read of a shard hashes it on the blocking pool (the runtime keeps reading).
                let source = self.sources[src].clone();
                tokio::task::spawn_blocking(move || source.ensure_verified(loc.shard))
                    .await
                    .map_err(|e| Error::Invalid(format!("checksum task failed: {e}")))??;
                let f = self.sources[src].shard_path(loc.shard);
                let footer = &self.sources[src].footers[loc.shard as usize];
                Ok::<_, Error>(Arc::new(crate::format::read_row_group_async(&f, footer, loc.row_group as usize).await?))
            })
            .await?;
        Ok(rows.clone())
    }

    pub fn sample(&self, src: usize, loc: Locator) -> Result<Sample> {
        let rows = self.rows_blocking(src, loc)?;
        self.check_row(rows.len(), src, loc).map(|r| rows[r].clone())
    }

    /// `loc`'s row as an index into its row group of `len` rows, or an error naming the shard.
    fn check_row(&self, len: usize, src: usize, loc: Locator) -> Result<usize> {
        if (loc.row as usize) < len {
            Ok(loc.row as usize)
        } else {
            Err(Error::format(
                &self.sources[src].shard_path(loc.shard),
                format!("row {} of row group {} does not exist", loc.row, loc.row_group),
            ))
        }
    }

    /// The token length of a sample as training encodes it, None when it is over `max_len` (dropped).
    /// A sample within `max_len` is measured by its shard's `num_tokens` column alone (no image bytes
    /// read, no tokenising: every rank plans every packing window); [`Self::prepare`] checks the column
    /// against the tokeniser when the sample is used. A longer one is tokenised here, to see whether it
    /// can be cut to `max_len` or is dropped.
    pub fn length(&self, src: usize, loc: Locator) -> Result<Option<usize>> {
        let key = (src, loc.shard, loc.row_group);
        let cached = self.counts.lock().expect("counts lock").get(&key).cloned();
        let counts = match cached {
            Some(c) => c,
            None => {
                let (f, footer) = self.verified_shard(src, loc)?;
                let c = Arc::new(crate::format::read_num_tokens(&f, footer, loc.row_group as usize)?);
                self.counts.lock().expect("counts lock").insert(key, c.clone());
                c
            }
        };
        let n = counts[self.check_row(counts.len(), src, loc)?];
        if n > 0 && n as usize <= self.opts.max_len {
            return Ok(Some(n as usize));
        }
        let rows = self.rows_blocking(src, loc)?;
        let s = &rows[self.check_row(rows.len(), src, loc)?];
        Ok(encode_conversation(&self.tok, &s.id, &s.conversations, self.opts.max_len, Overflow::TruncateOutsideImages)
            .ok()
            .map(|e| e.input_ids.len()))
    }

    /// Tokenises the samples of a micro-batch; over-long ones are dropped and counted.
    fn prepare(&self, fetched: Vec<(usize, Locator, Rows)>) -> Result<(Vec<Prepared>, usize)> {
        let mut out = Vec::new();
        let mut overlong = 0;
        for (src, loc, rows) in fetched {
            let row = self.check_row(rows.len(), src, loc)?;
            let s = &rows[row];
            let enc = encode_conversation(&self.tok, &s.id, &s.conversations, self.opts.max_len, Overflow::TruncateOutsideImages);
            self.check_count(s, src, loc, &enc)?;
            match enc {
                Ok(enc) => {
                    if enc.image_paths.len() > s.images.len() {
                        return Err(Error::sample(
                            &s.id,
                            format!("{} <img> spans but {} stored images", enc.image_paths.len(), s.images.len()),
                        ));
                    }
                    out.push(Prepared { rows: rows.clone(), row, src, loc, enc });
                }
                Err(e) => {
                    overlong += 1;
                    metrics::counter!("idavlm_samples_dropped_total", "reason" => "overlong").increment(1);
                    tracing::warn!("dropped: {e}");
                }
            }
        }
        Ok((out, overlong))
    }

    /// The stored `num_tokens` must be what the tokeniser gives (packing planned with it on every rank):
    /// a sample kept whole has exactly that many tokens, one cut or dropped has more than `max_len`.
    fn check_count(&self, s: &Sample, src: usize, loc: Locator, enc: &Result<crate::chat::Encoded>) -> Result<()> {
        let within = s.num_tokens > 0 && s.num_tokens as usize <= self.opts.max_len;
        let agrees = match enc {
            Ok(e) if !e.truncated => e.input_ids.len() == s.num_tokens as usize,
            _ => !within,
        };
        if agrees {
            return Ok(());
        }
        let measured = match enc {
            Ok(e) if !e.truncated => format!("this tokeniser gives {} tokens", e.input_ids.len()),
            Ok(_) => format!("this tokeniser gives more than max_len {}", self.opts.max_len),
            Err(e) => format!("tokenising it fails ({e})"),
        };
        Err(Error::format(
            &self.sources[src].shard_path(loc.shard),
            format!(
                "sample {:?} (row group {}, row {}): num_tokens says {} but {measured}; \
                 the shard was written with another tokeniser or edited: convert it again",
                s.id, loc.row_group, loc.row, s.num_tokens
            ),
        ))
    }

    /// Image `k` of a prepared sample -> normalised pixels.
    fn decode(&self, p: &Prepared, k: usize) -> Result<Vec<f32>> {
        let s = p.sample();
        let blob = &s.images[k];
        if blob.path != p.enc.image_paths[k] {
            return Err(Error::sample(
                &s.id,
                format!("image {k}: text names {:?}, stored image is {:?}", p.enc.image_paths[k], blob.path),
            ));
        }
        preprocess_image(
            &blob.bytes,
            self.opts.image_size,
            self.opts.resize,
            &format!("{} of sample {}", p.enc.image_paths[k], s.id),
        )
    }

    /// Pads the kept samples into one micro-batch, or packs them into one row; `pixels[i][k]` is image
    /// k of sample i.
    fn assemble(
        &self,
        req: &MicroRequest,
        step: u64,
        prepared: Vec<Prepared>,
        pixels: Vec<Vec<Result<Vec<f32>>>>,
        overlong: usize,
        state_after: ReaderState,
    ) -> Result<MicroBatch> {
        let mut kept = Vec::new();
        let mut bad = 0;
        for (p, imgs) in prepared.into_iter().zip(pixels) {
            match imgs.into_iter().collect::<Result<Vec<_>>>() {
                Ok(px) => kept.push((p, px)),
                Err(e) => {
                    let file = self.sources[p.src].shard_path(p.loc.shard);
                    if self.opts.bad_image == BadImagePolicy::Fail {
                        return Err(Error::format(&file, format!("row group {}: {e}", p.loc.row_group)));
                    }
                    metrics::counter!("idavlm_samples_dropped_total", "reason" => "bad_image").increment(1);
                    tracing::warn!("{}: skipped sample: {e}", file.display());
                    bad += 1;
                }
            }
        }
        let lens: Vec<usize> = kept.iter().map(|(p, _)| p.enc.input_ids.len()).collect();
        let packed = req.packed && !kept.is_empty();
        let (batch, seq) = if packed { (1, lens.iter().sum()) } else { (kept.len(), lens.iter().copied().max().unwrap_or(0)) };
        let n_images: usize = kept.iter().map(|(_, px)| px.len()).sum();
        let size = self.opts.image_size;
        let mut mb = MicroBatch {
            kind: req.kind,
            step,
            micro: req.micro,
            sample_ids: Vec::new(),
            batch,
            seq,
            input_ids: Vec::with_capacity(kept.len() * seq),
            labels: Vec::with_capacity(kept.len() * seq),
            pixels: Vec::with_capacity(n_images * 3 * size * size),
            image_rows: Vec::new(),
            image_starts: Vec::new(),
            image_roles: Vec::new(),
            image_groups: Vec::new(),
            seq_lens: if packed { lens } else { Vec::new() },
            dropped_bad_image: bad,
            dropped_overlong: overlong + req.dropped_overlong,
            state_after,
        };
        let mut offset = 0;
        for (i, (p, px)) in kept.into_iter().enumerate() {
            let e = &p.enc;
            mb.sample_ids.push(p.sample().id.clone());
            mb.input_ids.extend(e.input_ids.iter().map(|&t| t as i64));
            let first_label = mb.labels.len();
            mb.labels.extend(&e.labels);
            if packed {
                // The previous sample's last position must not learn to predict this sample's first token.
                mb.labels[first_label] = IGNORE_INDEX;
            } else {
                mb.input_ids.extend(std::iter::repeat_n(ENDOFTEXT as i64, seq - e.input_ids.len()));
                mb.labels.extend(std::iter::repeat_n(IGNORE_INDEX, seq - e.labels.len()));
            }
            let (row, at) = if packed { (0, offset) } else { (i, 0) };
            for (k, img) in px.into_iter().enumerate() {
                mb.pixels.extend_from_slice(&img);
                mb.image_rows.push(row);
                mb.image_starts.push(at + e.image_starts[k]);
                mb.image_roles.push(e.image_roles[k]);
                mb.image_groups.push(i);
            }
            offset += e.input_ids.len();
        }
        Ok(mb)
    }

    /// Builds one micro-batch on the calling thread (blocking reads, images decoded on `workers` scoped
    /// threads). The training stream uses [`Reader::stream`] instead.
    pub fn build(&self, req: &MicroRequest, step: u64, state_after: ReaderState) -> Result<MicroBatch> {
        let fetched =
            req.samples.iter().map(|&(src, loc)| Ok((src, loc, self.rows_blocking(src, loc)?))).collect::<Result<Vec<_>>>()?;
        let (prepared, overlong) = self.prepare(fetched)?;
        let jobs: Vec<(usize, usize)> =
            prepared.iter().enumerate().flat_map(|(i, p)| (0..p.enc.image_paths.len()).map(move |k| (i, k))).collect();
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
                    *results[j].lock().expect("result lock") = Some(self.decode(&prepared[i], k));
                });
            }
        });
        let mut pixels: Vec<Vec<Result<Vec<f32>>>> = prepared.iter().map(|_| Vec::new()).collect();
        for (j, r) in results.into_iter().enumerate() {
            pixels[jobs[j].0].push(r.into_inner().expect("result lock").expect("every job ran"));
        }
        self.assemble(req, step, prepared, pixels, overlong, state_after)
    }

    /// As [`Self::build`], on the reader's runtime: row groups read asynchronously, tokenisation and
    /// each image's decode on the blocking pool, at most `decode` images at a time across the rank.
    async fn build_async(
        self: Arc<Self>,
        req: MicroRequest,
        step: u64,
        state_after: ReaderState,
        decode: Arc<tokio::sync::Semaphore>,
    ) -> Result<MicroBatch> {
        let join = |e: tokio::task::JoinError| Error::Invalid(format!("reader task failed: {e}"));
        let fetched = futures::future::try_join_all(req.samples.iter().map(|&(src, loc)| {
            let this = self.clone();
            async move { Ok::<_, Error>((src, loc, this.rows_async(src, loc).await?)) }
        }))
        .await?;
        let this = self.clone();
        let (prepared, overlong) = tokio::task::spawn_blocking(move || this.prepare(fetched)).await.map_err(join)??;
        let prepared = Arc::new(prepared);
        let mut tasks = Vec::new();
        for i in 0..prepared.len() {
            for k in 0..prepared[i].enc.image_paths.len() {
                let (this, prepared, decode) = (self.clone(), prepared.clone(), decode.clone());
                tasks.push(async move {
                    let _permit = decode.acquire_owned().await.map_err(|e| Error::Invalid(format!("decode pool: {e}")))?;
                    let r = tokio::task::spawn_blocking(move || this.decode(&prepared[i], k)).await.map_err(join)?;
                    Ok::<_, Error>((i, r))
                });
            }
        }
        let decoded = futures::future::try_join_all(tasks).await?;
        let prepared = Arc::try_unwrap(prepared).map_err(|_| Error::Invalid("decode tasks outlived the batch".into()))?;
        let mut pixels: Vec<Vec<Result<Vec<f32>>>> = prepared.iter().map(|_| Vec::new()).collect();
        for (i, r) in decoded {
            pixels[i].push(r);
        }
        tokio::task::spawn_blocking(move || self.assemble(&req, step, prepared, pixels, overlong, state_after))
            .await
            .map_err(join)?
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
    /// Packed ID micro-batches (issue #15); None: `micro_batch` samples per micro-batch, padded.
    pub packing: Option<PackShape>,
}

/// Packing of ID micro-batches: each holds whole samples of at most `tokens` tokens in all, chosen by
/// [`crate::pack::pack`] over windows of `window` samples of the global order. A step takes
/// `accum * world` micro-batches from the windows in order (micro-batch m of the step is rank
/// `m % world`'s micro `m / world`), so the number of samples per step varies and the state is the
/// window's start plus the micro-batches taken from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackShape {
    pub tokens: usize,
    pub window: usize,
}

/// One micro-batch to load: its samples (source, locator) and how to lay them out.
#[derive(Clone, Debug)]
pub struct MicroRequest {
    pub kind: BatchKind,
    pub micro: usize,
    pub samples: Vec<(usize, Locator)>,
    /// One row holding every sample (packing) instead of one row per sample.
    pub packed: bool,
    /// Samples of the packing window dropped before packing (over `max_len`), reported with this
    /// micro-batch (the window's first).
    pub dropped_overlong: usize,
}

/// A packed window: its micro-batches as (source, locator) lists, and how many of its samples were
/// too long to place.
struct Window {
    bins: Vec<Vec<(usize, Locator)>>,
    overlong: usize,
}

/// The reader of one rank: the main mixture, the optional general stream, and the loader.
pub struct Reader {
    pub loader: Arc<SampleLoader>,
    main: Mixture,
    /// Index of the general source in `loader.sources` and its mixture, when injection is on.
    general: Option<(usize, Mixture)>,
    main_sources: Vec<usize>,
    pub shape: StepShape,
    /// Packed windows by their first global position (a few: a step spans one or two).
    windows: HashMap<u64, Arc<Window>>,
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
        if let Some(p) = shape.packing {
            crate::pack::check_budget(p.tokens, opts.max_len).map_err(Error::Invalid)?;
        }
        let loader = Arc::new(SampleLoader::new(sources, tok, opts));
        Ok(Self { loader, main: main_mix, general, main_sources, shape, windows: HashMap::new() })
    }

    /// Whether training can go on from `state` (a checkpoint's): a packing window left part-way can only
    /// be resumed with the packing it was cut with.
    pub fn check_resume(&self, state: &ReaderState) -> Result<()> {
        if state.pack_bins > 0 && state.packing != self.shape.packing {
            let show = |p: Option<PackShape>| match p {
                Some(p) => format!("batch.packing.tokens {} with data.pack_window {}", p.tokens, p.window),
                None => "no packing".to_string(),
            };
            return Err(Error::Invalid(format!(
                "the checkpoint stopped {} micro-batches into a packing window of {}; this recipe has {}: \
                 resume with the checkpoint's packing (it may change at a window's end)",
                state.pack_bins,
                show(state.packing),
                show(self.shape.packing)
            )));
        }
        Ok(())
    }

    /// ID samples an optimizer step takes: `micro * accum * world`, or with packing an estimate from how
    /// the first window packs (the number varies from step to step).
    pub fn samples_per_step(&mut self) -> Result<f64> {
        let sh = self.shape.clone();
        let Some(p) = sh.packing else { return Ok((sh.micro_batch * sh.accum * sh.world) as f64) };
        let w = self.window(0, p)?;
        let placed: usize = w.bins.iter().map(Vec::len).sum();
        Ok((placed.max(1) as f64 / w.bins.len().max(1) as f64) * (sh.accum * sh.world) as f64)
    }

    pub fn main_epoch_len(&self) -> u64 {
        self.main.epoch_len()
    }

    /// The requests of one optimizer step for this rank, and the state after it. With packing this reads
    /// and tokenises the samples of the windows the step draws from (every rank packs the same windows).
    pub fn plan_step(&mut self, step: u64, state: ReaderState) -> Result<(Vec<MicroRequest>, ReaderState)> {
        let sh = self.shape.clone();
        let (main, mut after) = match sh.packing {
            None => {
                let main = (0..sh.accum)
                    .map(|j| {
                        micro_positions(state.main_position, j, sh.rank, sh.world, sh.micro_batch)
                            .map(|g| {
                                let (s, _, loc) = self.main.at(g);
                                (self.main_sources[s], loc)
                            })
                            .collect()
                    })
                    .map(|samples| (samples, 0))
                    .collect::<Vec<_>>();
                let pos = state.main_position + (sh.accum * sh.world * sh.micro_batch) as u64;
                (main, ReaderState { main_position: pos, pack_bins: 0, packing: None, ..state })
            }
            Some(p) => self.plan_packed(p, state)?,
        };
        let mut out = Vec::new();
        let mut general_pos = state.general_position;
        for (j, (samples, dropped_overlong)) in main.into_iter().enumerate() {
            out.push(MicroRequest { kind: BatchKind::Id, micro: j, samples, packed: sh.packing.is_some(), dropped_overlong });
            if let Some((gsrc, gmix)) = self.general.as_mut() {
                if inject(state.seed, step, j, sh.inject_probability) {
                    let start = general_pos + (sh.rank * sh.micro_batch) as u64;
                    let samples = (start..start + sh.micro_batch as u64).map(|g| (*gsrc, gmix.at(g).2)).collect();
                    out.push(MicroRequest { kind: BatchKind::General, micro: j, samples, packed: false, dropped_overlong: 0 });
                    general_pos += (sh.world * sh.micro_batch) as u64;
                }
            }
        }
        after.general_position = general_pos;
        Ok((out, after))
    }

    /// This rank's packed micro-batches of a step (with the overlong count each reports) and the state
    /// after the step.
    #[allow(clippy::type_complexity)]
    fn plan_packed(&mut self, p: PackShape, state: ReaderState) -> Result<(Vec<(Vec<(usize, Locator)>, usize)>, ReaderState)> {
        let sh = &self.shape;
        let (accum, world, rank) = (sh.accum, sh.world, sh.rank);
        let need = accum * world;
        let (mut start, mut taken) = (state.main_position, state.pack_bins as usize);
        // The step's micro-batches in global order, as (window, micro-batch of it).
        let mut global: Vec<(Arc<Window>, usize)> = Vec::with_capacity(need);
        let mut empty_windows = 0;
        while global.len() < need {
            let w = self.window(start, p)?;
            if w.bins.is_empty() {
                empty_windows += 1;
                if empty_windows >= 16 {
                    return Err(Error::Invalid(format!(
                        "16 packing windows in a row from global position {} hold no sample of at most max_len tokens",
                        start
                    )));
                }
            }
            let n = (w.bins.len().saturating_sub(taken)).min(need - global.len());
            global.extend((taken..taken + n).map(|b| (w.clone(), b)));
            taken += n;
            if taken >= w.bins.len() {
                start += p.window as u64;
                taken = 0;
            }
        }
        // Keep the windows this step or the next can still use.
        self.windows.retain(|&k, _| k >= start.saturating_sub(p.window as u64));
        let mine = (0..accum)
            .map(|j| {
                let (w, b) = &global[j * world + rank];
                (w.bins[*b].clone(), if *b == 0 { w.overlong } else { 0 })
            })
            .collect();
        Ok((mine, ReaderState { main_position: start, pack_bins: taken as u64, packing: Some(p), ..state }))
    }

    /// The packing of the window of `p.window` samples starting at global position `start` (cached).
    fn window(&mut self, start: u64, p: PackShape) -> Result<Arc<Window>> {
        if let Some(w) = self.windows.get(&start) {
            return Ok(w.clone());
        }
        let mut samples = Vec::with_capacity(p.window);
        let mut lengths = Vec::with_capacity(p.window);
        let mut overlong = 0;
        for g in start..start + p.window as u64 {
            let (s, _, loc) = self.main.at(g);
            let src = self.main_sources[s];
            match self.loader.length(src, loc)? {
                Some(len) => {
                    samples.push((src, loc));
                    lengths.push(len);
                }
                None => overlong += 1,
            }
        }
        let packing = crate::pack::pack(&lengths, p.tokens, p.window);
        debug_assert!(packing.too_long.is_empty(), "tokens >= max_len is checked at construction");
        let bins = packing.bins.iter().map(|b| b.iter().map(|&i| samples[i]).collect()).collect();
        let w = Arc::new(Window { bins, overlong });
        self.windows.insert(start, w.clone());
        Ok(w)
    }

    /// Starts loading steps `first_step..` from `state` on the reader's own tokio runtime: up to
    /// `prefetch_steps` steps are in flight at once (row-group reads, tokenisation, image decodes), and
    /// finished steps wait in order in a bounded queue. Loading stops when the [`StepStream`] is
    /// dropped or after the first error, which is delivered in its place.
    pub fn stream(mut self, first_step: u64, state: ReaderState, prefetch_steps: usize) -> StepStream {
        use futures::StreamExt;
        let workers = self.loader.opts.workers.max(1);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(workers + 2)
            .thread_name("idavlm-reader")
            .enable_all()
            .build()
            .expect("reader runtime");
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let decode = Arc::new(tokio::sync::Semaphore::new(workers));
        let loader = self.loader.clone();
        rt.spawn(async move {
            let mut state = state;
            let steps = futures::stream::iter(first_step..)
                .map(|step| {
                    // With packing, planning reads and tokenises the window's samples: blocking work.
                    let planned = tokio::task::block_in_place(|| self.plan_step(step, state));
                    if let Ok((_, after)) = &planned {
                        state = *after;
                    }
                    let (loader, decode) = (loader.clone(), decode.clone());
                    async move {
                        let (reqs, after) = planned?;
                        let micro = reqs.into_iter().map(|r| loader.clone().build_async(r, step, after, decode.clone()));
                        let micro_batches = futures::future::try_join_all(micro).await?;
                        Ok(StepBatches { step, micro_batches, state_after: after })
                    }
                })
                .buffered(prefetch_steps.max(1));
            futures::pin_mut!(steps);
            while let Some(r) = steps.next().await {
                let failed = r.is_err();
                if tx.send(r).await.is_err() || failed {
                    return;
                }
            }
        });
        StepStream { rx, rt: Some(rt) }
    }
}

/// The consuming end of [`Reader::stream`]: steps in order, on the training thread.
pub struct StepStream {
    rx: tokio::sync::mpsc::Receiver<Result<StepBatches>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl StepStream {
    /// The next step's micro-batches (blocking until loaded), or the error that stopped the reader.
    pub fn next_step(&mut self) -> Result<StepBatches> {
        self.rx.blocking_recv().unwrap_or_else(|| Err(Error::Invalid("the data reader stopped".into())))
    }
}

impl Drop for StepStream {
    fn drop(&mut self) {
        self.rx.close();
        // Decodes in progress finish on their own; nothing waits for them.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
