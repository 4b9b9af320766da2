//! ChatML assembly and the label mask of the original Qwen-VL fine-tuning (SPEC §2), with image spans.
//!
//! Each `<img>PATH</img>` in a turn becomes `<img>`, 256 x `<imgpad>`, `</img>` (258 positions); the
//! path is returned in order of appearance so the caller can fetch the image's bytes.

use crate::error::{Error, Result};
use crate::tokenizer::*;

pub const IGNORE_INDEX: i64 = -100;
/// The chat template this module writes (Qwen-VL's ChatML with 258-position image spans): the name a
/// dataset records (`index.json`'s `template`) and a model family must match to train on it.
pub const TEMPLATE: &str = "qwen-vl";
pub const SYSTEM_MESSAGE: &str = "You are a helpful assistant.";

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Turn {
    pub from: String,
    pub value: String,
}

/// Role of an image in its row, which decides whether the ID-Former runs on it (SPEC §1.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ImageRole {
    Reference,
    Test,
    General,
}

/// One tokenised sample: ids and labels of equal length, and the start of every image span.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    /// Index of each `<img>` token; the span's 256 body positions follow it.
    pub image_starts: Vec<usize>,
    /// Paths inside `<img>..</img>`, in order of appearance.
    pub image_paths: Vec<String>,
    pub image_roles: Vec<ImageRole>,
    /// True when the sample was cut at max length (outside any image span).
    pub truncated: bool,
    /// Each image's patch grid (Qwen3-VL, whose span length follows the image's size); empty for
    /// Qwen-VL's fixed 256-token spans.
    pub image_grids: Vec<crate::qwen3vl::positions::Grid>,
}

/// What happens to a sample longer than the maximum length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overflow {
    /// Cut at max length when the cut falls outside every image span; otherwise the sample is rejected.
    TruncateOutsideImages,
    /// Reject every sample over max length.
    Reject,
}

/// Splits `text` into plain-text pieces and image paths.
pub(crate) fn split_images(id: &str, text: &str) -> Result<Vec<Result<String, String>>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(s) = rest.find("<img>") {
        out.push(Ok(rest[..s].to_string()));
        let after = &rest[s + 5..];
        let e = after.find("</img>").ok_or_else(|| Error::sample(id, format!("<img> without </img> in {:?}", clip(text))))?;
        let path = &after[..e];
        if path.contains("<img>") {
            return Err(Error::sample(id, format!("nested <img> in {:?}", clip(text))));
        }
        out.push(Err(path.to_string()));
        rest = &after[e + 6..];
    }
    if rest.contains("</img>") {
        return Err(Error::sample(id, format!("</img> without <img> in {:?}", clip(text))));
    }
    out.push(Ok(rest.to_string()));
    Ok(out)
}

/// The paths of a text's `<img>PATH</img>` spans, in order of appearance.
pub fn image_paths_in(id: &str, text: &str) -> Result<Vec<String>> {
    Ok(split_images(id, text)?.into_iter().filter_map(|p| p.err()).collect())
}

/// The file an image path of the text names, confined to `root`: the path is joined to `root` (an
/// absolute path stays as it is) and normalised lexically; a path that leaves `root` (`../x.png`, or an
/// absolute path elsewhere) is refused with a message naming it.
pub fn confined(root: &std::path::Path, path: &str) -> std::result::Result<std::path::PathBuf, String> {
    use std::path::{Component, PathBuf};
    fn normal(p: &std::path::Path) -> Option<PathBuf> {
        let mut out = PathBuf::new();
        for c in p.components() {
            match c {
                Component::CurDir => {}
                Component::ParentDir => {
                    if !out.pop() || out.as_os_str().is_empty() {
                        return None;
                    }
                }
                c => out.push(c),
            }
        }
        Some(out)
    }
    let base = if root.is_absolute() {
        root.to_path_buf()
    } else {
        std::env::current_dir().map_err(|e| format!("current folder: {e}"))?.join(root)
    };
    let base = normal(&base).ok_or_else(|| format!("image root {} is not a folder path", root.display()))?;
    let joined = normal(&base.join(path));
    match joined {
        Some(f) if f.starts_with(&base) && f != base => Ok(f),
        _ => Err(format!("image path {path:?} leaves the image root {} (set the root with --images)", root.display())),
    }
}

pub(crate) fn clip(s: &str) -> String {
    s.chars().take(120).collect()
}

/// Tokenises one turn's text, expanding image spans; returns ids and image paths.
fn encode_text(
    tok: &Tokenizer,
    id: &str,
    text: &str,
    ids: &mut Vec<u32>,
    starts: &mut Vec<usize>,
    paths: &mut Vec<String>,
) -> Result<()> {
    for piece in split_images(id, text)? {
        match piece {
            Ok(t) => ids.extend(tok.encode(&t)),
            Err(path) => {
                starts.push(ids.len());
                paths.push(path);
                ids.push(IMG_START);
                ids.extend(std::iter::repeat_n(IMG_PAD, IMAGE_BODY));
                ids.push(IMG_END);
            }
        }
    }
    Ok(())
}

/// Roles of a row's images: reference when the token two before `<img>` is " is"; test when the row's
/// first image is a reference and this one is not; general otherwise.
pub fn image_roles(input_ids: &[u32], image_starts: &[usize]) -> Vec<ImageRole> {
    let is_ref: Vec<bool> = image_starts.iter().map(|&s| s >= 2 && input_ids[s - 2] == IS_TOKEN).collect();
    let first_is_ref = is_ref.first().copied().unwrap_or(false);
    is_ref
        .iter()
        .map(|&r| match (r, first_is_ref) {
            (true, _) => ImageRole::Reference,
            (false, true) => ImageRole::Test,
            (false, false) => ImageRole::General,
        })
        .collect()
}

/// Builds ChatML ids and labels exactly as Qwen-VL's `finetune.py` `preprocess`.
pub fn encode_conversation(tok: &Tokenizer, id: &str, turns: &[Turn], max_len: usize, overflow: Overflow) -> Result<Encoded> {
    let nl = tok.encode("\n");
    let role_ids = |r: &str| tok.encode(r);
    let mut ids: Vec<u32> = Vec::new();
    let mut labels: Vec<i64> = Vec::new();
    let mut starts = Vec::new();
    let mut paths = Vec::new();
    let mut first_answer: Option<usize> = None;

    // System: <|im_start|> system \n MESSAGE <|im_end|> \n ; supervised: only <|im_start|>, <|im_end|>, \n.
    let mut sys = vec![IM_START];
    sys.extend(role_ids("system"));
    sys.extend(&nl);
    sys.extend(tok.encode(SYSTEM_MESSAGE));
    sys.push(IM_END);
    sys.extend(&nl);
    labels.push(IM_START as i64);
    labels.extend(std::iter::repeat_n(IGNORE_INDEX, sys.len() - 3));
    labels.push(IM_END as i64);
    labels.extend(nl.iter().map(|&t| t as i64));
    ids.extend(sys);

    for (j, turn) in turns.iter().enumerate() {
        let role = match turn.from.as_str() {
            "user" | "human" => "user",
            "assistant" | "gpt" => "assistant",
            other => return Err(Error::sample(id, format!("turn {j}: unknown role {other:?}"))),
        };
        let expected = if j % 2 == 0 { "user" } else { "assistant" };
        if role != expected {
            return Err(Error::sample(id, format!("turn {j}: expected a {expected} turn, found {role}")));
        }
        let turn_start = ids.len();
        ids.push(IM_START);
        let rid = role_ids(role);
        ids.extend(&rid);
        ids.extend(&nl);
        let content_start = ids.len();
        encode_text(tok, id, &turn.value, &mut ids, &mut starts, &mut paths)?;
        let content_end = ids.len();
        ids.push(IM_END);
        ids.extend(&nl);
        let turn_len = ids.len() - turn_start;
        labels.push(IM_START as i64);
        if role == "user" {
            labels.extend(std::iter::repeat_n(IGNORE_INDEX, turn_len - 3));
        } else {
            first_answer.get_or_insert(content_start);
            labels.extend(std::iter::repeat_n(IGNORE_INDEX, rid.len() + nl.len()));
            labels.extend(ids[content_start..content_end].iter().map(|&t| t as i64));
        }
        labels.push(IM_END as i64);
        labels.extend(nl.iter().map(|&t| t as i64));
    }
    if turns.is_empty() {
        return Err(Error::sample(id, "no turns"));
    }
    debug_assert_eq!(ids.len(), labels.len());

    let mut truncated = false;
    if ids.len() > max_len {
        let cut_inside_image = starts.iter().any(|&s| s < max_len && max_len < s + IMAGE_SPAN);
        if overflow == Overflow::Reject || cut_inside_image {
            return Err(Error::sample(
                id,
                format!(
                    "{} tokens exceed max length {max_len}{}",
                    ids.len(),
                    if cut_inside_image { " and the cut would fall inside an image span" } else { "" }
                ),
            ));
        }
        // A sample whose every answer token is cut away would train on nothing but the template.
        if let Some(first) = first_answer.filter(|&a| a >= max_len) {
            return Err(Error::sample(
                id,
                format!(
                    "{} tokens cut to max length {max_len} leave no answer token (the first answer starts at token {first})",
                    ids.len()
                ),
            ));
        }
        ids.truncate(max_len);
        labels.truncate(max_len);
        let kept = starts.iter().filter(|&&s| s + IMAGE_SPAN <= max_len).count();
        starts.truncate(kept);
        paths.truncate(kept);
        truncated = true;
    }
    let roles = image_roles(&ids, &starts);
    Ok(Encoded { input_ids: ids, labels, image_starts: starts, image_paths: paths, image_roles: roles, truncated, image_grids: vec![] })
}
