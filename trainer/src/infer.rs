//! Generation over MM-ID-format benchmarks and their scoring (SPEC §5).
//!
//! Prompts are built as in the original evaluation: the ChatML system prompt, one user turn with the
//! question (its `image_k` placeholders replaced by `<img>PATH</img>`), then `<|im_start|>assistant\n`.
//! Decoding uses the KV cache, greedy or top-p with a seed, and stops at `<|im_end|>` / `<|im_start|>`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::model::{ModelInput, QwenVl};
use idavlm_shards::chat::{encode_conversation, Overflow, Turn};
use idavlm_shards::preprocess::{decode_rgb8, preprocess_image, ResizeOrder};
use idavlm_shards::tokenizer::{Tokenizer, ENDOFTEXT, IM_END, IM_START, NEWLINE};

pub use idavlm_shards::mmid::{read_bench, Item};

#[derive(Clone, Debug)]
pub struct GenOptions {
    pub max_new_tokens: usize,
    /// None: greedy; Some(p): nucleus sampling with top-p p (the original uses 0.3).
    pub top_p: Option<f64>,
    pub seed: i64,
    /// Which Pillow's resize pass order the pixels follow (the one the model was trained with).
    pub resize: ResizeOrder,
}

/// Generates the assistant's answer for one prompt whose images are files under `images_root`.
pub fn generate(
    model: &QwenVl,
    tok: &Tokenizer,
    user: &str,
    images_root: &Path,
    opts: &GenOptions,
) -> Result<(String, Vec<u32>)> {
    let item = Item { id: "prompt".into(), question: user.to_string(), ..Default::default() };
    Ok(generate_batch(model, tok, &[&item], images_root, opts)?.pop().expect("one answer per prompt"))
}

/// Generates the answers of several items at once: prompts left-padded to the longest, padding masked
/// out of attention, each row with its own positions and NTK alpha, so each answer is the one the
/// item gets alone (up to floating-point summation order). Sampling draws the rows in order from one
/// seeded generator.
pub fn generate_batch(
    model: &QwenVl,
    tok: &Tokenizer,
    items: &[&Item],
    images_root: &Path,
    opts: &GenOptions,
) -> Result<Vec<(String, Vec<u32>)>> {
    let size = model.cfg.visual.image_size as usize;
    let device = model.device();
    let mut prompts = Vec::new();
    let mut pixels = Vec::new();
    for item in items {
        let turns = vec![Turn { from: "user".into(), value: item.filled_question() }];
        let enc = encode_conversation(tok, &item.id, &turns, usize::MAX, Overflow::Reject)?;
        let mut ids: Vec<i64> = enc.input_ids.iter().map(|&t| t as i64).collect();
        ids.push(IM_START as i64);
        ids.extend(tok.encode("assistant").iter().map(|&t| t as i64));
        ids.push(NEWLINE as i64);
        for p in &enc.image_paths {
            let bytes = item.image_bytes(p, images_root)?;
            pixels.extend(preprocess_image(&bytes, size, opts.resize, &format!("{p} of item {}", item.id))?);
        }
        prompts.push((ids, enc));
    }
    let b = prompts.len();
    let l = prompts.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0) as i64;
    let pads: Vec<i64> = prompts.iter().map(|(ids, _)| l - ids.len() as i64).collect();
    let mut ids = Vec::with_capacity(b * l as usize);
    let (mut rows, mut starts, mut roles) = (Vec::new(), Vec::new(), Vec::new());
    for (r, (p, enc)) in prompts.iter().enumerate() {
        ids.extend(std::iter::repeat_n(ENDOFTEXT as i64, pads[r] as usize));
        ids.extend(p);
        rows.extend(std::iter::repeat_n(r, enc.image_starts.len()));
        starts.extend(enc.image_starts.iter().map(|&s| s + pads[r] as usize));
        roles.extend(enc.image_roles.iter().copied());
    }
    let n = rows.len() as i64;
    let input = ModelInput {
        input_ids: Tensor::from_slice(&ids).view([b as i64, l]).to_device(device),
        labels: Tensor::full([b as i64, l], -100, (Kind::Int64, device)),
        pixels: Tensor::from_slice(&pixels).view([n, 3, size as i64, size as i64]).to_device(device),
        image_groups: rows.clone(),
        image_rows: rows,
        image_starts: starts,
        image_roles: roles,
        seq_lens: vec![],
        supervised: None,
    };
    let alphas: Vec<f64> = pads.iter().map(|&p| model.ntk_alpha(l - p)).collect();
    // Which key positions are real tokens; None when no row is padded.
    let mut keys = pads.iter().any(|&p| p > 0).then(|| {
        let real: Vec<bool> = pads.iter().flat_map(|&p| (0..l).map(move |j| j >= p)).collect();
        Tensor::from_slice(&real).view([b as i64, l]).to_device(device)
    });
    tch::manual_seed(opts.seed);
    let out = tch::no_grad(|| -> Vec<Vec<u32>> {
        let mut caches: Vec<_> = (0..model.cfg.num_hidden_layers).map(|_| None).collect();
        let x = model.stem.forward(&input);
        let first: Vec<i64> = pads.iter().map(|&p| -p).collect();
        let mut logits =
            model.decode_step(x, &model.rope_rows(&first, l, &alphas, keys.as_ref().map(Tensor::shallow_clone)), &mut caches);
        let mut out = vec![Vec::new(); b];
        let mut done = vec![false; b];
        let mut pos: Vec<i64> = pads.iter().map(|&p| l - p).collect();
        for _ in 0..opts.max_new_tokens {
            let last = logits.select(1, logits.size()[1] - 1).to_kind(Kind::Float);
            let greedy: Vec<i64> = match opts.top_p {
                None => Vec::try_from(last.argmax(-1, false).to_device(Device::Cpu)).expect("argmax"),
                Some(_) => Vec::new(),
            };
            let mut feed = vec![ENDOFTEXT as i64; b];
            for r in 0..b {
                if done[r] {
                    continue;
                }
                let next = match opts.top_p {
                    None => greedy[r],
                    Some(p) => sample_top_p(&last.get(r as i64), p),
                } as u32;
                if next == IM_END || next == IM_START {
                    done[r] = true;
                } else {
                    out[r].push(next);
                    feed[r] = next as i64;
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
            let t = Tensor::from_slice(&feed).view([b as i64, 1]).to_device(device);
            let x = model.stem.embed(&t, None, &[], &[]);
            keys = keys.take().map(|k| Tensor::cat(&[k, Tensor::ones([b as i64, 1], (Kind::Bool, device))], 1));
            logits =
                model.decode_step(x, &model.rope_rows(&pos, 1, &alphas, keys.as_ref().map(Tensor::shallow_clone)), &mut caches);
            pos.iter_mut().for_each(|p| *p += 1);
        }
        out
    });
    Ok(out.into_iter().map(|ids| (tok.decode(&ids), ids)).collect())
}

fn sample_top_p(logits: &Tensor, p: f64) -> i64 {
    let probs = logits.softmax(0, Kind::Float);
    let (sorted, idx) = probs.sort(0, true);
    let cum = sorted.cumsum(0, Kind::Float);
    // Keep the smallest prefix whose mass reaches p (at least one token).
    let keep = cum.lt(p).sum(Kind::Int64).int64_value(&[]) + 1;
    let kept = sorted.narrow(0, 0, keep);
    let choice = kept.multinomial(1, false).int64_value(&[0]);
    idx.int64_value(&[choice])
}

/// Matching: the first of "1/first", "2/second", "3/third", "4/fourth" found in the text.
pub fn matching_choice(text: &str) -> Option<usize> {
    let t = text.to_lowercase();
    [("1", "first"), ("2", "second"), ("3", "third"), ("4", "fourth")]
        .iter()
        .position(|(d, w)| t.contains(d) || t.contains(w))
        .map(|i| i + 1)
}

/// `<box>(x1,y1),(x2,y2)</box>` in 0..1000 coordinates.
pub fn parse_box(text: &str) -> Option<[f64; 4]> {
    let s = text.find("<box>")? + 5;
    let e = text[s..].find("</box>")? + s;
    let nums: Vec<f64> = text[s..e]
        .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
        .filter(|x| !x.is_empty())
        .map(|x| x.parse::<f64>())
        .collect::<std::result::Result<_, _>>()
        .ok()?;
    (nums.len() == 4).then(|| [nums[0], nums[1], nums[2], nums[3]])
}

/// "[x1, y1, x2, y2]" in pixels.
pub fn parse_pixel_box(text: &str) -> Option<[f64; 4]> {
    let nums: Vec<f64> = text
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(|x| x.trim().parse::<f64>())
        .collect::<std::result::Result<_, _>>()
        .ok()?;
    (nums.len() == 4).then(|| [nums[0], nums[1], nums[2], nums[3]])
}

pub fn iou(a: [f64; 4], b: [f64; 4]) -> f64 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |r: [f64; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union <= 0.0 {
        0.0
    } else {
        inter / union
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Prediction {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub question: String,
    pub answer: String,
    pub prediction: String,
    /// matching: 1.0 / 0.0; location: IoU; None for externally judged types.
    pub score: Option<f64>,
    pub unparsable: bool,
    /// Why the item itself cannot be scored (an empty reference answer): an invalid benchmark item,
    /// not a model error; left out of the type's accuracy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid: Option<String>,
}

/// Scores one prediction. `test_image_size` gives the location item's test image (w, h).
pub fn score(item: &Item, prediction: &str, test_image_size: Option<(usize, usize)>) -> (Option<f64>, bool) {
    match item.kind.as_str() {
        "matching" => {
            let gt = matching_choice(&item.answer);
            match matching_choice(prediction) {
                Some(k) => (Some((Some(k) == gt) as i32 as f64), false),
                None => (Some(0.0), true),
            }
        }
        "location" => {
            let gt = parse_pixel_box(&item.answer);
            match (parse_box(prediction), gt, test_image_size) {
                (Some(b), Some(g), Some((w, h))) => {
                    let px =
                        [b[0] * w as f64 / 1000.0, b[1] * h as f64 / 1000.0, b[2] * w as f64 / 1000.0, b[3] * h as f64 / 1000.0];
                    (Some(iou(px, g)), false)
                }
                _ => (Some(0.0), true),
            }
        }
        _ => (None, false),
    }
}

#[derive(Debug, Default, Serialize)]
pub struct TypeSummary {
    pub items: usize,
    pub unparsable: usize,
    /// Benchmark items that cannot be scored (not counted in the accuracy).
    pub invalid: usize,
    /// matching accuracy, or location accuracy at IoU > 0.5.
    pub accuracy: Option<f64>,
    pub mean_iou: Option<f64>,
    /// How many different answers the model gave to the scored items (whitespace-trimmed): 1 means it
    /// answered every item alike, whatever the accuracy says.
    pub distinct_predictions: usize,
    /// matching: the accuracy of always giving the benchmark's most frequent answer, the floor a model
    /// that ignores its images reaches on this item set (0.25 only when the answers are balanced).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub constant_answer_accuracy: Option<f64>,
}

pub fn summarise(preds: &[Prediction]) -> std::collections::BTreeMap<String, TypeSummary> {
    let mut out: std::collections::BTreeMap<String, TypeSummary> = Default::default();
    for p in preds {
        let s = out.entry(p.kind.clone()).or_default();
        s.items += 1;
        s.unparsable += p.unparsable as usize;
        s.invalid += p.invalid.is_some() as usize;
    }
    for (k, s) in out.iter_mut() {
        let scored: Vec<&Prediction> =
            preds.iter().filter(|p| &p.kind == k && p.invalid.is_none() && p.score.is_some()).collect();
        if scored.is_empty() {
            continue;
        }
        let scores: Vec<f64> = scored.iter().filter_map(|p| p.score).collect();
        let n = scores.len() as f64;
        s.distinct_predictions = scored.iter().map(|p| p.prediction.trim()).collect::<std::collections::BTreeSet<_>>().len();
        if k == "matching" {
            let mut counts: std::collections::BTreeMap<Option<usize>, usize> = Default::default();
            for p in &scored {
                *counts.entry(matching_choice(&p.answer)).or_default() += 1;
            }
            s.constant_answer_accuracy = counts.iter().filter(|(c, _)| c.is_some()).map(|(_, &m)| m as f64 / n).reduce(f64::max);
        }
        if k == "location" {
            s.accuracy = Some(scores.iter().filter(|&&x| x > 0.5).count() as f64 / n);
            s.mean_iou = Some(scores.iter().sum::<f64>() / n);
        } else {
            s.accuracy = Some(scores.iter().sum::<f64>() / n);
        }
    }
    out
}

/// The size of a location item's test image (the last image of the item).
pub fn test_image_size(item: &Item, root: &Path) -> Option<(usize, usize)> {
    let p = item.image_paths().ok()?.pop()?;
    let bytes = item.image_bytes(&p, root).ok()?;
    decode_rgb8(&bytes, &p).ok().map(|(_, w, h)| (w, h))
}

pub use crate::plan::model_dir;

pub fn device_default() -> Device {
    crate::runtime::device_for(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_keywords() {
        assert_eq!(matching_choice("Image 3"), Some(3));
        assert_eq!(matching_choice("The second one."), Some(2));
        assert_eq!(matching_choice("fourth"), Some(4));
        // The first rule that matches wins, in the order 1, 2, 3, 4.
        assert_eq!(matching_choice("Image 4, not the first"), Some(1));
        assert_eq!(matching_choice("no idea"), None);
    }

    #[test]
    fn boxes_and_iou() {
        assert_eq!(parse_box("<ref>Bob</ref><box>(10,20),(300,400)</box>"), Some([10.0, 20.0, 300.0, 400.0]));
        assert_eq!(parse_box("<box>(10,20),(300)</box>"), None);
        assert_eq!(parse_box("(10,20),(30,40)"), None);
        assert_eq!(parse_pixel_box("[1, 2, 3, 4]"), Some([1.0, 2.0, 3.0, 4.0]));
        assert_eq!(iou([0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]), 1.0);
        assert_eq!(iou([0.0, 0.0, 10.0, 10.0], [10.0, 10.0, 20.0, 20.0]), 0.0);
        assert!((iou([0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0]) - 1.0 / 3.0).abs() < 1e-12);
        let item = Item {
            id: "l".into(),
            kind: "location".into(),
            question: String::new(),
            answer: "[0, 0, 100, 50]".into(),
            ..Default::default()
        };
        // 0..1000 coordinates scale to the test image's pixels (200 x 100).
        let (s, bad) = score(&item, "<box>(0,0),(500,500)</box>", Some((200, 100)));
        assert_eq!((s, bad), (Some(1.0), false));
        let (s, bad) = score(&item, "garbage", Some((200, 100)));
        assert_eq!((s, bad), (Some(0.0), true));
    }

    #[test]
    fn summary_counts_distinct_answers_and_the_constant_answer_floor() {
        let pred = |id: &str, answer: &str, prediction: &str| {
            let score = (matching_choice(answer) == matching_choice(prediction)) as i32 as f64;
            Prediction {
                id: id.into(),
                kind: "matching".into(),
                question: String::new(),
                answer: answer.into(),
                prediction: prediction.into(),
                score: Some(score),
                unparsable: false,
                invalid: None,
            }
        };
        // A model that always says "Image 2" on items whose answers are 2, 2, 2, 1, 4.
        let preds: Vec<Prediction> = ["Image 2", "Image 2", "Image 2", "Image 1", "Image 4"]
            .iter()
            .enumerate()
            .map(|(i, a)| pred(&format!("m{i}"), a, " Image 2"))
            .collect();
        let s = &summarise(&preds)["matching"];
        assert_eq!(s.accuracy, Some(0.6));
        assert_eq!(s.distinct_predictions, 1);
        assert_eq!(s.constant_answer_accuracy, Some(0.6));
        let mut varied = preds.clone();
        varied[3] = pred("m3", "Image 1", "Image 1");
        let s = &summarise(&varied)["matching"];
        assert_eq!((s.accuracy, s.distinct_predictions), (Some(0.8), 2));
    }
}
