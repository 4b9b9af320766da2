//! RefCOCO, RefCOCO+ and RefCOCOg from the refer annotations (`ROOT/<dataset>/refs(unc).p` (or
//! `refs(umd).p`, `refs(google).p`), `ROOT/<dataset>/instances.json`) and the COCO images
//! (`ROOT/images/mscoco/images/train2014/` as refer lays them out, or `ROOT/train2014/`), as
//! ref_trans.py turns them into grounding conversations:
//!
//! - each referred object once (a ref's `file_name` seen before, in this dataset or an earlier one, is
//!   skipped as a duplicate), of the splits asked for (`--split train` or `--split train,val`);
//! - the object's box cropped (flipped at random) as Picture 1, the whole image as Picture 2:
//!   `Picture 1: <img>crop</img>\nPicture 2:<img>image</img>\nIdentify the Picture 1 instance in the
//!   Picture 2 with grounding:` -> `<ref>Picture 1</ref><box>(x1,y1),(x2,y2)</box>` in 0..1000
//!   (`int(1000 * x / width)`).
//!
//! The datasets present under ROOT are read in the order refcoco, refcoco+, refcocog.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::{coin, malformed, rel, run, thousandths, BuildOptions, BuildReport, Outcome, Record, Rgb, SourceKind};
use crate::chat::Turn;
use crate::error::{Error, Result};
use crate::format::ImageBlob;
use crate::tokenizer::Tokenizer;

pub const DATASETS: [&str; 3] = ["refcoco", "refcoco+", "refcocog"];

/// One referred object.
pub struct Ref {
    /// The image's file under the COCO folder, its size, and the object's box [x, y, w, h].
    image: String,
    width: f64,
    height: f64,
    bbox: [f64; 4],
    /// The ref's own `file_name` (what the original deduplicates on).
    ref_file: String,
    dataset: &'static str,
}

/// A pickled dict's value by key (str keys, Python 2 or 3).
fn get<'a>(d: &'a serde_pickle::Value, key: &str) -> Option<&'a serde_pickle::Value> {
    let serde_pickle::Value::Dict(m) = d else { return None };
    m.iter().find_map(|(k, v)| match k {
        serde_pickle::HashableValue::String(s) if s == key => Some(v),
        serde_pickle::HashableValue::Bytes(b) if b == key.as_bytes() => Some(v),
        _ => None,
    })
}

fn as_string(v: &serde_pickle::Value) -> Option<String> {
    match v {
        serde_pickle::Value::String(s) => Some(s.clone()),
        serde_pickle::Value::Bytes(b) => String::from_utf8(b.clone()).ok(),
        _ => None,
    }
}

fn as_i64(v: &serde_pickle::Value) -> Option<i64> {
    match v {
        serde_pickle::Value::I64(n) => Some(*n),
        serde_pickle::Value::Int(n) => n.to_string().parse().ok(),
        _ => None,
    }
}

/// The refs file of a dataset folder: `refs(unc).p`, else `refs(umd).p`, else `refs(google).p`.
fn refs_file(dir: &Path) -> Option<PathBuf> {
    ["refs(unc).p", "refs(umd).p", "refs(google).p"].iter().map(|f| dir.join(f)).find(|p| p.is_file())
}

/// The refs of one dataset (of the splits asked for), with their images' sizes and boxes.
fn read_dataset(dir: &Path, dataset: &'static str, splits: &[&str]) -> Result<Vec<Record<Ref>>> {
    let refs_path = refs_file(dir).ok_or_else(|| Error::format(dir, "no refs(unc).p, refs(umd).p or refs(google).p"))?;
    let inst_path = dir.join("instances.json");
    let bytes = super::read(&refs_path)?;
    let refs = serde_pickle::value_from_slice(&bytes, serde_pickle::DeOptions::new().decode_strings())
        .map_err(|e| Error::format(&refs_path, format!("not a pickle of refer's refs: {e}")))?;
    let serde_pickle::Value::List(refs) = refs else { return Err(Error::format(&refs_path, "expected a pickled list of refs")) };
    let inst: Value = serde_json::from_slice(&super::read(&inst_path)?)
        .map_err(|e| Error::format(&inst_path, format!("not JSON: {e}")))?;
    let mut images: HashMap<i64, (String, f64, f64)> = HashMap::new();
    for (i, im) in inst.get("images").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let (Some(id), Some(f), Some(w), Some(h)) = (
            im.get("id").and_then(Value::as_i64),
            im.get("file_name").and_then(Value::as_str),
            im.get("width").and_then(Value::as_f64),
            im.get("height").and_then(Value::as_f64),
        ) else {
            return Err(Error::format(&inst_path, format!("images[{i}]: needs id, file_name, width and height")));
        };
        images.insert(id, (f.to_string(), w, h));
    }
    let mut anns: HashMap<i64, [f64; 4]> = HashMap::new();
    for (i, a) in inst.get("annotations").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let bbox: Option<Vec<f64>> = a.get("bbox").and_then(Value::as_array).map(|b| b.iter().filter_map(Value::as_f64).collect());
        let (Some(id), Some(b)) = (a.get("id").and_then(Value::as_i64), bbox.filter(|b| b.len() == 4)) else {
            return Err(Error::format(&inst_path, format!("annotations[{i}]: needs id and bbox [x, y, w, h]")));
        };
        anns.insert(id, [b[0], b[1], b[2], b[3]]);
    }
    let mut out = Vec::new();
    for (i, r) in refs.iter().enumerate() {
        let line = i + 1;
        let (Some(split), Some(ref_file), Some(image_id), Some(ann_id)) = (
            get(r, "split").and_then(as_string),
            get(r, "file_name").and_then(as_string),
            get(r, "image_id").and_then(as_i64),
            get(r, "ann_id").and_then(as_i64),
        ) else {
            return malformed(&refs_path, line, "a ref needs split, file_name, image_id and ann_id (record number counted from 1)");
        };
        if !splits.contains(&split.as_str()) {
            continue;
        }
        let Some((image, width, height)) = images.get(&image_id).cloned() else {
            return malformed(&refs_path, line, format!("image_id {image_id} is not in {}", inst_path.display()));
        };
        let Some(&bbox) = anns.get(&ann_id) else {
            return malformed(&refs_path, line, format!("ann_id {ann_id} is not in {}", inst_path.display()));
        };
        out.push(Record { file: refs_path.clone(), line, value: Ref { image, width, height, bbox, ref_file, dataset } });
    }
    Ok(out)
}

/// Where the COCO images are: refer's layout, or a train2014 folder at the root.
fn coco_dir(root: &Path) -> PathBuf {
    let refer = root.join("images/mscoco/images/train2014");
    if refer.is_dir() {
        refer
    } else {
        root.join("train2014")
    }
}

fn make(root: &Path, coco: &Path, o: &BuildOptions, r: &Record<Ref>, rng: &mut ChaCha8Rng) -> Result<Outcome> {
    let v = &r.value;
    let img_path = coco.join(&v.image);
    let Ok(bytes) = std::fs::read(&img_path) else { return Ok(Outcome::skip("missing image")) };
    let image_rel = rel(root, &img_path);
    let Ok(px) = Rgb::decode(&bytes, &image_rel) else { return Ok(Outcome::skip("image does not decode")) };
    let b = [v.bbox[0], v.bbox[1], v.bbox[0] + v.bbox[2], v.bbox[1] + v.bbox[3]];
    let flip = coin(rng);
    let stem = v.ref_file.strip_suffix(".jpg").unwrap_or(&v.ref_file);
    let crop_path = format!("refcoco-crops/{stem}_crop.png");
    let bx = thousandths(b, v.width, v.height);
    let user = format!(
        "Picture 1: <img>{crop_path}</img>\nPicture 2:<img>{image_rel}</img>\nIdentify the Picture 1 instance in the Picture 2 with grounding:"
    );
    let turns =
        vec![Turn { from: "user".into(), value: user }, Turn { from: "assistant".into(), value: o.template.box_answer("Picture 1", bx) }];
    let images = vec![ImageBlob { bytes: px.crop_png(b, flip), path: crop_path }, ImageBlob { bytes, path: image_rel }];
    Ok(Outcome::one(turns, images, json!({"flip": flip, "dataset": v.dataset, "ref_file": v.ref_file})))
}

pub fn build(root: &Path, out: &Path, tok: &Tokenizer, o: &BuildOptions, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<BuildReport> {
    let splits: Vec<&str> = o.split.split(',').map(str::trim).collect();
    let mut records = Vec::new();
    let mut seen = HashSet::new();
    let mut duplicates = 0u64;
    for d in DATASETS {
        let dir = root.join(d);
        if !dir.is_dir() {
            continue;
        }
        for r in read_dataset(&dir, d, &splits)? {
            if seen.insert(r.value.ref_file.clone()) {
                records.push(r);
            } else {
                duplicates += 1;
            }
        }
    }
    if records.is_empty() && duplicates == 0 {
        return Err(Error::format(root, format!("no refs of split {:?} under refcoco/, refcoco+/ or refcocog/", o.split)));
    }
    let coco = coco_dir(root);
    let n = records.len().min(o.limit.unwrap_or(usize::MAX)) as u64;
    let mut report = run(SourceKind::Refcoco, &records, out, tok, o, &|d| progress(d, n), &|r, rng| make(root, &coco, o, r, rng))?;
    if duplicates > 0 {
        report.records += duplicates;
        report.skipped.insert("object already referred (another ref or dataset)".into(), duplicates);
    }
    Ok(report)
}
