//! What a user sees: a rank-0 progress bar, `tracing` lines, a JSONL metrics file, `metrics` gauges
//! and counters (with an optional Prometheus endpoint), and a loss-curve SVG at the end.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::recipe::Recipe;

/// What a run did, for the worker's exit code and the tests.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub steps_run: u64,
    pub final_step: u64,
    pub losses: Vec<f64>,
    pub last_checkpoint: Option<PathBuf>,
    pub preempted: bool,
    pub stopped_nonfinite: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f64,
    pub loss_id: f64,
    pub loss_general: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub skipped: bool,
    pub step_s: f64,
    pub tokens_per_s: f64,
    pub tokens_per_s_per_rank: f64,
    pub mfu: Option<f64>,
    pub mem_gib: f64,
    pub samples_dropped: u64,
}

pub struct Reporter {
    rank: usize,
    bar: Option<ProgressBar>,
    jsonl: Option<File>,
    plot: Option<PathBuf>,
    every: u64,
    history: Vec<(u64, f64, f64, f64)>,
}

fn fmt(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.4}")
    }
}

impl Reporter {
    pub fn new(r: &Recipe, rank: usize, total_steps: u64, start_step: u64, trainable: usize, shard: usize) -> Result<Self> {
        if rank != 0 {
            return Ok(Self { rank, bar: None, jsonl: None, plot: None, every: r.logging.every_steps.max(1), history: vec![] });
        }
        if let Some(addr) = &r.logging.prometheus {
            let addr: std::net::SocketAddr =
                addr.parse().map_err(|_| Error::Recipe(format!("recipe key `logging.prometheus`: {addr:?} is not ADDR:PORT")))?;
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(addr)
                .install()
                .map_err(|e| Error::Other(format!("prometheus endpoint on {addr}: {e}")))?;
        }
        let jsonl = match &r.logging.metrics_file {
            Some(p) => {
                if let Some(d) = p.parent() {
                    std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
                }
                Some(std::fs::OpenOptions::new().create(true).append(true).open(p).map_err(|e| Error::io(p, e))?)
            }
            None => None,
        };
        tracing::info!(trainable_params = trainable, optimizer_shard_params = shard, total_steps, start_step, "run");
        let bar = r.logging.progress_bar.then(|| {
            let b = ProgressBar::new(total_steps);
            b.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                    .expect("progress template"),
            );
            b.set_position(start_step);
            b
        });
        Ok(Self { rank, bar, jsonl, plot: r.logging.plot.clone(), every: r.logging.every_steps.max(1), history: vec![] })
    }

    pub fn record(&mut self, rec: &StepRecord) -> Result<()> {
        metrics::gauge!("idavlm_loss").set(rec.loss);
        metrics::gauge!("idavlm_lr").set(rec.lr);
        metrics::gauge!("idavlm_grad_norm").set(rec.grad_norm);
        metrics::gauge!("idavlm_tokens_per_second").set(rec.tokens_per_s);
        metrics::counter!("idavlm_steps_total").increment(1);
        if self.rank != 0 {
            return Ok(());
        }
        self.history.push((rec.step, rec.loss, rec.loss_id, rec.loss_general));
        if let Some(f) = self.jsonl.as_mut() {
            let line = serde_json::to_string(rec).expect("json");
            writeln!(f, "{line}").map_err(|e| Error::Other(format!("metrics file: {e}")))?;
        }
        let mfu = rec.mfu.map(|m| format!(" mfu {:.1}%", 100.0 * m)).unwrap_or_default();
        let msg = format!(
            "loss {} (id {}, general {}) lr {:.2e} gnorm {:.3} {:.0} tok/s{mfu} mem {:.1} GiB",
            fmt(rec.loss),
            fmt(rec.loss_id),
            fmt(rec.loss_general),
            rec.lr,
            rec.grad_norm,
            rec.tokens_per_s,
            rec.mem_gib
        );
        match &self.bar {
            Some(b) => {
                b.set_position(rec.step);
                b.set_message(msg.clone());
                if rec.step % self.every == 0 {
                    b.suspend(|| tracing::info!("step {} {msg}", rec.step));
                }
            }
            None => {
                if rec.step % self.every == 0 {
                    tracing::info!("step {} {msg}", rec.step)
                }
            }
        }
        Ok(())
    }

    pub fn note(&self, msg: &str) {
        if self.rank != 0 {
            return;
        }
        match &self.bar {
            Some(b) => b.suspend(|| tracing::info!("{msg}")),
            None => tracing::info!("{msg}"),
        }
    }

    pub fn finish(&mut self, s: &Summary) -> Result<()> {
        if self.rank != 0 {
            return Ok(());
        }
        if let Some(b) = self.bar.take() {
            b.finish();
        }
        if let Some(p) = &self.plot {
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
            }
            std::fs::write(p, loss_svg(&self.history)).map_err(|e| Error::io(p, e))?;
            tracing::info!("loss curve: {}", p.display());
        }
        let first = s.losses.iter().copied().find(|v| v.is_finite());
        let last = s.losses.iter().rev().copied().find(|v| v.is_finite());
        if let (Some(a), Some(b)) = (first, last) {
            tracing::info!("ran {} steps (to step {}): loss {a:.4} -> {b:.4}", s.steps_run, s.final_step);
        }
        Ok(())
    }
}

/// A self-contained SVG of the loss curves (all, ID, general).
pub fn loss_svg(h: &[(u64, f64, f64, f64)]) -> String {
    let (w, ht, pad) = (720.0, 360.0, 48.0);
    let finite = |v: f64| v.is_finite();
    let vals: Vec<f64> = h.iter().flat_map(|r| [r.1, r.2, r.3]).filter(|v| finite(*v)).collect();
    let (lo, hi) = vals.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo.is_finite() && hi > lo { (lo, hi) } else { (0.0, 1.0) };
    let s0 = h.first().map(|r| r.0).unwrap_or(0) as f64;
    let s1 = h.last().map(|r| r.0).unwrap_or(1).max(h.first().map(|r| r.0 + 1).unwrap_or(1)) as f64;
    let x = |s: u64| pad + (s as f64 - s0) / (s1 - s0).max(1.0) * (w - 2.0 * pad);
    let y = |v: f64| ht - pad - (v - lo) / (hi - lo) * (ht - 2.0 * pad);
    let line = |sel: &dyn Fn(&(u64, f64, f64, f64)) -> f64, color: &str, name: &str, ly: f64| {
        let pts: Vec<String> = h.iter().filter(|r| finite(sel(r))).map(|r| format!("{:.1},{:.1}", x(r.0), y(sel(r)))).collect();
        format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/><text x=\"{}\" y=\"{ly}\" fill=\"{color}\" font-size=\"12\">{name}</text>",
            pts.join(" "),
            w - 140.0
        )
    };
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{ht}\" font-family=\"sans-serif\">\
<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
<line x1=\"{pad}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/><line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{b}\" stroke=\"black\"/>\
<text x=\"{pad}\" y=\"{t}\" font-size=\"12\">{hi:.3}</text><text x=\"{pad}\" y=\"{bl}\" font-size=\"12\">{lo:.3}</text>\
<text x=\"{cx}\" y=\"{bl}\" font-size=\"12\">optimizer step {s0}..{s1}</text>{}{}{}</svg>",
        line(&|r| r.1, "#222222", "loss (all)", 20.0),
        line(&|r| r.2, "#1f77b4", "loss (ID)", 36.0),
        line(&|r| r.3, "#d62728", "loss (general)", 52.0),
        b = ht - pad,
        r = w - pad,
        t = pad - 6.0,
        bl = ht - pad + 18.0,
        cx = w / 2.0 - 60.0,
    )
}
