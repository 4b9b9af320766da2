//! The rule-based scores of MM-ID (SPEC §5): matching by keyword, location by IoU of the `<box>`
//! rescaled to the test image; the prediction lines `idavlm-infer` writes, and their per-type summary.
//! QA and caption items are scored by an LLM judge ([`super::judge`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Item;
use crate::preprocess::decode_rgb8;

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
