//! The Qwen3-VL chat template over IDA-VLM's tuning JSON (SPEC-QWEN3VL.md §4, §14.2): ChatML turns
//! without a default system prompt, each `<img>PATH</img>` as `<|vision_start|>`, one `<|image_pad|>`
//! per merged visual token of that image's smart_resize grid, `<|vision_end|>`; labels on the
//! assistant content, its `<|im_end|>` and the `\n` after it. Grounding answers in Qwen3-VL's own form
//! ([`rewrite_boxes`]).

use super::image::smart_resize;
use super::positions::Grid;
use super::{IMAGE_PAD, IM_END, IM_START, VISION_END, VISION_START};
use crate::chat::{clip, image_roles, split_images, Encoded, Overflow, Turn, IGNORE_INDEX};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// The pixel budget images are resized into (the recipe's `data.min_pixels` / `max_pixels`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pixels {
    pub min: usize,
    pub max: usize,
}

impl Default for Pixels {
    fn default() -> Self {
        Self { min: super::image::MIN_PIXELS, max: super::image::MAX_PIXELS }
    }
}

impl Pixels {
    /// The patch grid of a `width` x `height` image.
    pub fn grid(&self, width: usize, height: usize) -> std::result::Result<Grid, String> {
        let (h, w) = smart_resize(height, width, self.min, self.max)?;
        let p = super::image::PATCH as i64;
        Ok(Grid { t: 1, h: h as i64 / p, w: w as i64 / p })
    }
}

/// Encodes a conversation; `dims` are the (width, height) of its images in order of appearance.
pub fn encode_conversation(
    tok: &Tokenizer,
    id: &str,
    turns: &[Turn],
    dims: &[(usize, usize)],
    pixels: Pixels,
    max_len: usize,
    overflow: Overflow,
) -> Result<Encoded> {
    let nl = tok.encode_ordinary("\n");
    let (mut ids, mut labels, mut starts, mut paths, mut grids) = (vec![], vec![], vec![], vec![], vec![]);
    let mut spans = Vec::new();
    let mut first_answer = None;
    if turns.is_empty() {
        return Err(Error::sample(id, "no turns"));
    }
    for (j, turn) in turns.iter().enumerate() {
        let role = match turn.from.as_str() {
            "system" if j == 0 => "system",
            "user" | "human" => "user",
            "assistant" | "gpt" => "assistant",
            other => return Err(Error::sample(id, format!("turn {j}: unknown role {other:?}"))),
        };
        let offset = usize::from(turns[0].from == "system");
        if role != "system" {
            let expected = if (j - offset) % 2 == 0 { "user" } else { "assistant" };
            if role != expected {
                return Err(Error::sample(id, format!("turn {j}: expected a {expected} turn, found {role}")));
            }
        }
        // Text between special tokens is tokenised as one string, as the tokenizer does over the
        // rendered template: the header "role\n" runs into the content up to the first image.
        let head = ids.len();
        ids.push(IM_START);
        let mut text = format!("{role}\n");
        for piece in split_images(id, &turn.value)? {
            match piece {
                Ok(t) => text.push_str(&t),
                Err(path) => {
                    ids.extend(tok.encode_ordinary(&std::mem::take(&mut text)));
                    let k = paths.len();
                    let &(w, h) = dims
                        .get(k)
                        .ok_or_else(|| Error::sample(id, format!("image {k} ({path:?}) has no stored image")))?;
                    let g = pixels.grid(w, h).map_err(|e| Error::sample(id, format!("image {k} ({path:?}): {e}")))?;
                    starts.push(ids.len());
                    ids.push(VISION_START);
                    ids.extend(std::iter::repeat_n(IMAGE_PAD, g.tokens(2)));
                    ids.push(VISION_END);
                    spans.push((starts[k], ids.len()));
                    paths.push(path);
                    grids.push(g);
                }
            }
        }
        ids.extend(tok.encode_ordinary(&text));
        // The answer starts two tokens after <|im_start|> ("assistant", "\n"), the fine-tuning code's rule.
        let content = (head + 3).min(ids.len());
        ids.push(IM_END);
        ids.extend(&nl);
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, content - head));
        if role == "assistant" {
            first_answer.get_or_insert(content);
            labels.extend(ids[content..].iter().map(|&t| t as i64));
        } else {
            labels.extend(std::iter::repeat_n(IGNORE_INDEX, ids.len() - content));
        }
    }
    let mut truncated = false;
    if ids.len() > max_len {
        let inside = spans.iter().any(|&(s, e)| s < max_len && max_len < e);
        if overflow == Overflow::Reject || inside {
            return Err(Error::sample(
                id,
                format!(
                    "{} tokens exceed max length {max_len}{}",
                    ids.len(),
                    if inside { " and the cut would fall inside an image span" } else { "" }
                ),
            ));
        }
        if let Some(first) = first_answer.filter(|&a| a >= max_len) {
            return Err(Error::sample(
                id,
                format!("{} tokens cut to max length {max_len} leave no answer token (the first answer starts at token {first})", ids.len()),
            ));
        }
        ids.truncate(max_len);
        labels.truncate(max_len);
        let kept = spans.iter().filter(|&&(_, e)| e <= max_len).count();
        starts.truncate(kept);
        paths.truncate(kept);
        grids.truncate(kept);
        truncated = true;
    }
    let roles = image_roles(&ids, &starts);
    Ok(Encoded { input_ids: ids, labels, image_starts: starts, image_paths: paths, image_roles: roles, truncated, image_grids: grids })
}

/// One `<ref>label</ref><box>(x1,y1),(x2,y2)</box>` (or a bare `<box>`) of an answer.
struct BoxRef {
    start: usize,
    end: usize,
    label: Option<String>,
    coords: [i64; 4],
}

fn parse_boxes(text: &str) -> std::result::Result<Vec<BoxRef>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(b) = text[at..].find("<box>").map(|i| at + i) {
        let close = text[b..].find("</box>").map(|i| b + i).ok_or_else(|| format!("<box> without </box> in {:?}", clip(text)))?;
        let inner = &text[b + 5..close];
        let nums: Vec<i64> = inner
            .split(|c: char| !c.is_ascii_digit() && c != '-')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<i64>().map_err(|_| format!("box {inner:?} is not four integers")))
            .collect::<std::result::Result<_, _>>()?;
        let coords: [i64; 4] = nums.try_into().map_err(|_| format!("box {inner:?} is not four integers"))?;
        // A <ref>label</ref> right before the box is its label.
        let (start, label) = match text[..b].strip_suffix("</ref>").and_then(|head| head.rfind("<ref>").map(|r| (r, head))) {
            Some((r, head)) if r >= at => (r, Some(head[r + 5..].to_string())),
            _ => (b, None),
        };
        out.push(BoxRef { start, end: close + 6, label, coords });
        at = close + 6;
    }
    Ok(out)
}

fn box_json(b: &BoxRef) -> String {
    let [x1, y1, x2, y2] = b.coords;
    match &b.label {
        Some(l) => format!("{{\"bbox_2d\": [{x1}, {y1}, {x2}, {y2}], \"label\": {}}}", serde_json::to_string(l).expect("a string")),
        None => format!("{{\"bbox_2d\": [{x1}, {y1}, {x2}, {y2}]}}"),
    }
}

/// Rewrites Qwen-VL grounding in an answer into Qwen3-VL's (§14.2, §6): an answer made of boxes alone
/// (with separators such as `, ` or ` and `) becomes one JSON list in a ```json fence; boxes inside
/// other text become their JSON objects in place. The 0-1000 relative numbers are kept. Text without
/// boxes is returned as it is.
pub fn rewrite_boxes(text: &str) -> std::result::Result<String, String> {
    let boxes = parse_boxes(text)?;
    if boxes.is_empty() {
        return Ok(text.to_string());
    }
    let mut rest = String::new();
    let mut at = 0;
    for b in &boxes {
        rest.push_str(&text[at..b.start]);
        at = b.end;
    }
    rest.push_str(&text[at..]);
    let only_boxes = rest.split(|c: char| c.is_whitespace() || ",.;".contains(c)).all(|w| w.is_empty() || w == "and");
    if only_boxes {
        let items: Vec<String> = boxes.iter().map(box_json).collect();
        return Ok(format!("```json\n[{}]\n```", items.join(", ")));
    }
    let mut out = String::new();
    let mut at = 0;
    for b in &boxes {
        out.push_str(&text[at..b.start]);
        out.push_str(&box_json(b));
        at = b.end;
    }
    out.push_str(&text[at..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_answers_take_qwen3vls_json_form() {
        assert_eq!(
            rewrite_boxes("<ref>Alice</ref><box>(12,340),(560,999)</box>").unwrap(),
            "```json\n[{\"bbox_2d\": [12, 340, 560, 999], \"label\": \"Alice\"}]\n```"
        );
        assert_eq!(
            rewrite_boxes("<ref>A</ref><box>(1,2),(3,4)</box> and <ref>B \"b\"</ref><box>(5,6),(7,8)</box>.").unwrap(),
            "```json\n[{\"bbox_2d\": [1, 2, 3, 4], \"label\": \"A\"}, {\"bbox_2d\": [5, 6, 7, 8], \"label\": \"B \\\"b\\\"\"}]\n```"
        );
        assert_eq!(
            rewrite_boxes("Alice stands at <ref>Alice</ref><box>(1,2),(3,4)</box> by the door.").unwrap(),
            "Alice stands at {\"bbox_2d\": [1, 2, 3, 4], \"label\": \"Alice\"} by the door."
        );
        assert_eq!(rewrite_boxes("no boxes here").unwrap(), "no boxes here");
        assert!(rewrite_boxes("<box>(1,2),(3)</box>").unwrap_err().contains("four integers"));
    }
}
