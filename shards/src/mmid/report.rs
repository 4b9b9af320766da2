//! The MM-ID report: the paper's four columns (matching accuracy, location accuracy at IoU > 0.5, QA
//! and caption judge scores), each per type (single / multi image) and overall with item counts, for
//! one or several runs, as `report.json`, `report.md` (the table laid out as the paper's) and, with two
//! rows or more, `scores.svg` (a bar chart comparing them).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::judge::{classify, judged, request_for, Cache, Images, Judge, JudgeStats, Task, Verdict};
use super::score::Prediction;
use crate::error::{Error, Result};

/// The published IDA-VLM row of MM-ID (SPEC §5).
pub const PUBLISHED: Row = Row { matching: Some(0.806), location: Some(0.854), qa: Some(5.74), caption: Some(5.32) };
pub const PUBLISHED_NAME: &str = "IDA-VLM (published)";

/// The four figures of the paper's table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub matching: Option<f64>,
    /// Accuracy at IoU > 0.5.
    pub location: Option<f64>,
    pub qa: Option<f64>,
    pub caption: Option<f64>,
}

/// A rule-scored type (matching, location).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleScores {
    /// Items of the type in the predictions.
    pub items: usize,
    /// Items scored (invalid benchmark items left out).
    pub scored: usize,
    /// The answers no rule could read (counted wrong).
    pub unparsable: usize,
    /// Matching accuracy, or location accuracy at IoU > 0.5.
    pub accuracy: Option<f64>,
    /// Location only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_iou: Option<f64>,
}

/// A judged group of items (QA or caption, single, multi or all).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JudgedScores {
    pub items: usize,
    /// Items with a score 1..=10.
    pub judged: usize,
    /// Verdicts with no readable score (left out of the mean).
    pub unparsable: usize,
    /// Requests that got no answer after every retry (left out of the mean; a later run asks again).
    pub failed: usize,
    /// The mean score of the judged items; None without a judge or judged item.
    pub mean: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JudgedColumn {
    pub single: JudgedScores,
    pub multi: JudgedScores,
    /// Items whose type does not say (`QA`, `caption`).
    #[serde(default, skip_serializing_if = "is_empty")]
    pub unstated: JudgedScores,
    pub all: JudgedScores,
}

fn is_empty(s: &JudgedScores) -> bool {
    s.items == 0
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    pub name: String,
    /// The judge of its QA and caption items (None: not judged).
    pub judge: Option<JudgeInfo>,
    /// The predictions file it was scored from.
    pub predictions: String,
    pub matching: RuleScores,
    pub location: RuleScores,
    pub qa: JudgedColumn,
    pub caption: JudgedColumn,
    /// Benchmark items that cannot be scored (an empty reference answer), by type.
    #[serde(default)]
    pub invalid: BTreeMap<String, usize>,
    /// Items of types outside the four columns, by type (not scored).
    #[serde(default)]
    pub other_types: BTreeMap<String, usize>,
}

impl RunReport {
    pub fn row(&self) -> Row {
        Row {
            matching: self.matching.accuracy,
            location: self.location.accuracy,
            qa: self.qa.all.mean,
            caption: self.caption.all.mean,
        }
    }
}

/// The judge a report was scored with (never its key).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JudgeInfo {
    pub url: String,
    pub model: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub runs: Vec<RunReport>,
    /// The published IDA-VLM row, when asked for.
    #[serde(default)]
    pub published: Option<Row>,
}

/// Reads the JSONL predictions `idavlm-infer --out` writes; a bad line names the file and line.
pub fn read_predictions(path: &Path) -> Result<Vec<Prediction>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(line)
                .map_err(|e| Error::format(path, format!("line {}: not a prediction line of idavlm-infer: {e}", i + 1)))?,
        );
    }
    if out.is_empty() {
        return Err(Error::format(path, "no prediction in the file"));
    }
    Ok(out)
}

/// Scores one run: the rule scores the predictions carry, and the verdicts (aligned with `preds`;
/// None for types the judge does not score, or when there is no judge).
pub fn score_run(
    name: &str,
    predictions: &str,
    judge: Option<JudgeInfo>,
    preds: &[Prediction],
    verdicts: &[Option<Verdict>],
) -> RunReport {
    let mut r = RunReport { name: name.into(), predictions: predictions.into(), judge, ..Default::default() };
    let (mut m_sum, mut l_hits, mut l_iou) = (0.0, 0.0, 0.0);
    let mut sums: BTreeMap<(Task, Images), (f64, usize)> = BTreeMap::new();
    for (i, p) in preds.iter().enumerate() {
        let Some((task, images)) = classify(&p.kind) else {
            *r.other_types.entry(p.kind.clone()).or_default() += 1;
            continue;
        };
        if p.invalid.is_some() {
            *r.invalid.entry(p.kind.clone()).or_default() += 1;
        }
        match task {
            Task::Matching | Task::Location => {
                let s = if task == Task::Matching { &mut r.matching } else { &mut r.location };
                s.items += 1;
                let Some(v) = p.score.filter(|_| p.invalid.is_none()) else { continue };
                s.scored += 1;
                s.unparsable += p.unparsable as usize;
                if task == Task::Matching {
                    m_sum += v;
                } else {
                    l_hits += (v > 0.5) as i32 as f64;
                    l_iou += v;
                }
            }
            Task::Qa | Task::Caption => {
                let col = if task == Task::Qa { &mut r.qa } else { &mut r.caption };
                let v = verdicts.get(i).cloned().flatten();
                for g in [Some(images), None] {
                    let s = match g {
                        Some(Images::Single) => &mut col.single,
                        Some(Images::Multi) => &mut col.multi,
                        Some(Images::Unstated) => &mut col.unstated,
                        None => &mut col.all,
                    };
                    s.items += 1;
                    match &v {
                        Some(Verdict::Scored { score, .. }) => {
                            s.judged += 1;
                            let e = sums.entry((task, g.unwrap_or(Images::Unstated))).or_default();
                            if g.is_some() {
                                e.0 += *score as f64;
                                e.1 += 1;
                            }
                        }
                        Some(Verdict::Unparsable { .. }) => s.unparsable += 1,
                        Some(Verdict::Failed { .. }) => s.failed += 1,
                        None => {}
                    }
                }
            }
        }
    }
    let mean = |(s, n): (f64, usize)| (n > 0).then(|| s / n as f64);
    r.matching.accuracy = (r.matching.scored > 0).then(|| m_sum / r.matching.scored as f64);
    if r.location.scored > 0 {
        r.location.accuracy = Some(l_hits / r.location.scored as f64);
        r.location.mean_iou = Some(l_iou / r.location.scored as f64);
    }
    for task in [Task::Qa, Task::Caption] {
        let get = |g| sums.get(&(task, g)).copied().unwrap_or_default();
        let (s1, s2, s3) = (get(Images::Single), get(Images::Multi), get(Images::Unstated));
        let col = if task == Task::Qa { &mut r.qa } else { &mut r.caption };
        col.single.mean = mean(s1);
        col.multi.mean = mean(s2);
        col.unstated.mean = mean(s3);
        col.all.mean = mean((s1.0 + s2.0 + s3.0, s1.1 + s2.1 + s3.1));
    }
    r
}

/// Where a predictions file's verdicts are cached by default: `PREDS.judge-cache.jsonl` beside it.
pub fn default_cache(predictions: &Path) -> std::path::PathBuf {
    let stem = predictions.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "preds".into());
    predictions.with_file_name(format!("{stem}.judge-cache.jsonl"))
}

/// Judges the QA and caption predictions of one run (the verdicts aligned with `preds`, None for
/// other types), `done` called after each judged item.
pub fn judge_predictions(
    judge: &Judge,
    preds: &[Prediction],
    cache: &Cache,
    done: &(dyn Fn() + Sync),
) -> Result<(Vec<Option<Verdict>>, JudgeStats)> {
    let (mut at, mut requests) = (Vec::new(), Vec::new());
    for (i, p) in preds.iter().enumerate() {
        if let Some(r) = request_for(&p.kind, &p.question, &p.prediction, &p.answer) {
            at.push(i);
            requests.push(r);
        }
    }
    let (verdicts, stats) = judge.judge_all(&requests, cache, done)?;
    let mut out = vec![None; preds.len()];
    for (i, v) in at.into_iter().zip(verdicts) {
        out[i] = Some(v);
    }
    Ok((out, stats))
}

/// How many of the predictions the judge scores.
pub fn judged_count(preds: &[Prediction]) -> usize {
    preds.iter().filter(|p| judged(&p.kind)).count()
}

/// One run's report from its predictions (read from `path`): the rule scores they carry and, with a
/// judge, the verdicts of its QA and caption items, cached in `cache` (default: [`default_cache`] of
/// `path`), with a progress bar and the judge's counts on stderr.
pub fn score_predictions(
    name: &str,
    path: &Path,
    preds: &[Prediction],
    judge: Option<&Judge>,
    cache: Option<&Path>,
) -> Result<RunReport> {
    let mut verdicts = vec![None; preds.len()];
    if let Some(j) = judge {
        let cache_path = cache.map(Path::to_path_buf).unwrap_or_else(|| default_cache(path));
        let cache = Cache::open(&cache_path)?;
        let n = judged_count(preds);
        let bar = indicatif::ProgressBar::new(n as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("judging {msg} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}]")
                .expect("template"),
        );
        bar.set_message(name.to_string());
        let (v, stats) = judge_predictions(j, preds, &cache, &|| bar.inc(1))?;
        bar.finish_and_clear();
        let failed = v.iter().filter(|v| matches!(v, Some(Verdict::Failed { .. }))).count();
        eprintln!(
            "{name}: {n} items judged ({} from the cache {}, {} requests, {} retries)",
            stats.cached,
            cache_path.display(),
            stats.requests,
            stats.retries
        );
        if failed > 0 {
            eprintln!("{name}: {failed} items got no verdict after every retry (not scored); run again to ask only those");
        }
        verdicts = v;
    }
    let info = judge.map(|j| JudgeInfo { url: j.config().url.clone(), model: j.config().model.clone() });
    Ok(score_run(name, &path.display().to_string(), info, preds, &verdicts))
}

impl Report {
    /// Reads a report written by [`Report::write`] (its folder or its `report.json`).
    pub fn read(path: &Path) -> Result<Self> {
        let f = if path.is_dir() { path.join("report.json") } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&f).map_err(|e| Error::io(&f, e))?;
        serde_json::from_str(&text).map_err(|e| Error::format(&f, format!("not an MM-ID report of idavlm-eval: {e}")))
    }

    /// The table's rows: the published one first (when asked for), then each run's.
    pub fn rows(&self) -> Vec<(String, Row)> {
        let mut rows: Vec<(String, Row)> = self.published.iter().map(|p| (PUBLISHED_NAME.to_string(), *p)).collect();
        rows.extend(self.runs.iter().map(|r| (r.name.clone(), r.row())));
        rows
    }

    /// The paper's table alone (the report's head, what the command line prints).
    pub fn table_markdown(&self) -> String {
        self.markdown().split("\n## ").next().unwrap_or_default().to_string()
    }

    /// The Markdown report: the paper's table, then each run's per-type figures with counts.
    pub fn markdown(&self) -> String {
        let mut s = String::from("# MM-ID results\n\n");
        let judges: std::collections::BTreeSet<Option<(&str, &str)>> =
            self.runs.iter().map(|r| r.judge.as_ref().map(|j| (j.model.as_str(), j.url.as_str()))).collect();
        match judges.iter().next() {
            _ if judges.len() > 1 => s.push_str("QA and caption scores (1-10): **the runs had different judges** (see each run); their scores do not compare.\n\n"),
            Some(Some((model, url))) => {
                let _ = writeln!(s, "QA and caption scores (1-10): judged by `{model}` at {url}.\n");
            }
            _ => s.push_str("QA and caption: not judged (no judge was given: `--judge-url` and `--judge-model`).\n\n"),
        }
        s.push_str("| Model | Matching | Location | QA | Caption |\n|---|---:|---:|---:|---:|\n");
        let f3 = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
        let f2 = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
        for (name, row) in self.rows() {
            let _ = writeln!(s, "| {name} | {} | {} | {} | {} |", f3(row.matching), f3(row.location), f2(row.qa), f2(row.caption));
        }
        s.push_str("\nMatching: accuracy; Location: accuracy at IoU > 0.5; QA and Caption: mean judge score.\n");
        for r in &self.runs {
            let judge = r.judge.as_ref().map(|j| format!("`{}` at {}", j.model, j.url)).unwrap_or_else(|| "none".into());
            let _ = writeln!(s, "\n## {}\n\nPredictions: `{}`; judge: {judge}\n", r.name, r.predictions);
            s.push_str("| type | items | scored | unparsable | failed | score |\n|---|---:|---:|---:|---:|---:|\n");
            let rule = |s: &mut String, name: &str, x: &RuleScores, extra: &str| {
                let _ = writeln!(s, "| {name} | {} | {} | {} | - | {}{extra} |", x.items, x.scored, x.unparsable, f3(x.accuracy));
            };
            rule(&mut s, "matching", &r.matching, "");
            let iou = r.location.mean_iou.map(|v| format!(" (mean IoU {v:.3})")).unwrap_or_default();
            rule(&mut s, "location", &r.location, &iou);
            for (col, c) in [("QA", &r.qa), ("caption", &r.caption)] {
                for (g, x) in [("single image", &c.single), ("multi image", &c.multi), ("type unstated", &c.unstated), ("all", &c.all)] {
                    if x.items == 0 && g != "all" {
                        continue;
                    }
                    let _ =
                        writeln!(s, "| {col}, {g} | {} | {} | {} | {} | {} |", x.items, x.judged, x.unparsable, x.failed, f2(x.mean));
                }
            }
            for (k, n) in &r.invalid {
                let _ = writeln!(s, "\nInvalid benchmark items of type `{k}` (not scored): {n}");
            }
            for (k, n) in &r.other_types {
                let _ = writeln!(s, "\nItems of type `{k}`, outside the four columns: {n}");
            }
        }
        s
    }

    /// A grouped bar chart of the rows (matching and location on 0-1, QA and caption on 1-10 drawn
    /// as score / 10, the value written on each bar).
    pub fn svg(&self) -> String {
        let rows = self.rows();
        let (w, h, left, top, bottom) = (760.0, 380.0, 60.0, 40.0, 80.0);
        let plot_h = h - top - bottom;
        let groups = ["Matching (acc)", "Location (acc@0.5)", "QA (score)", "Caption (score)"];
        let colors = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7"];
        let gw = (w - left - 20.0) / groups.len() as f64;
        let bw = (gw * 0.8 / rows.len().max(1) as f64).min(60.0);
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"15\">MM-ID</text>\n",
            w / 2.0
        );
        for t in 0..=5 {
            let v = t as f64 / 5.0;
            let y = top + plot_h * (1.0 - v);
            let _ = writeln!(
                s,
                "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{v:.1} / {:.0}</text>",
                w - 20.0,
                left - 4.0,
                y + 4.0,
                v * 10.0
            );
        }
        for (gi, g) in groups.iter().enumerate() {
            let x0 = left + gw * gi as f64 + gw * 0.1;
            for (ri, (_, row)) in rows.iter().enumerate() {
                let (v, scale) = match gi {
                    0 => (row.matching, 1.0),
                    1 => (row.location, 1.0),
                    2 => (row.qa, 10.0),
                    _ => (row.caption, 10.0),
                };
                let Some(v) = v else { continue };
                let bh = plot_h * (v / scale).clamp(0.0, 1.0);
                let x = x0 + bw * ri as f64;
                let label = if scale == 1.0 { format!("{v:.3}") } else { format!("{v:.2}") };
                let _ = writeln!(
                    s,
                    "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"/>\
                     <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{label}</text>",
                    top + plot_h - bh,
                    bw * 0.9,
                    colors[ri % colors.len()],
                    x + bw * 0.45,
                    top + plot_h - bh - 3.0
                );
            }
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{g}</text>",
                left + gw * (gi as f64 + 0.5),
                top + plot_h + 18.0
            );
        }
        for (ri, (name, _)) in rows.iter().enumerate() {
            let x = left + 180.0 * (ri % 4) as f64;
            let y = h - bottom + 45.0 + 16.0 * (ri / 4) as f64;
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{y:.1}\">{}</text>",
                y - 9.0,
                colors[ri % colors.len()],
                x + 14.0,
                xml_escape(name)
            );
        }
        s.push_str("</svg>\n");
        s
    }

    /// Writes `report.json`, `report.md` and (two rows or more) `scores.svg` into `dir`; returns the
    /// files written.
    pub fn write(&self, dir: &Path) -> Result<Vec<std::path::PathBuf>> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut files = vec![
            (dir.join("report.json"), serde_json::to_string_pretty(self).expect("a report serialises") + "\n"),
            (dir.join("report.md"), self.markdown()),
        ];
        if self.rows().len() >= 2 {
            files.push((dir.join("scores.svg"), self.svg()));
        }
        for (f, text) in &files {
            let tmp = f.with_extension("partial");
            std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
            std::fs::rename(&tmp, f).map_err(|e| Error::io(f, e))?;
        }
        Ok(files.into_iter().map(|(f, _)| f).collect())
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pred(id: &str, kind: &str, score: Option<f64>) -> Prediction {
        Prediction {
            id: id.into(),
            kind: kind.into(),
            question: "q".into(),
            answer: "a".into(),
            prediction: "p".into(),
            score,
            unparsable: false,
            invalid: None,
        }
    }

    #[test]
    fn four_columns_per_type_and_overall() {
        let preds = vec![
            pred("m1", "matching", Some(1.0)),
            pred("m2", "matching", Some(0.0)),
            pred("l1", "location", Some(0.7)),
            pred("l2", "location", Some(0.2)),
            pred("q1", "QA_singleimage", None),
            pred("q2", "QA_multiimage", None),
            pred("q3", "QA_multiimage", None),
            pred("c1", "caption_singleimage", None),
            pred("c2", "caption_multiimage", None),
            pred("x", "other", None),
        ];
        let s = |score| Some(Verdict::Scored { score, text: score.to_string() });
        let verdicts = vec![
            None,
            None,
            None,
            None,
            s(8),
            s(4),
            Some(Verdict::Unparsable { text: "?".into() }),
            s(6),
            Some(Verdict::Failed { error: "e".into() }),
            None,
        ];
        let r = score_run("run", "p.jsonl", None, &preds, &verdicts);
        assert_eq!(r.matching.accuracy, Some(0.5));
        assert_eq!(r.location.accuracy, Some(0.5));
        assert!((r.location.mean_iou.unwrap() - 0.45).abs() < 1e-12);
        assert_eq!((r.qa.single.mean, r.qa.multi.mean, r.qa.all.mean), (Some(8.0), Some(4.0), Some(6.0)));
        assert_eq!((r.qa.all.items, r.qa.all.judged, r.qa.all.unparsable), (3, 2, 1));
        assert_eq!((r.caption.all.mean, r.caption.all.failed, r.caption.multi.mean), (Some(6.0), 1, None));
        assert_eq!(r.other_types["other"], 1);
        let rep = Report { runs: vec![r], published: Some(PUBLISHED) };
        let md = rep.markdown();
        assert!(md.contains("| IDA-VLM (published) | 0.806 | 0.854 | 5.74 | 5.32 |"), "{md}");
        assert!(md.contains("| run | 0.500 | 0.500 | 6.00 | 6.00 |"), "{md}");
        assert!(rep.svg().contains("IDA-VLM (published)"));
    }
}
