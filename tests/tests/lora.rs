//! LoRA and optimizer groups: the adapted model against the explicit W + (alpha/r) B A model, PEFT's
//! layout and merge (with the `peft` package), grouped AdamW against torch.optim.AdamW, and LoRA under
//! ZeRO-3 on 2 ranks against 1.

use std::path::Path;
use std::process::Command;

use idavlm::model::lora::{self, LoraSpec};
use idavlm::model::{ModelConfig, ParamSet, QwenVl};
use idavlm_tests::{
    assert_losses_close, assert_state_close, ckpt_state, launch, losses, python_script, read_f32, root, run_ok, sized_recipe,
    synth, worker_train,
};
use tch::{Device, Kind, Tensor};

use crate::model::{batch, rel_err};

fn spec(dropout: f64) -> LoraSpec {
    LoraSpec {
        r: 4,
        alpha: 16.0,
        dropout,
        targets: ["c_attn", "attn.c_proj", "w1", "w2"].map(String::from).to_vec(),
        modules_to_save: ["wte", "lm_head"].map(String::from).to_vec(),
    }
}

fn tiny_lora() -> (ModelConfig, ModelConfig) {
    let mut base = ModelConfig::tiny();
    base.id_former = true;
    let mut l = base.clone();
    l.lora = Some(spec(0.0));
    (base, l)
}

fn adapted_modules(cfg: &ModelConfig) -> Vec<String> {
    let l = cfg.lora.as_ref().expect("lora");
    (0..cfg.num_hidden_layers)
        .flat_map(|i| lora::BLOCK_LINEARS.iter().map(move |m| format!("transformer.h.{i}.{m}")))
        .filter(|m| l.adapts(m))
        .collect()
}

#[test]
fn fresh_adapters_leave_the_base_model_unchanged() {
    let (base, l) = tiny_lora();
    let pb = ParamSet::init(&base, Device::Cpu, Kind::Float, 3);
    let pl = ParamSet::init(&l, Device::Cpu, Kind::Float, 3);
    // Same base tensors (the factors come last in the spec order), B zero, A not.
    for (s, t) in pb.iter() {
        assert!(t.equal(pl.get(&s.name)), "{} differs", s.name);
    }
    let mods = adapted_modules(&l);
    assert_eq!(mods.len(), 4 * base.num_hidden_layers as usize);
    for m in &mods {
        assert_eq!(pl.get(&format!("{m}.lora_B.weight")).abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert!(pl.get(&format!("{m}.lora_A.weight")).abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
    let input = batch(&base);
    let a = tch::no_grad(|| QwenVl::new(&base, &pb).forward_logits(&input));
    let b = tch::no_grad(|| QwenVl::new(&l, &pl).forward_logits(&input));
    // Equal up to the GEMM library's rounding: CPU BLAS may pick another kernel for another buffer
    // alignment, so two forwards are bit-equal only while the allocator happens to repeat itself.
    let diff = (&a - &b).abs().max().double_value(&[]);
    let scale = a.abs().max().double_value(&[]);
    assert!(diff <= 2e-5 * scale, "step 0 of an adapted model is not the base model: {diff} (logits up to {scale})");
}

#[test]
fn lora_forward_and_backward_equal_the_explicit_merged_model() {
    let (base, l) = tiny_lora();
    let pl = ParamSet::init(&l, Device::Cpu, Kind::Float, 3);
    let scale = l.lora.as_ref().unwrap().scale();
    tch::manual_seed(9);
    let mods = adapted_modules(&l);
    // Non-zero B, so that the adapter's path is exercised.
    tch::no_grad(|| {
        for m in &mods {
            let mut b = pl.get(&format!("{m}.lora_B.weight")).shallow_clone();
            b.copy_(&(Tensor::randn(b.size().as_slice(), (Kind::Float, Device::Cpu)) * 0.02));
        }
    });
    let leaves: Vec<Tensor> = pl.tensors.iter().map(|t| t.detach().set_requires_grad(true)).collect();
    let pl = ParamSet::from_tensors(pl.specs.clone(), leaves);
    // The explicit model: W' = W + (alpha/r) B A as its own leaf.
    let pb = ParamSet::init(&base, Device::Cpu, Kind::Float, 3);
    let merged: Vec<Tensor> = pb
        .iter()
        .map(|(s, _)| {
            let w = pl.get(&s.name).detach();
            let m = s.name.strip_suffix(".weight").unwrap_or("");
            let w = if mods.iter().any(|x| x == m) {
                lora::merged(
                    &w,
                    &pl.get(&format!("{m}.lora_A.weight")).detach(),
                    &pl.get(&format!("{m}.lora_B.weight")).detach(),
                    scale,
                )
            } else {
                w
            };
            w.set_requires_grad(true)
        })
        .collect();
    let pm = ParamSet::from_tensors(pb.specs.clone(), merged);
    let input = batch(&base);
    let la = QwenVl::new(&l, &pl).forward_loss(&input);
    let lb = QwenVl::new(&base, &pm).forward_loss(&input);
    assert!((la.double_value(&[]) - lb.double_value(&[])).abs() <= 1e-5 * lb.double_value(&[]).abs());
    la.backward();
    lb.backward();
    for m in &mods {
        let gw = pm.get(&format!("{m}.weight")).grad();
        let a = pl.get(&format!("{m}.lora_A.weight"));
        let b = pl.get(&format!("{m}.lora_B.weight"));
        // dL/dA = s B^T dL/dW', dL/dB = s dL/dW' A^T.
        let want_a = b.detach().transpose(0, 1).matmul(&gw) * scale;
        let want_b = gw.matmul(&a.detach().transpose(0, 1)) * scale;
        assert!(rel_err(&a.grad(), &want_a) <= 1e-5, "{m}: dA rel {}", rel_err(&a.grad(), &want_a));
        assert!(rel_err(&b.grad(), &want_b) <= 1e-5, "{m}: dB rel {}", rel_err(&b.grad(), &want_b));
        // The frozen base weight sees the same gradient as the merged one.
        let gbase = pl.get(&format!("{m}.weight")).grad();
        assert!(rel_err(&gbase, &gw) <= 1e-5, "{m}: dW rel {}", rel_err(&gbase, &gw));
    }
    // Every other parameter's gradient too.
    for (s, t) in pm.iter() {
        let g = t.grad();
        if g.defined() && g.norm().double_value(&[]) > 0.0 {
            let r = rel_err(&pl.get(&s.name).grad(), &g);
            assert!(r <= 1e-5, "{}: rel {r}", s.name);
        }
    }
}

const LORA: &str = "lora:\n  r: 4\n  alpha: 16\n  dropout: 0.0\n";

/// A recipe for `world` ranks at a global batch of 6 micro-batches x 1 sample.
fn setup(root: &Path, name: &str, data: &Path, world: usize, stage: u8, steps: u64, extra: &str) -> std::path::PathBuf {
    sized_recipe(root, name, data, 6, world, stage, steps, extra)
}

#[test]
fn lora_under_zero_3_on_2_ranks_equals_1_rank_and_dropout_survives_recomputation() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    synth(&data, 40, 8, 5);
    let single = setup(d.path(), "single", &data, 1, 2, 4, LORA);
    run_ok(idavlm_tests::worker_command(&single, &[]));
    let want_losses = losses(&single.with_file_name("metrics.jsonl"));
    let want = ckpt_state(&single.with_file_name("ckpt").join("step-00000004"));
    // Only the adapters and wte / lm_head are trained.
    assert!(
        want.keys().all(|k| k.starts_with("block.") || k.starts_with("head.") || k.starts_with("stem.")),
        "{:?}",
        want.keys()
    );
    // The last case keeps every block's graph under ZeRO-3: reshard after forward frees and gathers
    // again the partitioned frozen base weights with the trained adapters.
    for (world, stage, keep) in [(2, 3u8, "true"), (2, 1, "true"), (2, 3, "false")] {
        let name = format!("w{world}z{stage}-ac-{keep}");
        let r = setup(d.path(), &name, &data, world, stage, 4, LORA);
        run_ok(launch(&r, world, &["--set", &format!("activation_checkpointing={keep}")]));
        assert_losses_close(&losses(&r.with_file_name("metrics.jsonl")), &want_losses, &name);
        assert_state_close(&ckpt_state(&r.with_file_name("ckpt").join("step-00000004")), &want, &name);
    }
    // Dropout: the recomputed blocks draw the masks of the forward (equal to keeping every graph). B
    // leaves zero at step 3 (warmup_log runs steps 1-2 at lr 0), so step 4 is the first that dropout
    // can change.
    let dropout = LORA.replace("dropout: 0.0", "dropout: 0.1");
    let a = setup(d.path(), "dropout-recompute", &data, 1, 2, 4, &dropout);
    run_ok(idavlm_tests::worker_command(&a, &[]));
    let b = setup(d.path(), "dropout-keep", &data, 1, 2, 4, &dropout);
    run_ok(idavlm_tests::worker_command(&b, &["--set", "activation_checkpointing=false"]));
    let (la, lb) = (losses(&a.with_file_name("metrics.jsonl")), losses(&b.with_file_name("metrics.jsonl")));
    assert_losses_close(&la, &lb, "dropout");
    assert!((la[3].1 - want_losses[3].1).abs() > 1e-6, "dropout 0.1 changed nothing: {la:?} vs {want_losses:?}");
}

#[test]
fn lora_checkpoints_export_peft_adapters_that_peft_loads_and_merges() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    synth(&data, 24, 8, 5);
    let r = setup(d.path(), "run", &data, 1, 2, 3, LORA);
    run_ok(idavlm_tests::worker_command(&r, &[]));
    let ckpt = r.with_file_name("ckpt").join("step-00000003");
    for f in ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "model/config.json"] {
        assert!(ckpt.join(f).is_file(), "{f} missing");
    }
    let cfg = ModelConfig::from_file(&ckpt.join("model/config.json")).unwrap();
    assert!(cfg.lora.is_none());
    // model/ is the base model (with the trained wte and lm_head): no factor in it.
    let (base, _) = idavlm::model::weights::load_hf(&ckpt.join("model"), &cfg, Device::Cpu, Kind::Float).unwrap();
    let adapter = read_f32(&ckpt.join("adapter/adapter_model.safetensors"));
    let acfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        (acfg["r"].as_i64(), acfg["lora_alpha"].as_f64(), acfg["peft_type"].as_str()),
        (Some(4), Some(16.0), Some("LORA"))
    );
    // The trained B are not zero any more; wte / lm_head in the adapter are those of model/.
    let b0 = &adapter["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"];
    assert!(b0.iter().any(|v| *v != 0.0));
    let wte: Vec<f32> = Vec::try_from(base.get("transformer.wte.weight").view([-1])).unwrap();
    assert_eq!(adapter["base_model.model.transformer.wte.weight"], wte);
    // export --merge: W + (alpha/r) B A, written in bf16.
    let out = d.path().join("merged");
    let mut c = Command::new(idavlm_tests::bin("idavlm-worker"));
    c.arg("export").arg(&ckpt).arg(&out).arg("--merge");
    run_ok(c);
    let (merged, _) = idavlm::model::weights::load_hf(&out, &cfg, Device::Cpu, Kind::Float).unwrap();
    let t = |v: &Vec<f32>, shape: &[i64]| Tensor::from_slice(v).view(shape);
    let mut n = 0;
    for (s, w) in base.iter() {
        let m = s.name.strip_suffix(".weight").unwrap_or("");
        let want = match adapter.get(&format!("base_model.model.{m}.lora_A.weight")) {
            Some(a) => {
                let b = &adapter[&format!("base_model.model.{m}.lora_B.weight")];
                n += 1;
                w + t(b, &[s.shape[0], 4]).matmul(&t(a, &[4, s.shape[1]])) * 4.0
            }
            None => w.shallow_clone(),
        };
        let want = want.to_kind(Kind::BFloat16).to_kind(Kind::Float);
        let got = merged.get(&s.name);
        let tol = want.abs() * 2f64.powi(-7) + 1e-6;
        assert!((got - &want).abs().le_tensor(&tol).all().int64_value(&[]) == 1, "{}: merged weight differs", s.name);
    }
    assert_eq!(n, 4 * cfg.num_hidden_layers as usize);
    // PEFT: the names and config it writes for the same targets, and its own merge of our adapter.
    let (text, _) = python_script("peft_check.py", [ckpt.join("adapter"), ckpt.join("model"), out.clone()]);
    assert!(text.contains("names and shapes as peft") && text.contains("equal peft's merge_and_unload"), "{text}");
    // idavlm-infer and a next stage read the adapter: a checkpoint with adapter/ loads as the merged model.
    let (with, report) = idavlm::plan::load_model(&ckpt, &cfg, Device::Cpu, Kind::Float).unwrap();
    assert_eq!((report.adapters_loaded, report.adapters_merged), (0, n));
    for (s, w) in with.iter() {
        let m = merged.get(&s.name);
        let tol = m.abs() * 2f64.powi(-7) + 1e-6;
        assert!(
            (w - m).abs().le_tensor(&tol).all().int64_value(&[]) == 1,
            "{}: adapter applied differs from export --merge",
            s.name
        );
    }
}

#[test]
fn optimizer_groups_follow_torch_adamw_param_groups() {
    use idavlm::comm::Local;
    use idavlm::recipe::{OptimizerGroup, ZeroStage};
    use idavlm::zero::{Role, Sharded, Use};
    let cfg = ModelConfig::from_file(&root().join("tests/data/micro.json")).unwrap();
    let params = ParamSet::init(&cfg, Device::Cpu, Kind::Float, 5);
    let trainable = idavlm::plan::Trainable::default();
    let mut st = Sharded::new(&cfg, params, &|s| trainable.contains(s), ZeroStage::Two, &Local);
    let groups = vec![
        OptimizerGroup { pattern: "transformer.h.0.*".into(), lr: Some(5e-4), weight_decay: Some(0.0) },
        OptimizerGroup { pattern: "transformer.visual.attn_pool.*".into(), lr: Some(2e-3), weight_decay: None },
        OptimizerGroup { pattern: "lm_head.*".into(), lr: None, weight_decay: Some(0.3) },
    ];
    let (lr, wd) = (1e-3, 0.1);
    st.set_groups(&groups, lr, wd);
    let opt = idavlm::optim::AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: wd };
    let factors = [0.5, 1.0, 0.8];
    // Names, initial values and offsets of the trained parameters (world 1: the shard is the bucket).
    let mut entries = Vec::new();
    for (b, bk) in st.layout.buckets.iter().enumerate() {
        for e in &bk.entries {
            entries.push((e.name.clone(), b, e.offset as i64, e.numel as i64, e.shape.clone()));
        }
    }
    let mut inputs: Vec<(String, Tensor)> =
        entries.iter().map(|(n, b, o, k, _)| (format!("init.{n}"), st.master[*b].narrow(0, *o, *k).copy())).collect();
    tch::manual_seed(17);
    for (t, f) in factors.iter().enumerate() {
        let roles: Vec<Role> = st.layout.buckets.iter().map(|b| b.role.clone()).collect();
        for role in roles {
            let p = st.gather_now(&Local, role.clone(), Use::Leaves).unwrap();
            let b = st.layout.bucket_index(&role).unwrap();
            let mut loss = Tensor::zeros([], (Kind::Float, Device::Cpu));
            for (e, leaf) in st.layout.buckets[b].entries.clone().iter().zip(p.tensors()) {
                let g = Tensor::randn(e.shape.as_slice(), (Kind::Float, Device::Cpu)) * 0.1;
                inputs.push((format!("grad.{t}.{}", e.name), g.view([-1]).copy()));
                loss += (leaf * g).sum(Kind::Float);
            }
            loss.backward();
            st.accumulate_grad(&Local, &p).unwrap();
        }
        st.finish_grads(&Local).unwrap();
        let s = st.step(&Local, &opt, lr * f, None).unwrap();
        assert!(!s.skipped);
    }
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.safetensors");
    idavlm::model::weights::write_safetensors(&inp, &inputs, &Default::default()).unwrap();
    let spec = serde_json::json!({
        "betas": [0.9, 0.95], "eps": 1e-8, "lr": lr, "weight_decay": wd, "factors": factors,
        "groups": groups.iter().map(|g| serde_json::json!({"match": g.pattern, "lr": g.lr, "weight_decay": g.weight_decay})).collect::<Vec<_>>(),
    });
    std::fs::write(dir.path().join("spec.json"), spec.to_string()).unwrap();
    let out = dir.path().join("out.safetensors");
    python_script("adamw_groups.py", [inp.clone(), dir.path().join("spec.json"), out.clone()]);
    let torch = read_f32(&out);
    for (n, b, o, k, _) in &entries {
        for (which, ours) in [("param", &st.master[*b]), ("exp_avg", &st.exp_avg[*b]), ("exp_avg_sq", &st.exp_avg_sq[*b])] {
            let ours: Vec<f32> = Vec::try_from(ours.narrow(0, *o, *k)).unwrap();
            let want = &torch[&format!("{which}.{n}")];
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
            let diff = ours.iter().zip(want).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(diff / scale <= 1e-6, "{which} of {n}: differs from torch by {diff} (scale {scale})");
        }
    }
}

#[test]
fn a_group_with_lr_0_leaves_its_parameters_as_they_started() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    synth(&data, 24, 8, 5);
    // warmup_log: steps 1 and 2 run at lr 0.
    let r = setup(d.path(), "run", &data, 1, 2, 4, "");
    let out = worker_train(&r, &["--set", "optimizer.groups=[{match: \"transformer.h.0.*\", lr: 0, weight_decay: 0}]"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ckpt = r.with_file_name("ckpt").join("step-00000004");
    let cfg = ModelConfig::from_file(&ckpt.join("model/config.json")).unwrap();
    let (trained, _) = idavlm::model::weights::load_hf(&ckpt.join("model"), &cfg, Device::Cpu, Kind::Float).unwrap();
    let start = ParamSet::init(&cfg, Device::Cpu, Kind::Float, 11);
    let (mut same, mut moved) = (0, 0);
    for (s, t) in trained.iter() {
        if s.name.starts_with("transformer.h.0.") {
            assert!(t.equal(start.get(&s.name)), "{} moved with lr 0", s.name);
            same += 1;
        } else if s.name.starts_with("transformer.h.1.") && !t.equal(start.get(&s.name)) {
            moved += 1;
        }
    }
    assert!(same > 0 && moved > 0, "same {same}, moved {moved}");
}

#[test]
fn a_lora_run_resumed_on_another_world_size_equals_the_straight_run() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    synth(&data, 40, 8, 5);
    let straight = setup(d.path(), "straight", &data, 1, 2, 5, LORA);
    run_ok(idavlm_tests::worker_command(&straight, &[]));
    // 2 ranks under ZeRO-3 stop at step 3 (a checkpoint), 3 ranks under ZeRO-2 go on to step 5.
    let r = setup(d.path(), "resumed", &data, 2, 3, 3, LORA);
    run_ok(launch(&r, 2, &[]));
    let t = std::fs::read_to_string(&r).unwrap().replace("  steps: 3", "  steps: 5").replace("  stage: 3", "  stage: 2");
    std::fs::write(&r, t.replace("  accum: 3", "  accum: 2")).unwrap();
    let err = run_ok(launch(&r, 3, &["--resume", "auto"]));
    assert!(err.contains("resumed from"), "{err}");
    let want = ckpt_state(&straight.with_file_name("ckpt").join("step-00000005"));
    assert_state_close(&ckpt_state(&r.with_file_name("ckpt").join("step-00000005")), &want, "resumed");
    assert_losses_close(
        &losses(&r.with_file_name("metrics.jsonl")),
        &losses(&straight.with_file_name("metrics.jsonl")),
        "resumed",
    );
}
