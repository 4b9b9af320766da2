//! What a user sees: a rank-0 progress bar, `tracing` lines, a JSONL metrics file, `metrics` gauges
//! and counters (with an optional Prometheus endpoint), and a loss-curve SVG at the end.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::recipe::Recipe;
use crate::tensorboard::EventWriter;

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
    /// Seconds of the step by phase (`logging.phase_split`), rank 0's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase_s: Option<std::collections::BTreeMap<String, f64>>,
    /// The evaluation run after this step, when one was due.
    #[serde(flatten)]
    pub eval: EvalRecord,
}

/// `eval/*` of a step's record (absent keys: no evaluation after this step, or not configured).
#[derive(Clone, Debug, Default, Serialize)]
pub struct EvalRecord {
    #[serde(rename = "eval/loss", skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(rename = "eval/matching", skip_serializing_if = "Option::is_none")]
    pub matching: Option<f64>,
    #[serde(rename = "eval/location_acc", skip_serializing_if = "Option::is_none")]
    pub location_acc: Option<f64>,
    #[serde(rename = "eval/location_iou", skip_serializing_if = "Option::is_none")]
    pub location_iou: Option<f64>,
    #[serde(rename = "eval/qa", skip_serializing_if = "Option::is_none")]
    pub qa: Option<f64>,
    #[serde(rename = "eval/caption", skip_serializing_if = "Option::is_none")]
    pub caption: Option<f64>,
}

impl From<crate::eval::EvalScores> for EvalRecord {
    fn from(e: crate::eval::EvalScores) -> Self {
        Self {
            loss: e.loss,
            matching: e.matching,
            location_acc: e.location_acc,
            location_iou: e.location_iou,
            qa: e.qa,
            caption: e.caption,
        }
    }
}

impl EvalRecord {
    fn pairs(&self) -> Vec<(&'static str, f64)> {
        [
            ("eval/loss", self.loss),
            ("eval/matching", self.matching),
            ("eval/location_acc", self.location_acc),
            ("eval/location_iou", self.location_iou),
            ("eval/qa", self.qa),
            ("eval/caption", self.caption),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
    }
}

pub struct Reporter {
    rank: usize,
    bar: Option<ProgressBar>,
    jsonl: Option<File>,
    tensorboard: Option<EventWriter>,
    plot: Option<PathBuf>,
    every: u64,
    history: Vec<Point>,
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
            return Ok(Self {
                rank,
                bar: None,
                jsonl: None,
                tensorboard: None,
                plot: None,
                every: r.logging.every_steps.max(1),
                history: vec![],
            });
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
        let tensorboard = match &r.logging.tensorboard {
            Some(d) => {
                let w = EventWriter::create(d)?;
                tracing::info!("TensorBoard events: {}", w.path().display());
                Some(w)
            }
            None => None,
        };
        Ok(Self {
            rank,
            bar,
            jsonl,
            tensorboard,
            plot: r.logging.plot.clone(),
            every: r.logging.every_steps.max(1),
            history: vec![],
        })
    }

    pub fn record(&mut self, rec: &StepRecord) -> Result<()> {
        metrics::gauge!("idavlm_loss").set(rec.loss);
        metrics::gauge!("idavlm_lr").set(rec.lr);
        metrics::gauge!("idavlm_grad_norm").set(rec.grad_norm);
        metrics::gauge!("idavlm_tokens_per_second").set(rec.tokens_per_s);
        metrics::counter!("idavlm_steps_total").increment(1);
        let evals = rec.eval.pairs();
        for (k, v) in &evals {
            match *k {
                "eval/loss" => metrics::gauge!("idavlm_eval_loss").set(*v),
                "eval/matching" => metrics::gauge!("idavlm_eval_matching").set(*v),
                "eval/location_acc" => metrics::gauge!("idavlm_eval_location_acc").set(*v),
                "eval/qa" => metrics::gauge!("idavlm_eval_qa").set(*v),
                "eval/caption" => metrics::gauge!("idavlm_eval_caption").set(*v),
                _ => metrics::gauge!("idavlm_eval_location_iou").set(*v),
            }
        }
        if self.rank != 0 {
            return Ok(());
        }
        self.history.push((rec.step, rec.loss, rec.loss_id, rec.loss_general, rec.eval.loss.unwrap_or(f64::NAN)));
        if let Some(tb) = self.tensorboard.as_mut() {
            tb.scalars(
                rec.step,
                &[
                    ("loss", rec.loss),
                    ("loss/id", rec.loss_id),
                    ("loss/general", rec.loss_general),
                    ("lr", rec.lr),
                    ("grad_norm", rec.grad_norm),
                    ("tokens_per_s", rec.tokens_per_s),
                    ("mfu", rec.mfu.unwrap_or(f64::NAN)),
                    ("mem_gib", rec.mem_gib),
                    ("samples_dropped", rec.samples_dropped as f64),
                ],
            )?;
            if !evals.is_empty() {
                tb.scalars(rec.step, &evals)?;
            }
        }
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
        if !evals.is_empty() {
            let e: Vec<String> = evals.iter().map(|(k, v)| format!("{} {v:.4}", k.trim_start_matches("eval/"))).collect();
            // Every evaluation is logged, whatever logging.every_steps says.
            let line = format!("step {} eval: {}", rec.step, e.join(", "));
            self.above_bar(|| tracing::info!("{line}"));
        }
        let phases = rec.phase_s.as_ref().map(|p| {
            let parts: Vec<String> = p.iter().filter(|(_, &v)| v > 0.0).map(|(k, v)| format!("{k} {v:.3}")).collect();
            format!("step {} phases (s): {}", rec.step, parts.join(", "))
        });
        if let Some(b) = &self.bar {
            b.set_position(rec.step);
            b.set_message(msg.clone());
        }
        if rec.step.is_multiple_of(self.every) {
            self.above_bar(|| {
                tracing::info!("step {} {msg}", rec.step);
                if let Some(p) = &phases {
                    tracing::info!("{p}");
                }
            });
        }
        Ok(())
    }

    /// Runs `log` with the progress bar (if any) lifted, so log lines never tear it.
    fn above_bar(&self, log: impl FnOnce()) {
        match &self.bar {
            Some(b) => b.suspend(log),
            None => log(),
        }
    }

    pub fn note(&self, msg: &str) {
        if self.rank != 0 {
            return;
        }
        self.above_bar(|| tracing::info!("{msg}"));
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

/// One step of the plot: step, loss, ID loss, general loss, held-out loss (NaN where absent).
pub type Point = (u64, f64, f64, f64, f64);

/// A self-contained SVG of the loss curves (all, ID, general, and the held-out loss where evaluated).
pub fn loss_svg(h: &[Point]) -> String {
    let (w, ht, pad) = (720.0, 360.0, 48.0);
    let finite = |v: f64| v.is_finite();
    let vals: Vec<f64> = h.iter().flat_map(|r| [r.1, r.2, r.3, r.4]).filter(|v| finite(*v)).collect();
    let (lo, hi) = vals.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo.is_finite() && hi > lo { (lo, hi) } else { (0.0, 1.0) };
    let s0 = h.first().map(|r| r.0).unwrap_or(0) as f64;
    let s1 = h.last().map(|r| r.0).unwrap_or(1).max(h.first().map(|r| r.0 + 1).unwrap_or(1)) as f64;
    let x = |s: u64| pad + (s as f64 - s0) / (s1 - s0).max(1.0) * (w - 2.0 * pad);
    let y = |v: f64| ht - pad - (v - lo) / (hi - lo) * (ht - 2.0 * pad);
    let line = |sel: &dyn Fn(&Point) -> f64, color: &str, name: &str, ly: f64| {
        let pts: Vec<String> = h.iter().filter(|r| finite(sel(r))).map(|r| format!("{:.1},{:.1}", x(r.0), y(sel(r)))).collect();
        format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/><text x=\"{}\" y=\"{ly}\" fill=\"{color}\" font-size=\"12\">{name}</text>",
            pts.join(" "),
            w - 140.0
        )
    };
    // Five ticks on each axis, labelled with the loss and the step.
    let mut ticks = String::new();
    for k in 0..=4 {
        let f = k as f64 / 4.0;
        let (v, yy) = (lo + f * (hi - lo), ht - pad - f * (ht - 2.0 * pad));
        ticks += &format!(
            "<line x1=\"{a}\" y1=\"{yy:.1}\" x2=\"{pad}\" y2=\"{yy:.1}\" stroke=\"black\"/><text x=\"{tx}\" y=\"{ty:.1}\" font-size=\"11\" text-anchor=\"end\">{v:.3}</text>",
            a = pad - 4.0,
            tx = pad - 6.0,
            ty = yy + 4.0
        );
        let st = s0 + f * (s1 - s0);
        let xx = x(st.round() as u64);
        ticks += &format!(
            "<line x1=\"{xx:.1}\" y1=\"{b}\" x2=\"{xx:.1}\" y2=\"{b4}\" stroke=\"black\"/><text x=\"{xx:.1}\" y=\"{ty}\" font-size=\"11\" text-anchor=\"middle\">{st:.0}</text>",
            b = ht - pad,
            b4 = ht - pad + 4.0,
            ty = ht - pad + 16.0
        );
    }
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{ht}\" font-family=\"sans-serif\">\
<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
<line x1=\"{pad}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/><line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{b}\" stroke=\"black\"/>\
{ticks}<text x=\"{cx}\" y=\"{xl}\" font-size=\"12\">optimizer step</text>{}{}{}{}</svg>",
        line(&|r| r.1, "#222222", "loss (all)", 20.0),
        line(&|r| r.2, "#1f77b4", "loss (ID)", 36.0),
        line(&|r| r.3, "#d62728", "loss (general)", 52.0),
        if h.iter().any(|r| finite(r.4)) { line(&|r| r.4, "#2ca02c", "held-out loss", 68.0) } else { String::new() },
        b = ht - pad,
        r = w - pad,
        cx = w / 2.0 - 40.0,
        xl = ht - 8.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loss_plot_has_ticks_on_both_axes() {
        let h: Vec<Point> = (1..=100).map(|s| (s, 12.0 / s as f64, 12.0 / s as f64, f64::NAN, f64::NAN)).collect();
        let svg = loss_svg(&h);
        // Five loss labels from the lowest to the highest value, five step labels from 1 to 100.
        for v in ["0.120", "3.090", "12.000"] {
            assert!(svg.contains(&format!(">{v}</text>")), "no loss tick {v}");
        }
        for st in ["1", "26", "50", "75", "100"] {
            assert!(svg.contains(&format!("text-anchor=\"middle\">{st}</text>")), "no step tick {st}");
        }
        assert_eq!(svg.matches("<line").count(), 2 + 10);
        let python = concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python");
        if std::path::Path::new(python).exists() {
            // Well-formed XML by Python's parser.
            let o = std::process::Command::new(python)
                .args(["-c", "import sys, xml.etree.ElementTree as E; E.fromstring(sys.stdin.read())"])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    use std::io::Write;
                    c.stdin.take().expect("stdin").write_all(svg.as_bytes())?;
                    c.wait_with_output()
                })
                .expect("python");
            assert!(o.status.success(), "the SVG does not parse");
        }
    }
}
