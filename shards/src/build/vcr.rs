//! VCR (`ROOT/vcr1annots/{split}.jsonl`, `ROOT/vcr1images/<img_fn>` and its box JSON
//! `<metadata_fn>`) as vcr_trans.py turns it into ID-reference conversations:
//!
//! - The numbers in `question_orig`, `answer_orig` and `rationale_orig` refer to `objects` (from 1).
//!   In order of first appearance each referenced person gets a name (drawn for every object, as
//!   `random.sample(names, len(objects))`), every other object `image 1`, `image 2`, ...
//! - Skipped: a number beyond `objects` ("unknown object index"), more than 5 referenced entities, a
//!   referenced box under 8% of the image ("box too small"), a word that starts with a number no
//!   reference resolves ("unresolvable number": the original's KeyError).
//! - Two prompt forms, one at random: the scene first (`In the image 0: <img>scene</img>\nthere are some
//!   object or person images. ` then `LABEL: <img>crop</img>\n` per referenced box), or the people first
//!   (`LABEL is <img>crop</img>\n` per box, then `In the image <img>scene</img>\n`), followed by the
//!   question; each crop flipped at random. The answer, then "explain why" or "give a reason for the
//!   answer" (at random) and the rationale.
//! - Words starting with a number become their label: `1` -> label, `12,` -> label + `,`, `1's` ->
//!   label + `'s` (the first two characters when both are digits, else the first).
//!
//! A number `0` refers to no object (the original would have taken the last object); it is an unknown
//! object index here.

use std::collections::HashMap;
use std::path::Path;

use rand::seq::IndexedRandom;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::{coin, malformed, rel, run, sample_names, BuildOptions, BuildReport, Outcome, Record, Rgb, SourceKind};
use crate::chat::Turn;
use crate::error::Result;
use crate::format::ImageBlob;
use crate::tokenizer::Tokenizer;

pub const FOLLOW_UPS: [&str; 2] = ["explain why", "give a reason for the answer"];

struct Vcr {
    question: String,
    answer: String,
    rationale: String,
    objects: Vec<String>,
    img_fn: String,
    metadata_fn: String,
}

fn parse(r: &Record<Value>) -> Result<Vcr> {
    let v = &r.value;
    let s = |k: &str| -> Result<String> {
        match v.get(k).and_then(Value::as_str) {
            Some(x) => Ok(x.to_string()),
            None => malformed(&r.file, r.line, format!("no string {k:?}")),
        }
    };
    let objects = match v.get("objects").and_then(Value::as_array) {
        Some(a) => a.iter().map(|o| o.as_str().map(str::to_string)).collect::<Option<Vec<_>>>(),
        None => None,
    };
    let Some(objects) = objects else { return malformed(&r.file, r.line, "no \"objects\" list of strings") };
    let img_fn = s("img_fn")?;
    let metadata_fn = match v.get("metadata_fn").and_then(Value::as_str) {
        Some(m) => m.to_string(),
        None => format!("{}json", img_fn.strip_suffix("jpg").unwrap_or(&img_fn)),
    };
    Ok(Vcr { question: s("question_orig")?, answer: s("answer_orig")?, rationale: s("rationale_orig")?, objects, img_fn, metadata_fn })
}

/// The numbers of `text` as `\b(\d+)\b` finds them.
fn numbers(text: &str) -> Vec<&str> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    while i < b.len() {
        if b[i].is_ascii_digit() && (i == 0 || !word(b[i - 1])) {
            let j = i + b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
            if j == b.len() || !word(b[j]) {
                out.push(&text[i..j]);
            }
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// The text with each number-led word replaced by its label (None: a number with no label).
fn relabel(text: &str, labels: &HashMap<String, String>) -> Option<String> {
    let mut words = Vec::new();
    for w in text.split_whitespace() {
        let chars: Vec<char> = w.chars().collect();
        if chars[0].is_numeric() {
            let (key, rest): (String, String) = if chars.len() == 1 {
                (w.to_string(), String::new())
            } else if chars[1].is_numeric() {
                (chars[..2].iter().collect(), chars[2..].iter().collect())
            } else {
                (chars[..1].iter().collect(), chars[1..].iter().collect())
            };
            words.push(format!("{}{rest}", labels.get(&key)?));
        } else {
            words.push(w.to_string());
        }
    }
    Some(words.join(" "))
}

fn make(root: &Path, r: &Record<Value>, rng: &mut ChaCha8Rng) -> Result<Outcome> {
    let v = parse(r)?;
    let names = sample_names(rng, v.objects.len());
    let mut labels: HashMap<String, String> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut other = 1;
    for text in [&v.question, &v.answer, &v.rationale] {
        for n in numbers(text) {
            if labels.contains_key(n) {
                continue;
            }
            let k: usize = n.parse().unwrap_or(usize::MAX);
            if k == 0 || k > v.objects.len() {
                return Ok(Outcome::skip("unknown object index"));
            }
            let label = if v.objects[k - 1] == "person" {
                match names.get(k - 1) {
                    Some(name) => name.to_string(),
                    None => return Ok(Outcome::skip("more people than names")),
                }
            } else {
                other += 1;
                format!("image {}", other - 1)
            };
            labels.insert(n.to_string(), label);
            order.push(n.to_string());
        }
    }
    if labels.len() > 5 {
        return Ok(Outcome::skip("more than 5 referenced entities"));
    }
    let img_path = root.join("vcr1images").join(&v.img_fn);
    let meta_path = root.join("vcr1images").join(&v.metadata_fn);
    let (Ok(scene), Ok(meta_bytes)) = (std::fs::read(&img_path), std::fs::read(&meta_path)) else {
        return Ok(Outcome::skip("missing image or box file"));
    };
    let meta: Value = match serde_json::from_slice(&meta_bytes) {
        Ok(m) => m,
        Err(e) => return malformed(&meta_path, 1, format!("not JSON: {e}")),
    };
    let (Some(w), Some(h), Some(boxes)) =
        (meta.get("width").and_then(Value::as_f64), meta.get("height").and_then(Value::as_f64), meta.get("boxes").and_then(Value::as_array))
    else {
        return malformed(&meta_path, 1, "no width, height and boxes");
    };
    let size = w * h;
    let scene_first = coin(rng);
    let scene_rel = rel(root, &img_path);
    let pixels = match Rgb::decode(&scene, &scene_rel) {
        Ok(p) => p,
        Err(_) => return Ok(Outcome::skip("image does not decode")),
    };
    let mut info =
        if scene_first { format!("In the image 0: <img>{scene_rel}</img>\nthere are some object or person images. ") } else { String::new() };
    let mut images = vec![ImageBlob { bytes: scene, path: scene_rel.clone() }];
    let mut flips = Vec::new();
    for (i, b) in boxes.iter().enumerate() {
        let Some(label) = labels.get(&(i + 1).to_string()) else { continue };
        let c: Vec<f64> = b.as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default();
        if c.len() < 4 {
            return malformed(&meta_path, 1, format!("boxes[{i}] is not [x1, y1, x2, y2, score]"));
        }
        if (c[3] - c[1]) * (c[2] - c[0]) < size * 0.08 {
            return Ok(Outcome::skip("box under 8% of the image"));
        }
        let flip = coin(rng);
        flips.push(flip);
        let stem = v.img_fn.strip_suffix(".jpg").unwrap_or(&v.img_fn);
        let crop_path = format!("vcr1images/{stem}_{i}.png");
        images.push(ImageBlob { bytes: pixels.crop_png([c[0], c[1], c[2], c[3]], flip), path: crop_path.clone() });
        if scene_first {
            info.push_str(&format!("{label}: <img>{crop_path}</img>\n"));
        } else {
            info.push_str(&format!("{label} is <img>{crop_path}</img>\n"));
        }
    }
    if !scene_first {
        info.push_str(&format!("In the image <img>{scene_rel}</img>\n"));
        // The scene comes after the crops in the text: keep the images in the text's order.
        let scene = images.remove(0);
        images.push(scene);
    }
    let (Some(q), Some(a), Some(why)) = (relabel(&v.question, &labels), relabel(&v.answer, &labels), relabel(&v.rationale, &labels))
    else {
        return Ok(Outcome::skip("unresolvable number"));
    };
    let follow = *FOLLOW_UPS.choose(rng).expect("two follow-ups");
    let turns = vec![
        Turn { from: "user".into(), value: info + &q },
        Turn { from: "assistant".into(), value: a },
        Turn { from: "user".into(), value: follow.into() },
        Turn { from: "assistant".into(), value: why },
    ];
    let choices = json!({"names": names, "scene_first": scene_first, "flips": flips, "follow_up": follow, "labels": order.iter().map(|k| (k.clone(), labels[k].clone())).collect::<Vec<_>>()});
    Ok(Outcome::one(turns, images, choices))
}

pub fn build(root: &Path, out: &Path, tok: &Tokenizer, o: &BuildOptions, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<BuildReport> {
    let ann = root.join("vcr1annots").join(format!("{}.jsonl", o.split));
    let records = super::jsonl(&ann)?;
    let n = records.len().min(o.limit.unwrap_or(usize::MAX)) as u64;
    run(SourceKind::Vcr, &records, out, tok, o, &|d| progress(d, n), &|r, rng| make(root, r, rng))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_relabelling_follow_the_original() {
        assert_eq!(numbers("Why is 1 looking at 2's hat, 12? 3rd 4"), vec!["1", "2", "12", "4"]);
        let labels: HashMap<String, String> =
            [("1", "Ann"), ("2", "Bob"), ("12", "image 1")].iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        assert_eq!(relabel("Why is 1 looking at 2's hat, 12?", &labels).as_deref(), Some("Why is Ann looking at Bob's hat, image 1?"));
        assert_eq!(relabel("1,2 are here", &labels).as_deref(), Some("Ann,2 are here"));
        assert_eq!(relabel("3rd one", &labels), None);
    }
}
