//! Benchmarks in the MM-ID layout (SPEC §5) and their Parquet form.
//!
//! An MM-ID file is a JSON list of items `{id, type, question, answer, image_0|image_1.., ...}` whose
//! question names its images by key (`image_1`) and whose image paths are relative to a root folder.
//! The Parquet form is an ordinary dataset of [`crate::format`] (one row per item, `source` = the type,
//! a user turn with the question's keys replaced by `<img>PATH</img>`, an assistant turn with the
//! reference answer, the image bytes embedded), so an evaluation split travels as one verified folder.

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
    /// The question with each `image_k` replaced by `<img>PATH</img>` (longest keys first, so `image_1`
    /// never eats the front of `image_10`).
    pub fn filled_question(&self) -> String {
        let mut keys: Vec<&(String, String)> = self.images.iter().collect();
        keys.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
        let mut q = self.question.clone();
        for (k, p) in keys {
            q = q.replace(k.as_str(), &format!("<img>{p}</img>"));
        }
        q
    }

    /// Paths of the item's images in order of appearance in the filled question.
    pub fn image_paths(&self) -> Result<Vec<String>> {
        image_paths_in(&self.id, &self.filled_question())
    }

    /// The bytes of one of the item's images: embedded, or read from `root`.
    pub fn image_bytes(&self, path: &str, root: &Path) -> Result<Vec<u8>> {
        if let Some(b) = self.embedded.get(path) {
            return Ok(b.clone());
        }
        let f = root.join(path);
        std::fs::read(&f).map_err(|e| Error::io(&f, e))
    }
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
    let mut w = DatasetWriter::create(out, source_name, 256 << 20, 64)?;
    for it in items {
        let question = it.filled_question();
        let mut images = Vec::new();
        for p in image_paths_in(&it.id, &question)? {
            let bytes = it.image_bytes(&p, root)?;
            crate::preprocess::decode_rgb8(&bytes, &root.join(&p).display().to_string())?;
            images.push(ImageBlob { bytes, path: p });
        }
        let conversations =
            vec![Turn { from: "user".into(), value: question }, Turn { from: "assistant".into(), value: it.answer.clone() }];
        let num_tokens = count_tokens(&conversations)?;
        w.push(Sample { id: it.id.clone(), source: it.kind.clone(), conversations, images, num_tokens })?;
    }
    w.finish()
}
