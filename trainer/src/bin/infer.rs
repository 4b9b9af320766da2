//! idavlm-infer: answers an MM-ID-format benchmark with a trained checkpoint and scores it (SPEC §5).
//! Writes one JSON line per item and prints a per-type summary (also written as JSON).
//!
//! Every item's images are checked before the model loads; predictions go to `OUT.partial`, renamed to
//! `OUT` when all items are answered, so an interrupted run never leaves a truncated `OUT` (and
//! `--resume` continues it). Items whose reference answer is empty are reported as invalid items.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use idavlm::infer::*;
use idavlm::model::{ModelConfig, QwenVl};
use idavlm_shards::mmid::judge::{Judge, JudgeArgs};
use idavlm_shards::mmid::report::{self, Report};
use idavlm_shards::preprocess::ResizeOrder;
use idavlm_shards::tokenizer::Tokenizer;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(name = "idavlm-infer", version, about = "Generate answers for an MM-ID-format benchmark and score them")]
struct Cli {
    /// A checkpoint folder (its model/) or a Hugging Face model folder with config.json.
    #[arg(long)]
    checkpoint: PathBuf,
    /// The benchmark: an MM-ID-layout JSON file, or a Parquet eval dataset folder (images embedded;
    /// `idavlm-shards convert-eval` writes one).
    #[arg(long)]
    bench: PathBuf,
    /// Root of the image paths (default: the benchmark file's folder).
    #[arg(long)]
    images: Option<PathBuf>,
    #[arg(long, default_value = "preds.jsonl")]
    out: PathBuf,
    /// Compute dtype: auto (bf16 on GPUs, f32 on CPUs), bf16 or f32 (as the run's model.dtype, to
    /// reproduce its own evaluation: near-tied answers can differ between bf16 and f32).
    #[arg(long, value_enum, default_value = "auto")]
    dtype: idavlm::recipe::Dtype,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Nucleus sampling (the original evaluation uses 0.3); greedy when absent.
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 1234)]
    seed: i64,
    /// Prompts generated together (left-padded, one KV cache per batch).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// The resize's pass order: the Pillow the pixels of training followed (pillow12: Pillow <= 12.2).
    #[arg(long, value_enum, default_value_t = ResizeOrder::Pillow13)]
    resize: ResizeOrder,
    /// Continue a partial run (`OUT.partial`, left by an interrupted run) instead of refusing it.
    #[arg(long)]
    resume: bool,
    /// Only the first N items.
    #[arg(long)]
    limit: Option<usize>,
    /// Also write the four-column MM-ID report (report.json, report.md) into this folder (default,
    /// when a judge is given: OUT's stem + `.report` beside OUT).
    #[arg(long)]
    report: Option<PathBuf>,
    /// The LLM judge of the QA and caption items (as idavlm-eval's).
    #[command(flatten)]
    judge: JudgeArgs,
}

fn main() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Where predictions are written while the run lasts; renamed to `--out` when every item is done.
fn partial_path(out: &std::path::Path) -> PathBuf {
    let mut name = out.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "preds.jsonl".into());
    name.push(".partial");
    out.with_file_name(name)
}

/// The complete lines of a partial run (a torn last line is dropped and rewritten).
fn read_partial(path: &std::path::Path) -> Result<Vec<Prediction>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        match serde_json::from_str::<Prediction>(line) {
            Ok(p) => out.push(p),
            Err(_) if i + 1 == text.lines().count() && !text.ends_with('\n') => break,
            Err(e) => anyhow::bail!("{}:{}: not a prediction line: {e}", path.display(), i + 1),
        }
    }
    Ok(out)
}

fn run(cli: Cli) -> Result<()> {
    // A judge that cannot be set up (its key variable unset) fails before any generation.
    let judge = cli.judge.config()?.as_ref().map(Judge::new).transpose()?;
    let mut items = read_bench(&cli.bench)?;
    if let Some(n) = cli.limit {
        items.truncate(n);
    }
    let root = cli.images.clone().unwrap_or_else(|| cli.bench.parent().map(|p| p.to_path_buf()).unwrap_or_default());
    // Every item's images are found and decoded before the model loads: a bad item near the end fails
    // now, not after minutes of generation.
    idavlm_shards::mmid::check_items(&items, &root).with_context(|| format!("checking {}", cli.bench.display()))?;
    let partial = partial_path(&cli.out);
    let mut preds = Vec::new();
    if partial.exists() {
        anyhow::ensure!(
            cli.resume,
            "{} holds a partial run of earlier predictions: pass --resume to continue it, or remove it to start over",
            partial.display()
        );
        preds = read_partial(&partial)?;
        let known: std::collections::HashSet<&str> = items.iter().map(|i| i.id.as_str()).collect();
        if let Some(p) = preds.iter().find(|p| !known.contains(p.id.as_str())) {
            anyhow::bail!(
                "{}: item {} is not in {}: a partial run of another benchmark",
                partial.display(),
                p.id,
                cli.bench.display()
            );
        }
        eprintln!("resuming: {} of {} items already answered in {}", preds.len(), items.len(), partial.display());
    }
    let done: std::collections::HashSet<String> = preds.iter().map(|p| p.id.clone()).collect();
    let dir = model_dir(&cli.checkpoint);
    let cfg: ModelConfig = ModelConfig::from_file(&dir.join("config.json")).context("the model's config.json")?;
    let device = device_default();
    let kind = idavlm::plan::compute_kind(cli.dtype, device);
    // A LoRA checkpoint's adapter is merged into the weights it was trained on.
    let (params, report) = idavlm::plan::load_model(&cli.checkpoint, &cfg, device, kind)?;
    if report.adapters_merged > 0 {
        eprintln!("{}: {} LoRA adapters merged", cli.checkpoint.display(), report.adapters_merged);
    }
    let model = QwenVl::new(&cfg, &params);
    let tok = Tokenizer::load_default()?;
    let opts = GenOptions { max_new_tokens: cli.max_new_tokens, top_p: cli.top_p, seed: cli.seed, resize: cli.resize };
    let mut out = {
        // Rewrite the kept lines (a torn last line goes), then append.
        let mut f = std::fs::File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
        for p in &preds {
            writeln!(f, "{}", serde_json::to_string(p)?)?;
        }
        f
    };
    let bar = ProgressBar::new(items.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}").expect("template"),
    );
    bar.inc(preds.len() as u64);
    let mut emit = |p: Prediction, preds: &mut Vec<Prediction>| -> Result<()> {
        writeln!(out, "{}", serde_json::to_string(&p)?)?;
        preds.push(p);
        bar.inc(1);
        Ok(())
    };
    let todo: Vec<&Item> = items.iter().filter(|i| !done.contains(&i.id)).collect();
    // Items that cannot be scored are reported as such, without generating.
    let (invalid, todo): (Vec<&Item>, Vec<&Item>) = todo.into_iter().partition(|i| i.unscorable().is_some());
    for item in invalid {
        let p = Prediction {
            id: item.id.clone(),
            kind: item.kind.clone(),
            question: item.question.clone(),
            answer: item.answer.clone(),
            prediction: String::new(),
            score: None,
            unparsable: false,
            invalid: item.unscorable(),
        };
        emit(p, &mut preds)?;
    }
    for chunk in todo.chunks(cli.batch.max(1)) {
        let answers = generate_batch(&model, &tok, chunk, &root, &opts)
            .with_context(|| format!("items {}..{}", chunk[0].id, chunk.last().map(|i| i.id.as_str()).unwrap_or_default()))?;
        for (item, (text, _)) in chunk.iter().zip(answers) {
            let size = if item.kind == "location" { test_image_size(item, &root) } else { None };
            let (score, unparsable) = score(item, &text, size);
            let p = Prediction {
                id: item.id.clone(),
                kind: item.kind.clone(),
                question: item.question.clone(),
                answer: item.answer.clone(),
                prediction: text,
                score,
                unparsable,
                invalid: None,
            };
            emit(p, &mut preds)?;
        }
    }
    drop(emit);
    out.sync_all().with_context(|| format!("writing {}", partial.display()))?;
    drop(out);
    bar.finish_and_clear();
    // Predictions in the benchmark's order, whatever order the runs answered them in.
    let order: std::collections::HashMap<&str, usize> = items.iter().enumerate().map(|(i, it)| (it.id.as_str(), i)).collect();
    preds.sort_by_key(|p| order[p.id.as_str()]);
    let mut text = String::new();
    for p in &preds {
        text.push_str(&serde_json::to_string(p)?);
        text.push('\n');
    }
    std::fs::write(&partial, text).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &cli.out).with_context(|| format!("renaming {} to {}", partial.display(), cli.out.display()))?;
    let summary = summarise(&preds);
    println!(
        "{:<22} {:>6} {:>10} {:>9} {:>11} {:>8} {:>9} {:>14}",
        "type", "items", "accuracy", "mean IoU", "unparsable", "invalid", "distinct", "constant-answer"
    );
    for (k, s) in &summary {
        let f = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "judged".into());
        println!(
            "{:<22} {:>6} {:>10} {:>9} {:>11} {:>8} {:>9} {:>14}",
            k,
            s.items,
            f(s.accuracy),
            s.mean_iou.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into()),
            s.unparsable,
            s.invalid,
            s.distinct_predictions,
            s.constant_answer_accuracy.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into())
        );
    }
    let bad: Vec<&str> = preds.iter().filter(|p| p.unparsable).map(|p| p.id.as_str()).take(10).collect();
    if !bad.is_empty() {
        println!(
            "unparsable answers (counted wrong): {}{}",
            bad.join(", "),
            if preds.iter().filter(|p| p.unparsable).count() > 10 { ", ..." } else { "" }
        );
    }
    for p in preds.iter().filter(|p| p.invalid.is_some()).take(10) {
        println!("invalid benchmark item (not scored): {}", p.invalid.as_deref().unwrap_or_default());
    }
    println!(
        "distinct: how many different answers the model gave; constant-answer: the matching accuracy of always \
         giving the most frequent answer of these items"
    );
    let sp = cli.out.with_extension("summary.json");
    std::fs::write(&sp, serde_json::to_vec_pretty(&summary)?)?;
    println!("predictions: {}   summary: {}", cli.out.display(), sp.display());
    let report_dir = cli.report.clone().or_else(|| {
        judge.as_ref().map(|_| {
            let stem = cli.out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "preds".into());
            cli.out.with_file_name(format!("{stem}.report"))
        })
    });
    if let Some(dir) = report_dir {
        write_report(&cli, judge.as_ref(), &preds, &dir)?;
    }
    Ok(())
}

/// The four-column report of this run, its QA and caption items judged when a judge is given.
fn write_report(cli: &Cli, judge: Option<&Judge>, preds: &[Prediction], dir: &std::path::Path) -> Result<()> {
    let name = cli.checkpoint.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
    let run = report::score_predictions(&name, &cli.out, preds, judge, cli.judge.judge_cache.as_deref())?;
    let rep = Report { runs: vec![run], published: None };
    print!("{}", rep.table_markdown());
    for f in rep.write(dir)? {
        println!("wrote {}", f.display());
    }
    Ok(())
}
