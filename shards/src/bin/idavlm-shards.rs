//! idavlm-shards: convert tuning data to Parquet shards, inspect and verify datasets, generate the
//! synthetic ID dataset, and benchmark the data path.
//!
//! Exit codes: 0 success; 1 error; 2 bad samples found in `convert` (with `--on-bad-sample fail`) or
//! checksum mismatches in `verify`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use idavlm_shards::chat::{encode_conversation, Overflow};
use idavlm_shards::convert::{convert, ConvertOptions, OnBad};
use idavlm_shards::format::{load_footer, read_row_group_with, row_group_sizes, sha256_file, Manifest};
use idavlm_shards::reader::{BadImagePolicy, LoadOptions, Reader, ReaderState, Source, StepShape};
use idavlm_shards::synth::{write_synth, SynthOptions};
use idavlm_shards::tokenizer::Tokenizer;

#[derive(Parser)]
#[command(name = "idavlm-shards", version, about = "IDA-VLM dataset tool: Parquet shards, synthetic data, data-path benchmark")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// How samples are cut and laid into shards (`convert` and `build`).
#[derive(clap::Args)]
struct Sharding {
    /// Tokens per sample; a longer one is not written.
    #[arg(long, default_value_t = 2048)]
    max_len: usize,
    /// Target shard size in MiB.
    #[arg(long, default_value_t = 256)]
    shard_mib: u64,
    /// Samples per row group (the unit of shuffling).
    #[arg(long, default_value_t = 64)]
    row_group: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build tuning shards straight from a public release in its own layout (VCR, Flickr30k Entities in
    /// Shikra's form, RefCOCO/+/g, MovieNet), by the rules of the original IDA-VLM scripts: crops cut in
    /// memory and embedded, a random name per person, deterministic for --seed.
    Build {
        #[arg(value_enum)]
        source: idavlm_shards::build::SourceKind,
        /// The release's folder (vcr: vcr1annots/ and vcr1images/; flickr30k: CWB_flickr30k_SPLIT.jsonl and
        /// flickr30k-images/; refcoco: refcoco*/ and the COCO train2014 images; movienet: files/, 240P/ and
        /// SPLIT_split.txt).
        root: PathBuf,
        /// Output dataset folder (must not hold a dataset).
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The split to read (refcoco: several, comma-separated: train,val).
        #[arg(long, default_value = "train")]
        split: String,
        /// The chat template the answers are written for.
        #[arg(long, value_enum, default_value_t = idavlm_shards::build::Template::QwenVl)]
        template: idavlm_shards::build::Template,
        /// Source name recorded in every row (default: SOURCE).
        #[arg(long)]
        source_name: Option<String>,
        #[command(flatten)]
        sharding: Sharding,
        /// Threads (default: all cores); the output does not depend on it.
        #[arg(long)]
        workers: Option<usize>,
        /// Only the first N annotation records.
        #[arg(long)]
        limit: Option<usize>,
        /// flickr30k: the caption-request templates (a JSON list of strings holding <image>; the original
        /// used Shikra's flickr30k.json).
        #[arg(long)]
        templates: Option<PathBuf>,
        /// movienet: the file listing the movies (default: ROOT/SPLIT_split.txt).
        #[arg(long)]
        split_file: Option<PathBuf>,
        /// Write each record's random choices (names, flips, prompt form) as JSON lines to this file.
        #[arg(long)]
        dump_choices: Option<PathBuf>,
    },
    /// Convert a JSON list of {id, conversations} plus an image folder into Parquet shards.
    Convert {
        /// The tuning JSON file.
        json: PathBuf,
        /// Output dataset folder (must not hold a dataset).
        out: PathBuf,
        /// Folder that relative <img>PATH</img> paths are resolved against.
        #[arg(long, default_value = ".")]
        images: PathBuf,
        /// Source name recorded in every row and the manifest (default: the JSON file's stem).
        #[arg(long)]
        source: Option<String>,
        #[command(flatten)]
        sharding: Sharding,
        #[arg(long, value_enum, default_value_t = OnBad::Fail)]
        on_bad_sample: OnBad,
        /// Checking threads (default: all cores).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Counts and token / image-count histograms per source.
    Inspect {
        dir: PathBuf,
        /// Also report how samples would pack into micro-batches of this many tokens (best-fit over
        /// windows of --pack-window samples in reading order), against padding every sample to max_len.
        #[arg(long, value_name = "TOKENS")]
        pack: Option<usize>,
        #[arg(long, default_value_t = 1000)]
        pack_window: usize,
        /// The max_len the original pads every sample to (for the comparison).
        #[arg(long, default_value_t = 2048)]
        max_len: usize,
    },
    /// Checks every shard's sha256 and footer against the manifest.
    Verify { dir: PathBuf },
    /// Converts an MM-ID-layout benchmark (JSON + image folder) into a Parquet eval dataset that
    /// `idavlm-infer --bench` accepts: one row per item, source = type, images embedded.
    ConvertEval {
        /// The MM-ID JSON file.
        json: PathBuf,
        /// Output dataset folder (must not hold a dataset).
        out: PathBuf,
        /// Root of the items' image paths (default: the JSON file's folder).
        #[arg(long)]
        images: Option<PathBuf>,
    },
    /// Writes the synthetic ID dataset: OUT/id, OUT/general (Parquet) and OUT/eval (the held-out split as
    /// MM-ID JSON + images, and as a Parquet eval dataset in OUT/eval/shards).
    Synth {
        out: PathBuf,
        #[arg(long, default_value_t = 1234)]
        seed: u64,
        #[arg(long, default_value_t = 12)]
        cast: usize,
        #[arg(long, default_value_t = 1200)]
        id_samples: usize,
        #[arg(long, default_value_t = 200)]
        general_samples: usize,
        /// Held-out ID samples in the training format (out/heldout), for `eval.data`.
        #[arg(long, default_value_t = 64)]
        heldout_samples: usize,
        #[arg(long, default_value_t = 40)]
        eval_per_type: usize,
        #[arg(long, default_value_t = 32)]
        row_group: usize,
        /// The ID samples' kinds, taken in turn (a kind named twice comes twice as often).
        #[arg(long, value_delimiter = ',', default_value = "location,location,matching,qa,caption")]
        kinds: Vec<idavlm_shards::synth::Kind>,
    },
    /// Data-path benchmark: images/s per core (Parquet bytes -> normalised SIZE x SIZE) and reader samples/s,
    /// plus the PIL anchor of PERF.md on the same photos and core when the project's python is there.
    Bench {
        dir: PathBuf,
        /// Also time decode + resize of generated photos of this size (PERF.md's anchor uses 640x360 JPEG).
        #[arg(long, default_value = "640x360")]
        photo: String,
        #[arg(long, default_value_t = 448)]
        image_size: usize,
        #[arg(long, default_value_t = 400)]
        images: usize,
        #[arg(long, default_value_t = 1)]
        workers: usize,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// A dataset's source name from its input file's stem (`default` when it has none).
fn stem_name(json: &std::path::Path, default: &str) -> String {
    json.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| default.into())
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Convert { json, out, images, source, sharding: Sharding { max_len, shard_mib, row_group }, on_bad_sample, workers } => {
            let tok = Tokenizer::load_default()?;
            let source = source.unwrap_or_else(|| stem_name(&json, "data"));
            let o = ConvertOptions {
                source,
                max_len,
                target_shard_bytes: shard_mib << 20,
                row_group_rows: row_group,
                on_bad: on_bad_sample,
                workers: workers.unwrap_or_else(cores),
            };
            let r = convert(&json, &images, &out, &tok, &o)?;
            for b in r.bad.iter().take(10) {
                eprintln!("bad sample #{} id={}: {}", b.index, b.id, b.reason);
            }
            if r.bad.len() > 10 {
                eprintln!("... and {} more bad samples", r.bad.len() - 10);
            }
            match r.manifest {
                Some(m) => {
                    println!(
                        "wrote {} samples in {} shards to {} ({} bad samples skipped)",
                        r.written,
                        m.shards.len(),
                        out.display(),
                        r.bad.len()
                    );
                    Ok(0)
                }
                None => {
                    eprintln!(
                        "{}: {} bad samples; nothing written (use --on-bad-sample skip to drop them)",
                        json.display(),
                        r.bad.len()
                    );
                    Ok(2)
                }
            }
        }
        Cmd::Inspect { dir, pack, pack_window, max_len } => {
            let m = Manifest::load(&dir)?;
            let mut lengths: Vec<usize> = Vec::new();
            let mut per_source: BTreeMap<String, (u64, BTreeMap<u32, u64>, BTreeMap<usize, u64>)> = BTreeMap::new();
            for sh in &m.shards {
                let f = dir.join(&sh.file);
                let footer = load_footer(&f)?;
                for rg in 0..footer.metadata().num_row_groups() {
                    for s in read_row_group_with(&f, &footer, rg)? {
                        lengths.push(s.num_tokens as usize);
                        let e = per_source.entry(s.source.clone()).or_default();
                        e.0 += 1;
                        *e.1.entry((s.num_tokens as u32 / 256) * 256).or_default() += 1;
                        *e.2.entry(s.images.len()).or_default() += 1;
                    }
                }
            }
            println!("{}: source {:?}, {} samples in {} shards", dir.display(), m.source, m.total_samples, m.shards.len());
            for (src, (n, toks, imgs)) in per_source {
                println!("source {src}: {n} samples");
                println!(
                    "  tokens (bucket of 256: count): {}",
                    toks.iter().map(|(k, v)| format!("{k}-{}: {v}", k + 255)).collect::<Vec<_>>().join(", ")
                );
                println!("  images per sample: {}", imgs.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", "));
            }
            if let Some(budget) = pack {
                let p = idavlm_shards::pack::pack(&lengths, budget, pack_window);
                let total: usize = lengths.iter().sum();
                println!(
                    "packing into {budget}-token micro-batches (best fit over windows of {pack_window}): {} micro-batches, \
                     efficiency {:.1}% ({} samples longer than {budget} tokens left out); padding every sample to {max_len}: {:.1}%",
                    p.bins.len(),
                    100.0 * p.efficiency(&lengths, budget),
                    p.too_long.len(),
                    100.0 * total as f64 / (lengths.len().max(1) * max_len) as f64
                );
            }
            Ok(0)
        }
        Cmd::Build {
            source,
            root,
            out,
            seed,
            split,
            template,
            source_name,
            sharding: Sharding { max_len, shard_mib, row_group },
            workers,
            limit,
            templates,
            split_file,
            dump_choices,
        } => {
            let tok = Tokenizer::load_default()?;
            let o = idavlm_shards::build::BuildOptions {
                seed,
                split,
                template,
                source: source_name,
                max_len,
                target_shard_bytes: shard_mib << 20,
                row_group_rows: row_group,
                workers: workers.unwrap_or_else(cores),
                limit,
                dump_choices,
                templates,
                split_file,
            };
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} records [{elapsed_precise}<{eta_precise}]")
                    .expect("template"),
            );
            bar.set_message(format!("building {}", source.name()));
            let r = idavlm_shards::build::build(source, &root, &out, &tok, &o, &|done, total| {
                bar.set_length(total);
                bar.inc(done);
            })
            .with_context(|| format!("building {} from {}", source.name(), root.display()))?;
            bar.finish_and_clear();
            let shards = r.manifest.as_ref().map(|m| m.shards.len()).unwrap_or(0);
            println!(
                "{}: {} records -> {} samples ({} images) in {shards} shards in {} ({:.1} s, {:.0} images/s)",
                source.name(),
                r.records,
                r.written,
                r.images,
                out.display(),
                r.seconds,
                r.images as f64 / r.seconds.max(1e-9)
            );
            for (why, n) in &r.skipped {
                println!("  skipped {n:>8}  {why}");
            }
            std::fs::write(out.join("build-report.json"), serde_json::to_vec_pretty(&r)?)?;
            Ok(0)
        }
        Cmd::Verify { dir } => {
            let m = Manifest::load(&dir)?;
            let mut bad = 0;
            for sh in &m.shards {
                let f = dir.join(&sh.file);
                // Every check runs on every shard: checksum, magic bytes, footer, schema, row count.
                let mut problems = Vec::new();
                match sha256_file(&f) {
                    Ok(sum) if sum != sh.sha256 => problems.push(format!("sha256 {sum}, index.json says {}", sh.sha256)),
                    Ok(_) => {}
                    Err(e) => problems.push(e.to_string()),
                }
                match row_group_sizes(&f) {
                    Ok(sizes) => {
                        let rows: usize = sizes.iter().sum();
                        if rows as u64 != sh.rows {
                            problems.push(format!("{rows} rows, index.json says {}", sh.rows));
                        }
                    }
                    Err(e) => problems.push(e.to_string()),
                }
                if !problems.is_empty() {
                    bad += 1;
                    for p in problems {
                        // Errors from the format module already start with the file's path.
                        let shown = p.strip_prefix(&format!("{}: ", f.display())).unwrap_or(&p).to_string();
                        eprintln!("{}: {shown}", f.display());
                    }
                }
            }
            println!("{}: {} shards, {} bad", dir.display(), m.shards.len(), bad);
            Ok(if bad == 0 { 0 } else { 2 })
        }
        Cmd::ConvertEval { json, out, images } => {
            let tok = Tokenizer::load_default()?;
            let root = images.unwrap_or_else(|| json.parent().map(|p| p.to_path_buf()).unwrap_or_default());
            let items = idavlm_shards::mmid::read_json(&json)?;
            let m = idavlm_shards::mmid::write_parquet(&items, &root, &out, &stem_name(&json, "eval"), &|turns| {
                Ok(encode_conversation(&tok, "eval", turns, usize::MAX, Overflow::Reject)?.input_ids.len() as i32)
            })?;
            println!("{}: {} items in {} shard(s) -> {}", json.display(), m.total_samples, m.shards.len(), out.display());
            Ok(0)
        }
        Cmd::Synth { out, seed, cast, id_samples, general_samples, heldout_samples, eval_per_type, row_group, kinds } => {
            let tok = Tokenizer::load_default()?;
            let o = SynthOptions {
                seed,
                cast_size: cast,
                id_samples,
                general_samples,
                heldout_samples,
                eval_per_type,
                row_group_rows: row_group,
                id_kinds: kinds,
                ..Default::default()
            };
            write_synth(&out, &o, &|turns| {
                Ok(encode_conversation(&tok, "synth", turns, usize::MAX, Overflow::Reject)?.input_ids.len() as i32)
            })?;
            println!("wrote synthetic dataset to {} (seed {seed})", out.display());
            Ok(0)
        }
        Cmd::Bench { dir, image_size, images, workers, photo } => {
            photo_bench(&photo, image_size, images)?;
            bench(&dir, image_size, images, workers)
        }
    }
}

/// Decode + resize + normalise of generated JPEG photos on one core, beside PIL on the same files.
fn photo_bench(photo: &str, size: usize, n: usize) -> Result<()> {
    let (w, h) = photo
        .split_once('x')
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
        .context("--photo WxH")?;
    let dir = std::env::temp_dir().join(format!("idavlm-photo-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let blobs: Vec<Vec<u8>> = (0..n.min(200)).map(|i| idavlm_shards::synth::photo_jpeg(w, h, i as u64)).collect();
    let mut files = Vec::new();
    for (i, b) in blobs.iter().enumerate() {
        let f = dir.join(format!("{i}.jpg"));
        std::fs::write(&f, b)?;
        files.push(f);
    }
    let t = Instant::now();
    for (i, b) in blobs.iter().enumerate() {
        std::hint::black_box(idavlm_shards::preprocess::preprocess_image(b, size, Default::default(), &format!("#{i}"))?);
    }
    let ours = blobs.len() as f64 / t.elapsed().as_secs_f64();
    // The split: decode alone, then resize + normalise alone on the decoded pixels.
    let t = Instant::now();
    let decoded: Vec<(Vec<u8>, usize, usize)> =
        blobs.iter().map(|b| idavlm_shards::preprocess::decode_rgb8(b, "photo")).collect::<Result<_, _>>()?;
    let decode_ms = t.elapsed().as_secs_f64() * 1e3 / blobs.len() as f64;
    let mut out = vec![0f32; 3 * size * size];
    let t = Instant::now();
    for (rgb, w, h) in &decoded {
        idavlm_shards::preprocess::resize_normalise_into(rgb, *w, *h, size, Default::default(), &mut out);
        std::hint::black_box(&out);
    }
    let resize_ms = t.elapsed().as_secs_f64() * 1e3 / blobs.len() as f64;
    println!("{w}x{h} JPEG photos -> normalised {size}x{size}, one core:");
    println!("  idavlm (decode + PIL-exact bicubic + normalise): {ours:.1} images/s  [decode {decode_ms:.2} ms, resize+normalise {resize_ms:.2} ms per image]");
    let py = std::env::var("IDAVLM_PYTHON").unwrap_or_else(|_| ".venv/bin/python".into());
    let script = std::path::Path::new("scripts/pil_anchor.py");
    if script.is_file() {
        let out = std::process::Command::new("taskset")
            .arg("-c")
            .arg("0")
            .arg(&py)
            .arg(script)
            .arg(size.to_string())
            .args(&files)
            .output();
        let out = match out {
            Ok(o) if o.status.success() => Ok(o),
            _ => std::process::Command::new(&py).arg(script).arg(size.to_string()).args(&files).output(),
        };
        match out {
            Ok(o) if o.status.success() => {
                let pil: f64 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap_or(f64::NAN);
                println!("  Python anchor (PIL + numpy, same photos):        {pil:.1} images/s  -> idavlm is {:.2}x", ours / pil);
            }
            _ => println!("  Python anchor not run ({py} with PIL and numpy not found)"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn bench(dir: &std::path::Path, size: usize, n_images: usize, workers: usize) -> Result<i32> {
    let src = Source::open("bench", dir)?;
    let mut blobs = Vec::new();
    for &(shard, rg, _) in &src.layout.blocks {
        for s in read_row_group_with(&src.shard_path(shard), &src.footers[shard as usize], rg as usize)? {
            blobs.extend(s.images.into_iter().map(|b| b.bytes));
        }
        if blobs.len() >= n_images {
            blobs.truncate(n_images);
            break;
        }
    }
    anyhow::ensure!(!blobs.is_empty(), "{}: no images", dir.display());
    // One core: decode + resize + normalise, from the bytes as stored in Parquet.
    let t = Instant::now();
    for (i, b) in blobs.iter().enumerate() {
        std::hint::black_box(idavlm_shards::preprocess::preprocess_image(b, size, Default::default(), &format!("#{i}"))?);
    }
    let per_core = blobs.len() as f64 / t.elapsed().as_secs_f64();
    // What the reader's shard checksum (on by default, once per shard and process) costs.
    let t = Instant::now();
    let mut hashed = 0u64;
    for sh in &src.manifest.shards {
        std::hint::black_box(sha256_file(&src.dir.join(&sh.file))?);
        hashed += sh.bytes;
    }
    let sha_mb_s = hashed as f64 / 1e6 / t.elapsed().as_secs_f64();
    // The whole reader on one rank: Parquet row groups -> padded micro-batches with pixels.
    let tok = Arc::new(Tokenizer::load_default()?);
    let total = src.layout.len();
    let reader = Reader::new(
        vec![src],
        tok,
        LoadOptions { image_size: size, max_len: 1 << 20, bad_image: BadImagePolicy::Fail, workers, resize: Default::default() },
        0,
        &[(0, total)],
        None,
        StepShape { micro_batch: 2, accum: 8, world: 1, rank: 0, inject_probability: 0.0, packing: None },
    )?;
    let mut rx = reader.stream(0, ReaderState::default(), 8);
    let t = Instant::now();
    let (mut samples, mut imgs) = (0usize, 0usize);
    while samples < 256 {
        let step = rx.next_step()?;
        for mb in &step.micro_batches {
            samples += mb.batch;
            imgs += mb.num_images();
        }
    }
    let secs = t.elapsed().as_secs_f64();
    println!("data path, {} ({} stored images, {size}x{size})", dir.display(), blobs.len());
    println!("  images/s per core (decode + PIL-exact bicubic + normalise): {per_core:.1}   [Python anchor ~100, target >= 300]");
    println!("  shard sha256 check (once per shard per rank; data.verify_checksums): {sha_mb_s:.0} MB/s on one core");
    println!("  reader, {workers} decode worker(s): {:.1} samples/s, {:.1} images/s", samples as f64 / secs, imgs as f64 / secs);
    Ok(0)
}
