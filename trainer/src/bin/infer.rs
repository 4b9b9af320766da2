//! idavlm-infer: answers an MM-ID-format benchmark with a trained checkpoint and scores it (SPEC §5).
//! Writes one JSON line per item and prints a per-type summary (also written as JSON).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use idavlm::infer::*;
use idavlm::model::{weights::load_hf, ModelConfig, QwenVl};
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
    /// Only the first N items.
    #[arg(long)]
    limit: Option<usize>,
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

fn run(cli: Cli) -> Result<()> {
    let dir = model_dir(&cli.checkpoint);
    let cfg: ModelConfig = ModelConfig::from_file(&dir.join("config.json")).context("the model's config.json")?;
    let device = device_default();
    let kind = if device.is_cuda() { tch::Kind::BFloat16 } else { tch::Kind::Float };
    let (params, _) = load_hf(&dir, &cfg, device, kind)?;
    let model = QwenVl::new(&cfg, &params);
    let tok = Tokenizer::load_default()?;
    let mut items = read_bench(&cli.bench)?;
    if let Some(n) = cli.limit {
        items.truncate(n);
    }
    let root = cli.images.clone().unwrap_or_else(|| cli.bench.parent().map(|p| p.to_path_buf()).unwrap_or_default());
    let opts = GenOptions { max_new_tokens: cli.max_new_tokens, top_p: cli.top_p, seed: cli.seed };
    let mut out = std::fs::File::create(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    let bar = ProgressBar::new(items.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}").expect("template"),
    );
    let mut preds = Vec::new();
    for chunk in items.chunks(cli.batch.max(1)) {
        let refs: Vec<&Item> = chunk.iter().collect();
        let answers = generate_batch(&model, &tok, &refs, &root, &opts)
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
            };
            writeln!(out, "{}", serde_json::to_string(&p)?)?;
            preds.push(p);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let summary = summarise(&preds);
    println!("{:<22} {:>6} {:>10} {:>9} {:>11}", "type", "items", "accuracy", "mean IoU", "unparsable");
    for (k, s) in &summary {
        let f = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "judged".into());
        println!(
            "{:<22} {:>6} {:>10} {:>9} {:>11}",
            k,
            s.items,
            f(s.accuracy),
            s.mean_iou.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into()),
            s.unparsable
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
    let sp = cli.out.with_extension("summary.json");
    std::fs::write(&sp, serde_json::to_vec_pretty(&summary)?)?;
    println!("predictions: {}   summary: {}", cli.out.display(), sp.display());
    Ok(())
}
