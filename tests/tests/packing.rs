//! Packed micro-batches (issue #15): several samples in one row, each attending only to itself with
//! positions from 0, must train exactly as the same samples in padded rows.

use std::path::{Path, PathBuf};

use crate::model::{random_params, tiny_id};
use idavlm::model::{ModelConfig, ModelInput, ParamSet, QwenVl};
use idavlm_shards::chat::{encode_conversation, Encoded, Overflow, Turn};
use idavlm_shards::tokenizer::ENDOFTEXT;
use idavlm_tests::{
    assert_losses_close, assert_state_close, ckpt_state, launch, losses, recipe, run_ok, synth, tokenizer, worker_train,
};
use tch::{Device, Kind, Tensor};

fn turns(user: &str, assistant: &str) -> Vec<Turn> {
    vec![Turn { from: "user".into(), value: user.into() }, Turn { from: "assistant".into(), value: assistant.into() }]
}

/// Three samples of different lengths: two with references and test images (the ID-Former groups
/// them per sample), one general.
fn samples() -> Vec<Encoded> {
    let convs = [
        turns(
            "Bob is <img>r1</img>\nIn the image: <img>t1</img>\nIdentify Bob with grounding.",
            "<ref>Bob</ref><box>(10,20),(300,400)</box>",
        ),
        turns("<img>g</img>\nHow many shapes are there in this picture, counting all of them?", "There are 3 shapes."),
        turns(
            "Ann is <img>r2</img>\nCal is <img>r3</img>\nIn the image: <img>t2</img>\nWho is on the left?",
            "Ann is on the left, next to Cal.",
        ),
    ];
    convs.iter().map(|t| encode_conversation(tokenizer(), "t", t, 4096, Overflow::Reject).unwrap()).collect()
}

/// The samples as padded rows (`packed` false) or one packed row, with the same pixels.
fn input(enc: &[Encoded], pixels: &Tensor, packed: bool) -> ModelInput {
    let lens: Vec<usize> = enc.iter().map(|e| e.input_ids.len()).collect();
    let s = lens.iter().copied().max().unwrap();
    let (mut ids, mut labels, mut rows, mut starts, mut roles, mut groups) = (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut offset = 0;
    for (i, e) in enc.iter().enumerate() {
        ids.extend(e.input_ids.iter().map(|&t| t as i64));
        let first = labels.len();
        labels.extend(&e.labels);
        if packed {
            labels[first] = -100;
        } else {
            ids.extend(std::iter::repeat_n(ENDOFTEXT as i64, s - e.input_ids.len()));
            labels.extend(std::iter::repeat_n(-100i64, s - e.labels.len()));
        }
        for (k, &st) in e.image_starts.iter().enumerate() {
            rows.push(if packed { 0 } else { i });
            starts.push(if packed { offset + st } else { st });
            roles.push(e.image_roles[k]);
            groups.push(i);
        }
        offset += e.input_ids.len();
    }
    let (b, l) = if packed { (1, offset as i64) } else { (enc.len() as i64, s as i64) };
    ModelInput {
        input_ids: Tensor::from_slice(&ids).view([b, l]),
        labels: Tensor::from_slice(&labels).view([b, l]),
        pixels: pixels.shallow_clone(),
        image_rows: rows,
        image_starts: starts,
        image_roles: roles,
        image_groups: groups,
        seq_lens: if packed { lens } else { vec![] },
        supervised: Some(ModelInput::supervised_positions(&labels, b as usize, l as usize, tch::Device::Cpu)),
    }
}

/// The model tests' random parameters, requiring grad.
fn params(cfg: &ModelConfig) -> ParamSet {
    let p = random_params(cfg);
    for t in &p.tensors {
        let _ = t.shallow_clone().set_requires_grad(true);
    }
    p
}

fn pixels(cfg: &ModelConfig, enc: &[Encoded]) -> Tensor {
    let n: usize = enc.iter().map(|e| e.image_starts.len()).sum();
    tch::manual_seed(9);
    let size = cfg.visual.image_size;
    Tensor::randn([n as i64, 3, size, size], (Kind::Float, Device::Cpu))
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).norm().double_value(&[]) / b.norm().double_value(&[]).max(1e-30)
}

#[test]
fn a_packed_row_gives_the_padded_rows_loss_and_every_gradient() {
    let cfg = tiny_id();
    let p = params(&cfg);
    let m = QwenVl::new(&cfg, &p);
    let enc = samples();
    let px = pixels(&cfg, &enc);
    let mut grads = Vec::new();
    let mut loss = Vec::new();
    for packed in [false, true] {
        for t in &p.tensors {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let l = m.forward_loss(&input(&enc, &px, packed));
        l.backward();
        loss.push(l.double_value(&[]));
        grads.push(p.tensors.iter().map(|t| t.grad().defined().then(|| t.grad().copy())).collect::<Vec<_>>());
    }
    assert!(((loss[0] - loss[1]) / loss[0]).abs() <= 1e-6, "loss padded {} vs packed {}", loss[0], loss[1]);
    let mut compared = 0;
    for (spec, (a, b)) in p.specs.iter().zip(grads[0].iter().zip(&grads[1])) {
        match (a, b) {
            (Some(a), Some(b)) => {
                let e = rel(b, a);
                assert!(e <= 1e-5, "{}: gradient rel error {e}", spec.name);
                compared += 1;
            }
            (None, None) => {}
            _ => panic!("{}: gradient defined in only one of the two", spec.name),
        }
    }
    // Every LLM block, the embedding, the head, the resampler and the ID-Former have gradients.
    assert!(compared >= 30, "only {compared} gradients compared");
    assert!(p.specs.iter().zip(&grads[1]).any(|(s, g)| s.name.contains("attn1") && g.is_some()));
}

#[test]
fn no_attention_crosses_samples_and_positions_restart_in_each() {
    let cfg = tiny_id();
    let p = params(&cfg);
    let m = QwenVl::new(&cfg, &p);
    let enc = samples();
    let px = pixels(&cfg, &enc);
    let lens: Vec<i64> = enc.iter().map(|e| e.input_ids.len() as i64).collect();
    let logits = |e: &[Encoded], px: &Tensor| tch::no_grad(|| m.forward_logits(&input(e, px, true)));
    let base = logits(&enc, &px);
    // Change sample 0's text tokens (not its image spans): samples 1 and 2 do not see it.
    let mut changed = enc.clone();
    let spans: Vec<(usize, usize)> = changed[0].image_starts.iter().map(|&s| (s, s + 258)).collect();
    for (i, t) in changed[0].input_ids.iter_mut().enumerate() {
        if i > 2 && !spans.iter().any(|&(a, b)| (a..b).contains(&i)) && *t < 150_000 {
            *t = (*t * 7 + 13) % 150_000;
        }
    }
    let other = logits(&changed, &px);
    let rest = |t: &Tensor| t.narrow(1, lens[0], lens[1] + lens[2]);
    assert_eq!(rel(&rest(&other), &rest(&base)), 0.0, "a change in sample 0 reached samples 1 and 2");
    assert!(rel(&other.narrow(1, 0, lens[0]), &base.narrow(1, 0, lens[0])) > 1e-3, "the change did not change sample 0");
    // Sample 2 inside the packed row equals sample 2 alone (positions from 0, its own references).
    let n0: i64 = enc[..2].iter().map(|e| e.image_starts.len() as i64).sum();
    let alone = tch::no_grad(|| m.forward_logits(&input(&enc[2..], &px.narrow(0, n0, 3), false)));
    let e = rel(&base.narrow(1, lens[0] + lens[1], lens[2]), &alone);
    assert!(e <= 1e-5, "sample 2 packed vs alone: rel {e}");
}

/// A recipe in `root/name` over `data`: `world` ranks with `accum` micro-batches each; `packing` is
/// (tokens, window) or None for `micro` padded samples per micro-batch; the token-mean loss either way.
#[allow(clippy::too_many_arguments)]
fn packed_recipe(
    root: &Path,
    name: &str,
    data: &Path,
    micro: usize,
    accum: usize,
    packing: Option<(usize, usize)>,
    stage: u8,
    steps: u64,
) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let r = recipe(&d, data, "");
    let batch = match packing {
        Some((tokens, _)) => format!("  micro: {micro}\n  accum: {accum}\n  packing:\n    tokens: {tokens}\n"),
        None => format!("  micro: {micro}\n  accum: {accum}\n  loss_mean: tokens\n"),
    };
    let window = packing.map(|(_, w)| format!("  pack_window: {w}\n")).unwrap_or_default();
    let t = std::fs::read_to_string(&r)
        .unwrap()
        .replace("  micro: 1\n  accum: 2\n", &batch)
        .replace("  workers: 1\n", &format!("  workers: 1\n{window}"))
        .replace("  stage: 2", &format!("  stage: {stage}"))
        .replace("  steps: 4", &format!("  steps: {steps}"));
    std::fs::write(&r, t).unwrap();
    r
}

fn ok(r: &Path) {
    let out = worker_train(r, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn state(r: &Path, step: u64) -> std::collections::BTreeMap<String, Vec<f32>> {
    ckpt_state(&r.with_file_name("ckpt").join(format!("step-{step:08}")))
}

#[test]
fn packed_training_equals_padded_training_and_packed_ranks_equal_one_process() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    synth(&data, 40, 8, 5);
    // A window of 4 samples packs into one micro-batch of 8192 tokens: the same 4 samples per step as
    // padded micro-batches of 4.
    let padded = packed_recipe(d.path(), "padded", &data, 4, 1, None, 2, 3);
    ok(&padded);
    let packed = packed_recipe(d.path(), "packed", &data, 1, 1, Some((8192, 4)), 2, 3);
    ok(&packed);
    assert_losses_close(
        &losses(&packed.with_file_name("metrics.jsonl")),
        &losses(&padded.with_file_name("metrics.jsonl")),
        "packed",
    );
    assert_state_close(&state(&packed, 3), &state(&padded, 3), "packed vs padded");
    // Real packing (several micro-batches per window): 2 ranks under ZeRO-3 equal one process.
    let one = packed_recipe(d.path(), "one", &data, 1, 2, Some((2048, 8)), 2, 3);
    ok(&one);
    let two = packed_recipe(d.path(), "two", &data, 1, 1, Some((2048, 8)), 3, 3);
    run_ok(launch(&two, 2, &[]));
    assert_losses_close(&losses(&two.with_file_name("metrics.jsonl")), &losses(&one.with_file_name("metrics.jsonl")), "2 ranks");
    assert_state_close(&state(&two, 3), &state(&one, 3), "packed, 2 ranks vs 1");
}

#[test]
fn packed_resume_mid_window_from_2_ranks_on_3_is_exact() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    synth(&data, 40, 8, 5);
    let pack = Some((2048, 16));
    let straight = packed_recipe(d.path(), "straight", &data, 1, 3, pack, 2, 4);
    run_ok(launch(&straight, 2, &[]));
    let r = packed_recipe(d.path(), "resized", &data, 1, 3, pack, 2, 2);
    run_ok(launch(&r, 2, &[]));
    // The checkpoint stopped inside a packing window.
    let ts: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(r.with_file_name("ckpt").join("step-00000002").join("trainer.json")).unwrap(),
    )
    .unwrap();
    assert!(ts["reader"]["pack_bins"].as_u64().unwrap() > 0, "not mid-window: {ts}");
    let t = std::fs::read_to_string(&r).unwrap().replace("  accum: 3", "  accum: 2").replace("  steps: 2", "  steps: 4");
    std::fs::write(&r, t).unwrap();
    // Another window size cannot continue that window: a clear error, nothing written.
    let out = launch(&r, 3, &["--set", "data.pack_window=12"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("packing window") && err.contains("pack_window 16"), "{err}");
    run_ok(launch(&r, 3, &[]));
    assert_losses_close(
        &losses(&r.with_file_name("metrics.jsonl")),
        &losses(&straight.with_file_name("metrics.jsonl")),
        "2 -> 3",
    );
    assert_state_close(&state(&r, 4), &state(&straight, 4), "packed 2 -> 3 ranks");
}
