//! Flickr30k Entities in Shikra's form (`ROOT/CWB_flickr30k_{split}.jsonl`: `sentence` with
//! `<ph_st>phrase<ph_ed>` spans, `boxes`, `boxes_seq` (the boxes of each phrase), `image_id`, `id`;
//! images `ROOT/flickr30k-images/<image_id>.jpg`) as f30k_trans.py turns it into ID-reference captions:
//!
//! - Skipped: captions of fewer than 10 words, more than 5 people, a person's box under 3,000 px²
//!   ("box too small").
//! - A phrase whose lower-cased text holds one of [`KEY_WORDS`] names people: its boxes are people, each
//!   named at random (`random.sample(names, people)`, in order of first appearance).
//! - The prompt: `Given some people characters, ` then `NAME is <img>crop</img>\n, ` per person (the
//!   last `, ` replaced by `. `; with no people the prompt starts `. `), then a caption request drawn from
//!   the templates with `<image>` replaced by `<img>scene</img>\n`; each crop flipped at random.
//! - The answer: the caption with each people phrase replaced by its names (`A`, `A and B`, `A, B and
//!   C`) and every other phrase by its text. Equal phrases share one replacement, the last one's (the
//!   original's dictionary).
//!
//! The original drew its caption requests from Shikra's `flickr30k.json`; `--templates FILE` takes that
//! file (a JSON list of strings holding `<image>`); without it [`TEMPLATES`] are used.

use std::path::Path;

use rand::seq::IndexedRandom;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::{coin, malformed, rel, run, sample_names, BuildOptions, BuildReport, Outcome, Record, Rgb, SourceKind};
use crate::chat::Turn;
use crate::error::{Error, Result};
use crate::format::ImageBlob;
use crate::tokenizer::Tokenizer;

/// The original's people words (matched as substrings of the lower-cased phrase; ` man` with its space
/// so that "woman" needs its own entry).
pub const KEY_WORDS: [&str; 21] = [
    "people", " man", " men", "woman", "women", "boy", "girl", "person", "child", "lady", "guy", "someone", "kid", "female",
    " male", "player", "audience", "adult", "biker", "mom", "mother",
];

/// Caption requests (ours; the original used Shikra's flickr30k.json: `--templates`).
pub const TEMPLATES: [&str; 6] = [
    "<image>Describe this image, naming the people in it.",
    "<image>Write a caption for the image that says who is who.",
    "<image>What happens in this picture? Refer to the people by their names.",
    "<image>Give a one-sentence description of the scene and its characters.",
    "<image>Summarise the image, mentioning each character by name.",
    "<image>Tell me what the people in this image are doing.",
];

struct Entry {
    sentence: String,
    boxes: Vec<[f64; 4]>,
    boxes_seq: Vec<Vec<usize>>,
    image_id: String,
    id: String,
}

fn parse(r: &Record<Value>) -> Result<Entry> {
    let v = &r.value;
    let str_of = |k: &str| v.get(k).map(|x| x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string()));
    let (Some(sentence), Some(image_id)) = (v.get("sentence").and_then(Value::as_str), str_of("image_id")) else {
        return malformed(&r.file, r.line, "no string \"sentence\" and \"image_id\"");
    };
    let boxes: Option<Vec<[f64; 4]>> = v.get("boxes").and_then(Value::as_array).and_then(|a| {
        a.iter()
            .map(|b| {
                let c: Vec<f64> = b.as_array()?.iter().filter_map(Value::as_f64).collect();
                (c.len() == 4).then(|| [c[0], c[1], c[2], c[3]])
            })
            .collect()
    });
    let seq: Option<Vec<Vec<usize>>> = v.get("boxes_seq").and_then(Value::as_array).and_then(|a| {
        a.iter().map(|s| s.as_array()?.iter().map(|x| x.as_u64().map(|n| n as usize)).collect()).collect()
    });
    let (Some(boxes), Some(boxes_seq)) = (boxes, seq) else {
        return malformed(&r.file, r.line, "\"boxes\" must be a list of [x1, y1, x2, y2] and \"boxes_seq\" a list of index lists");
    };
    for (i, s) in boxes_seq.iter().enumerate() {
        if let Some(b) = s.iter().find(|&&b| b >= boxes.len()) {
            return malformed(&r.file, r.line, format!("boxes_seq[{i}] names box {b}, and there are {} boxes", boxes.len()));
        }
    }
    Ok(Entry { sentence: sentence.to_string(), boxes, boxes_seq, image_id: image_id.trim_matches('"').to_string(), id: str_of("id").unwrap_or_default() })
}

/// The phrases of a sentence (`<ph_st>(.*?)<ph_ed>`), in order.
fn phrases(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(a) = rest.find("<ph_st>") {
        let after = &rest[a + 7..];
        let Some(b) = after.find("<ph_ed>") else { break };
        out.push(&after[..b]);
        rest = &after[b + 7..];
    }
    out
}

fn make(root: &Path, templates: &[String], r: &Record<Value>, rng: &mut ChaCha8Rng) -> Result<Outcome> {
    let e = parse(r)?;
    if e.sentence.split_whitespace().count() < 10 {
        return Ok(Outcome::skip("caption under 10 words"));
    }
    let ph = phrases(&e.sentence);
    if ph.len() > e.boxes_seq.len() {
        return malformed(&r.file, r.line, format!("{} phrases and {} boxes_seq entries", ph.len(), e.boxes_seq.len()));
    }
    let is_people = |m: &str| {
        let m = m.to_lowercase();
        KEY_WORDS.iter().any(|k| m.contains(k))
    };
    // People boxes in order of first appearance.
    let mut people: Vec<usize> = Vec::new();
    for (i, m) in ph.iter().enumerate() {
        if is_people(m) {
            for &b in &e.boxes_seq[i] {
                if !people.contains(&b) {
                    people.push(b);
                }
            }
        }
    }
    if people.len() > 5 {
        return Ok(Outcome::skip("more than 5 people"));
    }
    let names = sample_names(rng, people.len());
    let name_of = |b: usize| names[people.iter().position(|&p| p == b).expect("a person")];
    // phrase -> replacement; equal phrases share the last one's (an ordered dictionary).
    let mut replace: Vec<(String, String)> = Vec::new();
    for (i, m) in ph.iter().enumerate() {
        let to = if is_people(m) {
            let ids = &e.boxes_seq[i];
            let mut s = String::new();
            for (j, &b) in ids.iter().enumerate() {
                s.push_str(name_of(b));
                s.push_str(if ids.len() > 1 && j == ids.len() - 2 { " and " } else { ", " });
            }
            s.truncate(s.len().saturating_sub(2));
            s
        } else {
            m.to_string()
        };
        let key = format!("<ph_st>{m}<ph_ed>");
        match replace.iter_mut().find(|(k, _)| *k == key) {
            Some(kv) => kv.1 = to,
            None => replace.push((key, to)),
        }
    }
    let scene_path = root.join("flickr30k-images").join(format!("{}.jpg", e.image_id));
    let Ok(scene) = std::fs::read(&scene_path) else { return Ok(Outcome::skip("missing image")) };
    let scene_rel = rel(root, &scene_path);
    let Ok(pixels) = Rgb::decode(&scene, &scene_rel) else { return Ok(Outcome::skip("image does not decode")) };
    let mut q = if people.is_empty() { String::new() } else { "Given some people characters, ".to_string() };
    let mut images = Vec::new();
    let mut flips = Vec::new();
    for (k, &b) in people.iter().enumerate() {
        let bx = e.boxes[b];
        if (bx[3] - bx[1]) * (bx[2] - bx[0]) < 3000.0 {
            return Ok(Outcome::skip("box under 3000 px2"));
        }
        let flip = coin(rng);
        flips.push(flip);
        let crop_path = format!("flickr30k-crops/{}/{}.png", e.id, names[k]);
        q.push_str(&format!("{} is <img>{crop_path}</img>\n, ", names[k]));
        images.push(ImageBlob { bytes: pixels.crop_png(bx, flip), path: crop_path });
    }
    q.truncate(q.len().saturating_sub(2));
    q.push_str(". ");
    let template = templates.choose(rng).expect("at least one template").clone();
    q.push_str(&template.replace("<image>", &format!("<img>{scene_rel}</img>\n")));
    images.push(ImageBlob { bytes: scene, path: scene_rel });
    let mut answer = e.sentence.clone();
    for (k, to) in &replace {
        answer = answer.replace(k.as_str(), to);
    }
    let turns = vec![Turn { from: "user".into(), value: q }, Turn { from: "assistant".into(), value: answer }];
    let choices = json!({"names": names, "people_boxes": people, "flips": flips, "template": template});
    Ok(Outcome::one(turns, images, choices))
}

fn templates(o: &BuildOptions) -> Result<Vec<String>> {
    let Some(p) = &o.templates else { return Ok(TEMPLATES.iter().map(|s| s.to_string()).collect()) };
    let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
    let t: Vec<String> = serde_json::from_str(&text).map_err(|e| Error::format(p, format!("not a JSON list of strings: {e}")))?;
    if t.is_empty() || t.iter().any(|s| !s.contains("<image>")) {
        return Err(Error::format(p, "every template must hold <image> (where the scene goes), and there must be one"));
    }
    Ok(t)
}

pub fn build(root: &Path, out: &Path, tok: &Tokenizer, o: &BuildOptions, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<BuildReport> {
    let t = templates(o)?;
    let records = super::jsonl(&root.join(format!("CWB_flickr30k_{}.jsonl", o.split)))?;
    let n = records.len().min(o.limit.unwrap_or(usize::MAX)) as u64;
    run(SourceKind::Flickr30k, &records, out, tok, o, &|d| progress(d, n), &|r, rng| make(root, &t, r, rng))
}

#[cfg(test)]
mod tests {
    #[test]
    fn phrases_in_order() {
        assert_eq!(super::phrases("<ph_st>A man<ph_ed> and <ph_st>a dog<ph_ed>."), vec!["A man", "a dog"]);
    }
}
