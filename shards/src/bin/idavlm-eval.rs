//! idavlm-eval: the MM-ID table from prediction files, without loading a model.
//!
//! Matching and location come from the scores `idavlm-infer` wrote into each line; QA and caption items
//! are scored by an LLM judge (`--judge-url`, `--judge-model`, `--judge-key-env`), its verdicts cached
//! beside each predictions file. Writes `report.json`, `report.md` and, for two rows or more,
//! `scores.svg` into `--report DIR`, and prints the table.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use idavlm_shards::mmid::judge::{Judge, JudgeArgs};
use idavlm_shards::mmid::report::{self, Report};

#[derive(Parser)]
#[command(
    name = "idavlm-eval",
    version,
    about = "Score MM-ID predictions (idavlm-infer --out) into the paper's four-column table, QA and captions by an LLM judge"
)]
struct Cli {
    /// Prediction files (JSONL of idavlm-infer), one per run; `NAME=FILE` names the run (default: the
    /// file's stem).
    #[arg(long, num_args = 1.., required_unless_present = "reports")]
    predictions: Vec<String>,
    /// Earlier reports (their folders or report.json) to show beside the new runs.
    #[arg(long, num_args = 1..)]
    reports: Vec<PathBuf>,
    /// The report folder (report.json, report.md, scores.svg).
    #[arg(long)]
    report: PathBuf,
    /// Show the published IDA-VLM row (SPEC §5) beside the runs.
    #[arg(long)]
    published: bool,
    #[command(flatten)]
    judge: JudgeArgs,
}

fn main() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .try_init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let judge_cfg = cli.judge.config()?;
    let judge = judge_cfg.as_ref().map(Judge::new).transpose()?;
    let mut out = Report { runs: Vec::new(), published: cli.published.then_some(report::PUBLISHED) };
    for r in &cli.reports {
        out.runs.extend(Report::read(r)?.runs);
    }
    for arg in &cli.predictions {
        let (name, path) = match arg.split_once('=') {
            Some((n, p)) if !n.is_empty() && !PathBuf::from(arg).exists() => (n.to_string(), PathBuf::from(p)),
            _ => {
                let p = PathBuf::from(arg);
                (p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| arg.clone()), p)
            }
        };
        let preds = report::read_predictions(&path)?;
        let run = report::score_predictions(&name, &path, &preds, judge.as_ref(), cli.judge.judge_cache.as_deref())
            .with_context(|| format!("judging {}", path.display()))?;
        out.runs.push(run);
    }
    let names: std::collections::BTreeSet<&str> = out.runs.iter().map(|r| r.name.as_str()).collect();
    anyhow::ensure!(names.len() == out.runs.len(), "two runs share a name: give each `--predictions NAME=FILE`");
    let files = out.write(&cli.report)?;
    print!("{}", out.table_markdown());
    println!();
    for f in files {
        println!("wrote {}", f.display());
    }
    Ok(())
}
