//! MovieNet's location task as movienet/trans_loc.py builds it, from the release's own files:
//! `ROOT/files/annotation/<movie>.json` (`cast`: `pid`, `shot_idx`, `img_idx`, `body.bbox`, `resolution`),
//! `ROOT/files/meta/<movie>.json` (`cast`: `id`, `character`; `files/meta_new/` is read when present, as
//! the original did), the 240P key frames `ROOT/240P/<movie>/shot_NNNN_img_K.jpg`, and the list of movies
//! (`ROOT/<split>_split.txt`, or `--split-file`).
//!
//! For each named character: the frames where they are alone and their body covers over 40% of the
//! frame are references; walking the character's frames in order from the first reference, the last
//! reference seen is paired with each later frame where they appear with others and cover over 15%, unless
//! that reference was the last pair's too and the frame is within 3 shots of the last pair's. Each pair
//! is `NAME is <img>reference</img>\nIn the image: <img>frame</img>\nIdentify NAME with grounding.` ->
//! `<ref>NAME</ref><box>(x1,y1),(x2,y2)</box>` (0..1000 of the frame's resolution). No randomness.
//!
//! The stage-2 QA and caption data were annotated by GPT-4V and are released as JSON with their image
//! archive: `idavlm-shards convert beta_gpt4v_mix_mini_new.json OUT --images imgs/` reads them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::{malformed, rel, run, thousandths, BuildOptions, BuildReport, Outcome, Record, SourceKind};
use crate::chat::Turn;
use crate::error::{Error, Result};
use crate::format::ImageBlob;
use crate::tokenizer::Tokenizer;

/// A frame as `shot-img`.
type Frame = (u32, u32);

struct Movie {
    id: String,
    /// (person id, character name) in the meta file's order.
    names: Vec<(String, String)>,
    /// Per person id, its frames in annotation order (not "others").
    frames_of: Vec<(String, Vec<Frame>)>,
    /// Per frame, the boxes of the people in it, and its resolution.
    people_in: HashMap<Frame, Vec<(String, [f64; 4])>>,
    size: HashMap<Frame, (f64, f64)>,
}

fn read_movie(root: &Path, id: &str, list: &Path, line: usize) -> Result<Movie> {
    let ann_path = root.join("files/annotation").join(format!("{id}.json"));
    let meta_new = root.join("files/meta_new").join(format!("{id}.json"));
    let meta_path = if meta_new.is_file() { meta_new } else { root.join("files/meta").join(format!("{id}.json")) };
    let load = |p: &Path| -> Result<Value> {
        let b = std::fs::read(p).map_err(|e| Error::format(list, format!("line {line}: movie {id}: {}: {e}", p.display())))?;
        serde_json::from_slice(&b).map_err(|e| Error::format(p, format!("not JSON: {e}")))
    };
    let (ann, meta) = (load(&ann_path)?, load(&meta_path)?);
    let mut names = Vec::new();
    for (i, c) in meta.get("cast").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let (Some(pid), Some(ch)) = (c.get("id").and_then(Value::as_str), c.get("character").and_then(Value::as_str)) else {
            return malformed(&meta_path, 1, format!("cast[{i}] needs string id and character"));
        };
        names.push((pid.to_string(), ch.to_string()));
    }
    let mut frames_of: Vec<(String, Vec<Frame>)> = Vec::new();
    let mut people_in: HashMap<Frame, Vec<(String, [f64; 4])>> = HashMap::new();
    let mut size = HashMap::new();
    let Some(cast) = ann.get("cast").and_then(Value::as_array) else { return malformed(&ann_path, 1, "no \"cast\" list") };
    for (i, c) in cast.iter().enumerate() {
        let pid = c.get("pid").and_then(Value::as_str);
        let shot = c.get("shot_idx").and_then(Value::as_u64);
        let img = c.get("img_idx").and_then(Value::as_u64);
        let bbox: Option<Vec<f64>> =
            c.get("body").and_then(|b| b.get("bbox")).and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_f64).collect());
        let res: Option<Vec<f64>> = c.get("resolution").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_f64).collect());
        let (Some(pid), Some(shot), Some(img), Some(b), Some(r)) =
            (pid, shot, img, bbox.filter(|b| b.len() == 4), res.filter(|r| r.len() == 2))
        else {
            return malformed(&ann_path, 1, format!("cast[{i}] needs pid, shot_idx, img_idx, body.bbox [4] and resolution [w, h]"));
        };
        let f = (shot as u32, img as u32);
        if pid != "others" {
            match frames_of.iter_mut().find(|(p, _)| p == pid) {
                Some((_, v)) => v.push(f),
                None => frames_of.push((pid.to_string(), vec![f])),
            }
        }
        let e = people_in.entry(f).or_default();
        match e.iter_mut().find(|(p, _)| p == pid) {
            Some(kv) => kv.1 = [b[0], b[1], b[2], b[3]],
            None => e.push((pid.to_string(), [b[0], b[1], b[2], b[3]])),
        }
        size.insert(f, (r[0], r[1]));
    }
    Ok(Movie { id: id.to_string(), names, frames_of, people_in, size })
}

fn area(b: [f64; 4]) -> f64 {
    (b[2] - b[0]) * (b[3] - b[1])
}

/// The (reference, frame) pairs of one character, by the original's walk.
fn pairs_of(m: &Movie, pid: &str) -> Vec<(Frame, Frame)> {
    let Some((_, frames)) = m.frames_of.iter().find(|(p, _)| p == pid) else { return vec![] };
    let cover = |f: Frame| {
        let (w, h) = m.size[&f];
        let b = m.people_in[&f].iter().find(|(p, _)| p == pid).map(|(_, b)| *b).expect("the person is in the frame");
        area(b) / (w * h)
    };
    let refs: Vec<Frame> = frames.iter().copied().filter(|&f| m.people_in[&f].len() == 1 && cover(f) > 0.4).collect();
    let Some(&first) = refs.first() else { return vec![] };
    let mut i = frames.iter().position(|&f| f == first).expect("a reference is one of the frames");
    let mut out: Vec<(Frame, Frame)> = Vec::new();
    for j in i + 1..frames.len() {
        let f = frames[j];
        if refs.contains(&f) {
            i = j;
        } else if m.people_in[&f].len() > 1 && cover(f) > 0.15 {
            let keep = match out.last() {
                Some(&(last_ref, last_frame)) => !(frames[i] == last_ref && f.0 as i64 - last_frame.0 as i64 <= 3),
                None => true,
            };
            if keep {
                out.push((frames[i], f));
            }
        }
    }
    out
}

fn frame_path(root: &Path, movie: &str, f: Frame) -> PathBuf {
    root.join("240P").join(movie).join(format!("shot_{:04}_img_{}.jpg", f.0, f.1))
}

fn make(root: &Path, list: &Path, o: &BuildOptions, r: &Record<String>, _rng: &mut ChaCha8Rng) -> Result<Outcome> {
    let m = read_movie(root, &r.value, list, r.line)?;
    let mut out = Outcome::default();
    for (pid, name) in &m.names {
        for (rf, tf) in pairs_of(&m, pid) {
            let (rp, tp) = (frame_path(root, &m.id, rf), frame_path(root, &m.id, tf));
            let (Ok(rb), Ok(tb)) = (std::fs::read(&rp), std::fs::read(&tp)) else {
                out.skipped.push("missing frame");
                continue;
            };
            let (w, h) = m.size[&tf];
            let b = m.people_in[&tf].iter().find(|(p, _)| p == pid).map(|(_, b)| *b).expect("the person is in the frame");
            let (rr, tr) = (rel(root, &rp), rel(root, &tp));
            let user = format!("{name} is <img>{rr}</img>\nIn the image: <img>{tr}</img>\nIdentify {name} with grounding.");
            let answer = o.template.box_answer(name, thousandths(b, w, h));
            out.samples.push(super::Built {
                turns: vec![Turn { from: "user".into(), value: user }, Turn { from: "assistant".into(), value: answer }],
                images: vec![ImageBlob { bytes: rb, path: rr }, ImageBlob { bytes: tb, path: tr }],
                choices: json!({"movie": m.id, "pid": pid, "reference": [rf.0, rf.1], "frame": [tf.0, tf.1]}),
            });
        }
    }
    Ok(out)
}

pub fn build(root: &Path, out: &Path, tok: &Tokenizer, o: &BuildOptions, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<BuildReport> {
    let list = o.split_file.clone().unwrap_or_else(|| root.join(format!("{}_split.txt", o.split)));
    let text = std::fs::read_to_string(&list).map_err(|e| Error::io(&list, e))?;
    let records: Vec<Record<String>> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| Record { file: list.clone(), line: i + 1, value: l.trim().to_string() })
        .collect();
    let n = records.len().min(o.limit.unwrap_or(usize::MAX)) as u64;
    run(SourceKind::Movienet, &records, out, tok, o, &|d| progress(d, n), &|r, rng| make(root, &list, o, r, rng))
}
