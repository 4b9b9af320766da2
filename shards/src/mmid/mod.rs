//! Benchmarks in the MM-ID layout (SPEC §5) and their Parquet form.
//!
//! An MM-ID file is a JSON list of items `{id, type, question, answer, image_0|image_1.., ...}` whose
//! question names its images by key (`image_1`) and whose image paths are relative to a root folder.
//! The Parquet form is an ordinary dataset of [`crate::format`] (one row per item, `source` = the type,
//! a user turn with the question's keys replaced by `<img>PATH</img>`, an assistant turn with the
//! reference answer, the image bytes embedded), so an evaluation split travels as one verified folder.

pub mod judge;
pub mod report;
pub mod score;

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use crate::chat::{image_paths_in, Turn};
use crate::error::{Error, Result};
use crate::format::{DatasetWriter, ImageBlob, Manifest, Sample, MANIFEST};
use crate::reader::Source;

/// One benchmark item.
#[derive(Clone, Debug, Default)]
pub struct Item {
    pub id: String,
    pub kind: String,
    pub question: String,
    pub answer: String,
    /// `image_k` key -> path, in key order (MM-ID JSON); empty when the question already holds
    /// `<img>PATH</img>` spans (Parquet form).
    pub images: Vec<(String, String)>,
    /// Image bytes by path, when the benchmark carries them (Parquet form).
    pub embedded: HashMap<String, Vec<u8>>,
}

impl Item {
    /// The question as the model sees it, each image placeholder replaced by its path as the original
    /// `inference_test.py` does. The published benchmark already tags its placeholders
    /// (`<img>image_1</img>`): the key is replaced by the path as plain text, inside the existing tags.
    /// A bare key (`image_1`, an older form) is wrapped in `<img>..</img>`. One left-to-right scan,
    /// longest key first at each position, so `image_1` never eats the front of `image_10` and a path
    /// that happens to contain a key's text is never substituted again.
    pub fn filled_question(&self) -> String {
        let mut keys: Vec<&(String, String)> = self.images.iter().collect();
        keys.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
        let q = self.question.as_str();
        let mut out = String::with_capacity(q.len() + 64);
        let mut i = 0;
        'scan: while i < q.len() {
            let rest = &q[i..];
            for (k, p) in &keys {
                let tagged = format!("<img>{k}</img>");
                let taken = if rest.starts_with(&tagged) {
                    tagged.len()
                } else if rest.starts_with(k.as_str()) {
                    k.len()
                } else {
                    continue;
                };
                out.push_str("<img>");
                out.push_str(p);
                out.push_str("</img>");
                i += taken;
                continue 'scan;
            }
            let c = rest.chars().next().expect("non-empty");
            out.push(c);
            i += c.len_utf8();
        }
        out
    }

    /// Paths of the item's images in order of appearance in the filled question.
    pub fn image_paths(&self) -> Result<Vec<String>> {
        image_paths_in(&self.id, &self.filled_question())
    }

    /// The bytes of one of the item's images: embedded, or read from `root` (confined to it).
    pub fn image_bytes(&self, path: &str, root: &Path) -> Result<Vec<u8>> {
        if let Some(b) = self.embedded.get(path) {
            return Ok(b.clone());
        }
        let f = crate::chat::confined(root, path).map_err(|e| Error::Invalid(format!("item {}: {e}", self.id)))?;
        std::fs::read(&f).map_err(|e| Error::Invalid(format!("item {}: image {path:?}: {}: {e}", self.id, f.display())))
    }

    /// Why the item cannot be scored (an empty or missing reference answer), if it cannot.
    pub fn unscorable(&self) -> Option<String> {
        match self.kind.as_str() {
            "matching" | "location" if self.answer.trim().is_empty() || self.answer.trim() == "[]" => {
                Some(format!("item {}: empty reference answer {:?}", self.id, self.answer))
            }
            _ => None,
        }
    }
}

/// Checks every item's inputs before any work: the question's image spans parse, each image exists
/// (embedded, or a file under `root`, never outside it) and decodes. The error names the item and the
/// image; every bad item is listed (up to 20), not only the first.
pub fn check_items(items: &[Item], root: &Path) -> Result<()> {
    let mut bad = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for it in items {
        if !seen.insert(it.id.as_str()) {
            bad.push(format!("item {}: the id appears twice", it.id));
        }
        let paths = match it.image_paths() {
            Ok(p) => p,
            Err(e) => {
                bad.push(e.to_string());
                continue;
            }
        };
        for p in paths {
            match it.image_bytes(&p, root) {
                Ok(bytes) => {
                    if let Err(e) = crate::preprocess::decode_rgb8(&bytes, &p) {
                        bad.push(format!("item {}: {e}", it.id));
                    }
                }
                Err(e) => bad.push(e.to_string()),
            }
        }
    }
    if bad.is_empty() {
        return Ok(());
    }
    let n = bad.len();
    let mut msg = bad.into_iter().take(20).collect::<Vec<_>>().join("\n  ");
    if n > 20 {
        msg.push_str(&format!("\n  ... and {} more", n - 20));
    }
    Err(Error::Invalid(format!("{n} problem(s) in the benchmark's items (nothing was generated):\n  {msg}")))
}

/// Reads a benchmark: an MM-ID JSON file, or a Parquet dataset folder (with `index.json`).
pub fn read_bench(path: &Path) -> Result<Vec<Item>> {
    if path.is_dir() {
        read_parquet(path)
    } else {
        read_json(path)
    }
}

/// Reads an MM-ID JSON list; a missing field names the file and the item.
pub fn read_json(path: &Path) -> Result<Vec<Item>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))?;
    let list = v.as_array().ok_or_else(|| Error::format(path, "expected a JSON list of items"))?;
    list.iter()
        .enumerate()
        .map(|(i, it)| {
            let s = |k: &str| -> Result<String> {
                it.get(k)
                    .map(|x| x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string()))
                    .ok_or_else(|| Error::format(path, format!("item {i}: no {k:?}")))
            };
            let mut images: Vec<(usize, String, String)> = it
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| {
                    let n = k.strip_prefix("image_")?.parse::<usize>().ok()?;
                    Some((n, k.clone(), v.as_str()?.to_string()))
                })
                .collect();
            images.sort();
            Ok(Item {
                id: s("id")?,
                kind: s("type")?,
                question: s("question")?,
                answer: s("answer")?,
                images: images.into_iter().map(|(_, k, p)| (k, p)).collect(),
                embedded: HashMap::new(),
            })
        })
        .collect()
}

/// Reads the Parquet form, in storage order (the manifest checked against the footers first).
pub fn read_parquet(dir: &Path) -> Result<Vec<Item>> {
    let src = Source::open("eval", dir)?;
    src.read_all()?
        .into_iter()
        .map(|s| {
            let turn = |role: &str| s.conversations.iter().find(|t| t.from == role).map(|t| t.value.clone());
            let (Some(question), Some(answer)) = (turn("user"), turn("assistant")) else {
                return Err(Error::format(dir, format!("sample {}: an eval row needs a user and an assistant turn", s.id)));
            };
            Ok(Item {
                id: s.id,
                kind: s.source,
                question,
                answer,
                images: Vec::new(),
                embedded: s.images.into_iter().map(|b| (b.path, b.bytes)).collect(),
            })
        })
        .collect()
}

/// Writes MM-ID items (images read from `root`) as a Parquet eval dataset in `out`; `count_tokens` gives
/// each row's `num_tokens`. Returns the manifest.
pub fn write_parquet(
    items: &[Item],
    root: &Path,
    out: &Path,
    source_name: &str,
    count_tokens: &dyn Fn(&[Turn]) -> Result<i32>,
) -> Result<Manifest> {
    if out.join(MANIFEST).exists() {
        return Err(Error::format(&out.join(MANIFEST), "the output folder already holds a dataset"));
    }
    // Everything is checked before the output folder exists, and a failure while writing removes
    // what this call created: no empty or partial dataset folder is left behind.
    check_items(items, root)?;
    let created = !out.exists();
    let r = (|| {
        let mut w = DatasetWriter::create(out, source_name, 256 << 20, 64)?;
        for it in items {
            let question = it.filled_question();
            let mut images = Vec::new();
            for p in image_paths_in(&it.id, &question)? {
                images.push(ImageBlob { bytes: it.image_bytes(&p, root)?, path: p });
            }
            let conversations =
                vec![Turn { from: "user".into(), value: question }, Turn { from: "assistant".into(), value: it.answer.clone() }];
            let num_tokens = count_tokens(&conversations)?;
            w.push(Sample { id: it.id.clone(), source: it.kind.clone(), conversations, images, num_tokens })?;
        }
        w.finish()
    })();
    if r.is_err() && created {
        let _ = std::fs::remove_dir_all(out);
    }
    r
}
