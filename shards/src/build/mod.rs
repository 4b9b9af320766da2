//! `idavlm-shards build SOURCE ROOT OUT`: IDA-VLM's tuning data straight from a public release, in its
//! own layout, to Parquet shards. The rules are those of the original `ID_reference_data/` scripts
//! (vcr_trans.py, f30k_trans.py, ref_trans.py, movienet/trans_loc.py): people's boxes are cropped (and
//! flipped at random), each person gets a random name, and the "Name is <img>crop</img>" conversations
//! are written. Unlike the scripts, nothing is written beside the dataset (crops are cut in memory and
//! embedded as lossless PNG), the output is deterministic for a `--seed` (each record draws from its own
//! seeded stream, so the result does not depend on the number of threads), every skipped record is
//! counted by reason, and a malformed annotation record stops the build naming its file and line.
//!
//! - [`vcr`]: VCR's `{split}.jsonl` with its per-image box JSON;
//! - [`flickr30k`]: Shikra's Flickr30k Entities jsonl (`<ph_st>..<ph_ed>` phrases, `boxes`, `boxes_seq`);
//! - [`refcoco`]: the refer annotations (`refs(unc).p` + `instances.json`) and COCO images;
//! - [`movienet`]: the location task from MovieNet's annotation and meta files.
//!
//! The stage-1 mixture (VCR 30k, Flickr30k 30k, RefCOCO 20k, LLaVA 10k) is the recipe's
//! `data.sources` with per-source `count`s (`recipes/stage1.yaml`).

pub mod flickr30k;
pub mod movienet;
pub mod refcoco;
pub mod vcr;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::chat::{encode_conversation, Overflow, Turn};
use crate::error::{Error, Result};
use crate::format::{DatasetWriter, ImageBlob, Manifest, Sample};
use crate::tokenizer::Tokenizer;

/// The names the original scripts give people (their list, each name once: theirs holds Jessica,
/// Elizabeth and Sharon twice, so one sample could name two people alike).
pub const NAMES: [&str; 97] = [
    "James", "John", "Robert", "Michael", "William", "David", "Richard", "Joseph", "Charles", "Thomas", "Christopher",
    "Daniel", "Matthew", "Anthony", "Mark", "Donald", "Steven", "Paul", "Andrew", "Kenneth", "George", "Joshua", "Brian",
    "Edward", "Kevin", "Ronald", "Timothy", "Jason", "Jeffrey", "Ryan", "Gary", "Nicholas", "Eric", "Stephen", "Larry",
    "Justin", "Scott", "Brandon", "Benjamin", "Samuel", "Frank", "Gregory", "Raymond", "Alexander", "Patrick", "Jack",
    "Dennis", "Jerry", "Tyler", "Aaron", "Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan",
    "Jessica", "Sarah", "Karen", "Nancy", "Lisa", "Betty", "Margaret", "Sandra", "Ashley", "Kimberly", "Emily", "Dorothy",
    "Helen", "Amanda", "Melissa", "Deborah", "Laura", "Cynthia", "Angela", "Ruth", "Sharon", "Michelle", "Anna",
    "Carolyn", "Virginia", "Samantha", "Nicole", "Heather", "Diane", "Joyce", "Amber", "Megan", "Natalie", "Grace",
    "Tiffany", "Victoria", "Tracy", "Christine", "Rebecca", "Rachel",
];

/// The public releases `build` reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceKind {
    Vcr,
    Flickr30k,
    Refcoco,
    Movienet,
}

impl SourceKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Vcr => "vcr",
            Self::Flickr30k => "flickr30k",
            Self::Refcoco => "refcoco",
            Self::Movienet => "movienet",
        }
    }
}

/// The chat template the conversations are written for (box answers take its form).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Template {
    /// Qwen-VL: `<ref>NAME</ref><box>(x1,y1),(x2,y2)</box>` in 0..1000.
    #[default]
    QwenVl,
}

impl Template {
    /// A grounding answer for `name` at `b` (0..1000 coordinates).
    pub fn box_answer(self, name: &str, b: [i64; 4]) -> String {
        match self {
            Template::QwenVl => format!("<ref>{name}</ref><box>({},{}),({},{})</box>", b[0], b[1], b[2], b[3]),
        }
    }
}

#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub seed: u64,
    /// The split to read (`train`, `val`, ...), as each source names its files.
    pub split: String,
    pub template: Template,
    /// The source name recorded in every row (default: the SOURCE's name).
    pub source: Option<String>,
    pub max_len: usize,
    pub target_shard_bytes: u64,
    pub row_group_rows: usize,
    pub workers: usize,
    /// Stop after this many annotation records (a quick look at a large release).
    pub limit: Option<usize>,
    /// Write each record's random choices as JSON lines here (for checking against the original rules).
    pub dump_choices: Option<PathBuf>,
    /// Flickr30k: a JSON list of caption-request templates holding `<image>` (default: [`flickr30k::TEMPLATES`]).
    pub templates: Option<PathBuf>,
    /// MovieNet: the file listing the movies to read (default: ROOT/SPLIT_split.txt).
    pub split_file: Option<PathBuf>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            split: "train".into(),
            template: Template::QwenVl,
            source: None,
            max_len: 2048,
            target_shard_bytes: 256 << 20,
            row_group_rows: 64,
            workers: 1,
            limit: None,
            dump_choices: None,
            templates: None,
            split_file: None,
        }
    }
}

/// What a build wrote and skipped.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BuildReport {
    pub records: u64,
    pub written: u64,
    /// Skipped records by reason.
    pub skipped: BTreeMap<String, u64>,
    pub images: u64,
    #[serde(skip)]
    pub seconds: f64,
    #[serde(skip)]
    pub manifest: Option<Manifest>,
}

/// One annotation record, as read: its place in its file (for errors) and its parsed content.
pub struct Record<T> {
    pub file: PathBuf,
    pub line: usize,
    pub value: T,
}

/// One conversation built from a record, with its images (in the text's order) and the random
/// choices that made it.
pub struct Built {
    pub turns: Vec<Turn>,
    pub images: Vec<ImageBlob>,
    pub choices: serde_json::Value,
}

/// What one record became: its samples (one for most sources, any number for a MovieNet movie) and
/// the reasons of what it skipped.
#[derive(Default)]
pub struct Outcome {
    pub samples: Vec<Built>,
    pub skipped: Vec<&'static str>,
}

impl Outcome {
    pub fn one(turns: Vec<Turn>, images: Vec<ImageBlob>, choices: serde_json::Value) -> Self {
        Self { samples: vec![Built { turns, images, choices }], skipped: vec![] }
    }

    pub fn skip(why: &'static str) -> Self {
        Self { samples: vec![], skipped: vec![why] }
    }
}

/// The per-record random stream: the seed, the source and the record's index, so a record's draws do
/// not depend on the others (or on the number of threads).
pub fn record_rng(seed: u64, source: SourceKind, index: usize) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed ^ 0x1da_u64.wrapping_mul(source as u64 + 1));
    r.set_stream(index as u64);
    r
}

/// `k` distinct names in draw order (Python's `random.sample(names, k)`).
pub fn sample_names(rng: &mut ChaCha8Rng, k: usize) -> Vec<&'static str> {
    rand::seq::index::sample(rng, NAMES.len(), k.min(NAMES.len())).into_iter().map(|i| NAMES[i]).collect()
}

/// `random.random() > 0.5`.
pub fn coin(rng: &mut ChaCha8Rng) -> bool {
    rng.random::<f64>() > 0.5
}

/// A decoded image.
pub struct Rgb {
    pub px: Vec<u8>,
    pub w: usize,
    pub h: usize,
}

impl Rgb {
    pub fn decode(bytes: &[u8], what: &str) -> Result<Self> {
        let (px, w, h) = crate::preprocess::decode_rgb8(bytes, what)?;
        Ok(Self { px, w, h })
    }

    /// PIL's `Image.crop(box)`: each coordinate rounded half to even, the region outside the image
    /// black; then `transpose(FLIP_LEFT_RIGHT)` when `flip`. Encoded as PNG (lossless: the crop the
    /// model sees is the one cut, not a second JPEG of it).
    pub fn crop_png(&self, b: [f64; 4], flip: bool) -> Vec<u8> {
        let r = |v: f64| v.round_ties_even() as i64;
        let (x0, y0, x1, y1) = (r(b[0]), r(b[1]), r(b[2]), r(b[3]));
        let (cw, ch) = ((x1 - x0).max(0) as usize, (y1 - y0).max(0) as usize);
        let mut out = vec![0u8; cw * ch * 3];
        for y in 0..ch {
            let sy = y0 + y as i64;
            if sy < 0 || sy >= self.h as i64 {
                continue;
            }
            for x in 0..cw {
                let sx = x0 + x as i64;
                if sx < 0 || sx >= self.w as i64 {
                    continue;
                }
                let dx = if flip { cw - 1 - x } else { x };
                let s = (sy as usize * self.w + sx as usize) * 3;
                let d = (y * cw + dx) * 3;
                out[d..d + 3].copy_from_slice(&self.px[s..s + 3]);
            }
        }
        encode_png(&out, cw, ch)
    }
}

pub fn encode_png(px: &[u8], w: usize, h: usize) -> Vec<u8> {
    use image::ImageEncoder;
    let mut buf = Vec::new();
    image::codecs::png::PngEncoder::new_with_quality(
        &mut buf,
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Adaptive,
    )
    .write_image(px, w as u32, h as u32, image::ExtendedColorType::Rgb8)
    .expect("PNG encoding of an in-memory RGB buffer");
    buf
}

/// A box's 0..1000 coordinates in an image of `w` x `h` (`int(1000 * x / w)`: truncation toward zero).
pub fn thousandths(b: [f64; 4], w: f64, h: f64) -> [i64; 4] {
    [(1000.0 * b[0] / w) as i64, (1000.0 * b[1] / h) as i64, (1000.0 * b[2] / w) as i64, (1000.0 * b[3] / h) as i64]
}

/// Reads a file of the release (an error names it).
pub fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// The lines of a JSONL annotation file, each parsed; a line that is not JSON stops the build naming
/// the file and line.
pub fn jsonl(path: &Path) -> Result<Vec<Record<serde_json::Value>>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value = serde_json::from_str(line).map_err(|e| Error::format(path, format!("line {}: not JSON: {e}", i + 1)))?;
        out.push(Record { file: path.to_path_buf(), line: i + 1, value });
    }
    Ok(out)
}

/// A malformed record: the error names the file, the line and what is wrong.
pub fn malformed<T>(file: &Path, line: usize, what: impl std::fmt::Display) -> Result<T> {
    Err(Error::format(file, format!("line {line}: malformed annotation record: {what}")))
}

/// Builds a dataset from records: `make` turns record i (with its own random stream) into a sample or a
/// skip, on `workers` threads in chunks, written in record order.
pub fn run<T: Sync>(
    kind: SourceKind,
    records: &[Record<T>],
    out: &Path,
    tok: &Tokenizer,
    o: &BuildOptions,
    progress: &(dyn Fn(u64) + Sync),
    make: &(dyn Fn(&Record<T>, &mut ChaCha8Rng) -> Result<Outcome> + Sync),
) -> Result<BuildReport> {
    let t0 = std::time::Instant::now();
    let source = o.source.clone().unwrap_or_else(|| kind.name().to_string());
    let n = records.len().min(o.limit.unwrap_or(usize::MAX));
    let mut report = BuildReport { records: n as u64, ..Default::default() };
    let mut dump = match &o.dump_choices {
        Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p).map_err(|e| Error::io(p, e))?)),
        None => None,
    };
    let mut w = DatasetWriter::create(out, &source, o.target_shard_bytes, o.row_group_rows)?;
    let chunk = (o.workers.max(1) * 32).max(64);
    let mut start = 0;
    while start < n {
        let end = (start + chunk).min(n);
        let results: Vec<std::sync::Mutex<Option<Result<Outcome>>>> = (start..end).map(|_| Default::default()).collect();
        let next = AtomicUsize::new(start);
        std::thread::scope(|s| {
            for _ in 0..o.workers.max(1) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= end {
                        return;
                    }
                    let mut rng = record_rng(o.seed, kind, i);
                    *results[i - start].lock().expect("lock") = Some(make(&records[i], &mut rng));
                });
            }
        });
        for (k, r) in results.into_iter().enumerate() {
            let i = start + k;
            let outcome = r.into_inner().expect("lock").expect("every record built")?;
            for why in outcome.skipped {
                *report.skipped.entry(why.to_string()).or_default() += 1;
            }
            for (j, b) in outcome.samples.into_iter().enumerate() {
                let id = format!("{}-{i:07}-{j:02}", kind.name());
                let Ok(enc) = encode_conversation(tok, &id, &b.turns, o.max_len, Overflow::Reject) else {
                    *report.skipped.entry(format!("longer than max_len {}", o.max_len)).or_default() += 1;
                    continue;
                };
                if let Some(d) = dump.as_mut() {
                    let line = serde_json::json!({"record": i, "id": id, "choices": b.choices});
                    writeln!(d, "{line}").map_err(|e| Error::io(o.dump_choices.as_deref().expect("dump"), e))?;
                }
                report.images += b.images.len() as u64;
                let sample =
                    Sample { id, source: source.clone(), conversations: b.turns, images: b.images, num_tokens: enc.input_ids.len() as i32 };
                w.push(sample)?;
                report.written += 1;
            }
        }
        progress((end - start) as u64);
        start = end;
    }
    if let Some(mut d) = dump {
        d.flush().map_err(|e| Error::io(o.dump_choices.as_deref().expect("dump"), e))?;
    }
    report.manifest = Some(w.finish()?);
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// Reads SOURCE's annotations under `root` and builds the dataset into `out`.
pub fn build(
    kind: SourceKind,
    root: &Path,
    out: &Path,
    tok: &Tokenizer,
    o: &BuildOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<BuildReport> {
    // (An output folder that already holds a dataset is refused by the writer, and is not removed.)
    let created = !out.exists();
    let r = match kind {
        SourceKind::Vcr => vcr::build(root, out, tok, o, progress),
        SourceKind::Flickr30k => flickr30k::build(root, out, tok, o, progress),
        SourceKind::Refcoco => refcoco::build(root, out, tok, o, progress),
        SourceKind::Movienet => movienet::build(root, out, tok, o, progress),
    };
    // A failed build leaves no partial dataset behind.
    if r.is_err() && created {
        let _ = std::fs::remove_dir_all(out);
    }
    r
}

/// A path relative to the release root, as written in the conversations.
pub fn rel(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).unwrap_or(p).to_string_lossy().replace('\\', "/")
}
