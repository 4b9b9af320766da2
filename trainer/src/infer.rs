//! Generation over MM-ID-format benchmarks and their scoring (SPEC §5).
//!
//! Prompts are built as in the original evaluation: the ChatML system prompt, one user turn with the
//! question (its `image_k` placeholders replaced by `<img>PATH</img>`), then `<|im_start|>assistant\n`.
//! Decoding uses the KV cache, greedy or top-p with a seed, and stops at `<|im_end|>` / `<|im_start|>`.
//! The scores themselves (keyword matching, box IoU, the judge) are libtorch-free, in
//! [`idavlm_shards::mmid`].

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::model::{ModelInput, QwenVl};
use idavlm_shards::chat::{encode_conversation, Overflow, Turn};
use idavlm_shards::preprocess::{preprocess_image, ResizeOrder};
use idavlm_shards::tokenizer::{Tokenizer, ENDOFTEXT, IM_END, IM_START, NEWLINE};

pub use idavlm_shards::mmid::score::*;
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

pub use crate::plan::model_dir;

pub fn device_default() -> Device {
    crate::runtime::device_for(0)
}

