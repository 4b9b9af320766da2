//! `idavlm-shards convert`: the original tuning JSON (a list of `{id, conversations}`) plus an image
//! root -> a dataset folder of Parquet shards.
//!
//! Two passes: the first checks every sample (conversation shape, every image readable and decodable,
//! length within max) on a worker pool and collects the bad ones; the second writes the good samples.
//! With `--on-bad-sample fail` (the default) nothing is written when any sample is bad.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::chat::{confined, encode_conversation, Overflow, Turn};
use crate::error::{Error, Result};
use crate::format::{DatasetWriter, ImageBlob, Manifest, Sample};
use crate::preprocess::decode_rgb8;
use crate::tokenizer::Tokenizer;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnBad {
    Skip,
    Fail,
}

#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub source: String,
    pub max_len: usize,
    pub target_shard_bytes: u64,
    pub row_group_rows: usize,
    pub on_bad: OnBad,
    pub workers: usize,
}

/// A rejected sample and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadSample {
    pub index: usize,
    pub id: String,
    pub reason: String,
}

#[derive(Debug)]
pub struct ConvertReport {
    pub written: u64,
    pub bad: Vec<BadSample>,
    pub manifest: Option<Manifest>,
}

struct Raw {
    id: String,
    turns: Vec<Turn>,
}

fn parse_json(json: &Path) -> Result<Vec<std::result::Result<Raw, BadSample>>> {
    let text = std::fs::read_to_string(json).map_err(|e| Error::io(json, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::format(json, format!("invalid JSON: {e}")))?;
    let list = v.as_array().ok_or_else(|| Error::format(json, "expected a JSON list of samples"))?;
    Ok(list
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let id = s
                .get("id")
                .map(|x| x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string()))
                .unwrap_or_else(|| format!("#{i}"));
            let bad = |r: String| BadSample { index: i, id: id.clone(), reason: r };
            let conv =
                s.get("conversations").and_then(|c| c.as_array()).ok_or_else(|| bad("no \"conversations\" list".into()))?;
            let mut turns = Vec::new();
            for (j, t) in conv.iter().enumerate() {
                let from = t
                    .get("from")
                    .and_then(|x| x.as_str())
                    .ok_or_else(|| bad(format!("conversations[{j}]: no string \"from\"")))?;
                let value = t
                    .get("value")
                    .and_then(|x| x.as_str())
                    .ok_or_else(|| bad(format!("conversations[{j}]: no string \"value\"")))?;
                turns.push(Turn { from: from.to_string(), value: value.to_string() });
            }
            Ok(Raw { id, turns })
        })
        .collect())
}

/// Checks one sample; returns its token count and image paths.
fn check(tok: &Tokenizer, root: &Path, raw: &Raw, max_len: usize) -> std::result::Result<(i32, Vec<String>), String> {
    let enc = encode_conversation(tok, &raw.id, &raw.turns, max_len, Overflow::Reject).map_err(|e| e.to_string())?;
    for p in &enc.image_paths {
        let f = confined(root, p)?;
        let bytes = std::fs::read(&f).map_err(|e| format!("image {}: {e}", f.display()))?;
        decode_rgb8(&bytes, &f.display().to_string()).map_err(|e| e.to_string())?;
    }
    Ok((enc.input_ids.len() as i32, enc.image_paths))
}

pub fn convert(json: &Path, image_root: &Path, out: &Path, tok: &Tokenizer, o: &ConvertOptions) -> Result<ConvertReport> {
    let parsed = parse_json(json)?;
    let n = parsed.len();
    let checked: Vec<Mutex<Option<std::result::Result<(i32, Vec<String>), String>>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|sc| {
        for _ in 0..o.workers.max(1) {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                if let Ok(raw) = &parsed[i] {
                    *checked[i].lock().expect("lock") = Some(check(tok, image_root, raw, o.max_len));
                }
            });
        }
    });
    let mut bad = Vec::new();
    let mut good = Vec::new();
    for (i, (p, c)) in parsed.into_iter().zip(checked).enumerate() {
        match (p, c.into_inner().expect("lock")) {
            (Err(b), _) => bad.push(b),
            (Ok(raw), Some(Err(reason))) => bad.push(BadSample { index: i, id: raw.id, reason }),
            (Ok(raw), Some(Ok((ntok, paths)))) => good.push((raw, ntok, paths)),
            (Ok(_), None) => unreachable!("every parsed sample is checked"),
        }
    }
    if o.on_bad == OnBad::Fail && !bad.is_empty() {
        return Ok(ConvertReport { written: 0, bad, manifest: None });
    }
    let mut w = DatasetWriter::create(out, &o.source, o.target_shard_bytes, o.row_group_rows)?;
    let mut written = 0;
    for (raw, ntok, paths) in good {
        let mut images = Vec::new();
        for p in paths {
            let f = confined(image_root, &p).map_err(|e| Error::sample(&raw.id, e))?;
            images.push(ImageBlob { bytes: std::fs::read(&f).map_err(|e| Error::io(&f, e))?, path: p });
        }
        w.push(Sample { id: raw.id, source: o.source.clone(), conversations: raw.turns, images, num_tokens: ntok })?;
        written += 1;
    }
    let m = w.finish()?;
    Ok(ConvertReport { written, bad, manifest: Some(m) })
}
