use std::path::Path;

use idavlm_tests::{losses, read_f32, recipe, synth, worker_train};

fn ok(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "worker failed ({:?}):\n{err}", out.status.code());
    err
}

pub fn data(dir: &Path) -> std::path::PathBuf {
    let d = dir.join("data");
    synth(&d, 40, 12, 8);
    d
}

#[test]
fn recipe_errors_name_the_key_and_the_line() {
    let d = tempfile::tempdir().unwrap();
    let r = recipe(d.path(), &d.path().join("data"), "");
    let text = std::fs::read_to_string(&r).unwrap();
    let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let bad = text.replace("  lr: 1.0e-3", "  lrr: 1.0e-3");
    std::fs::write(&r, &bad).unwrap();
    let e = idavlm::recipe::load(&r, &[]).unwrap_err().to_string();
    assert!(
        e.contains("optimizer") && e.contains("lrr") && e.contains(&format!("recipe.yaml:{}", line_of("  lr: 1.0e-3"))),
        "{e}"
    );
    std::fs::write(&r, text.replace("  micro: 1", "  micro: one")).unwrap();
    let e = idavlm::recipe::load(&r, &[]).unwrap_err().to_string();
    assert!(e.contains("batch.micro") && e.contains(&format!("recipe.yaml:{}", line_of("  micro: 1"))), "{e}");
    std::fs::write(&r, &text).unwrap();
    let e = idavlm::recipe::load(&r, &["zero.stage=4".into()]).unwrap_err().to_string();
    assert!(e.contains("zero.stage") && e.contains("not 1, 2 or 3"), "{e}");
    // `extends` with an override in the child.
    let child = d.path().join("child.yaml");
    std::fs::write(&child, "extends: recipe.yaml\noptimizer:\n  lr: 5.0e-6\n").unwrap();
    let c = idavlm::recipe::load(&child, &["batch.accum=3".into()]).unwrap();
    assert_eq!((c.optimizer.lr, c.batch.accum, c.optimizer.weight_decay), (5e-6, 3, 0.1));
}

/// Also: `logging.phase_split` times each step by phase (in the metrics and the log), and
/// `logging.trace` records one step as a timeline with the phases in it.
#[test]
fn the_loss_falls() {
    let d = tempfile::tempdir().unwrap();
    let r = recipe(d.path(), &data(d.path()), "");
    let trace_dir = format!("logging.trace.dir={}", d.path().join("trace").display());
    let sets = [
        "length.steps=14",
        "optimizer.lr=3e-3",
        "checkpoint.at_end=false",
        "logging.phase_split=true",
        "logging.trace.step=2",
        &trace_dir,
    ];
    let args: Vec<&str> = sets.iter().flat_map(|s| ["--set", *s]).collect();
    let log = ok(&worker_train(&r, &args));
    assert!(log.contains("step 14 phases (s): "), "{log}");
    let trace = d.path().join("trace/step-00000002.r0.json");
    assert!(log.contains("step 2 recorded as a timeline"), "{log}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let ev = v["traceEvents"].as_array().unwrap();
    for phase in ["stem_forward", "blocks_forward", "head_fwd_bwd", "optimizer"] {
        assert!(ev.iter().any(|e| e["cat"] == "user_annotation" && e["name"] == phase), "{phase} not in the trace");
    }
    assert!(ev.iter().any(|e| e["cat"] == "cpu_op" && e["name"] == "aten::mm"), "no ops in the trace");
    for line in std::fs::read_to_string(d.path().join("metrics.jsonl")).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let phases = v["phase_s"].as_object().unwrap_or_else(|| panic!("no phase_s: {line}"));
        for k in ["data", "stem_forward", "blocks_forward", "head_fwd_bwd", "blocks_recompute_bwd", "optimizer"] {
            assert!(phases[k].as_f64().unwrap() > 0.0, "{k} in {line}");
        }
        let sum: f64 = phases.values().map(|x| x.as_f64().unwrap()).sum();
        assert!(sum <= v["step_s"].as_f64().unwrap() + 1e-6, "phases {sum} over the step: {line}");
    }
    let l = losses(&d.path().join("metrics.jsonl"));
    assert_eq!(l.len(), 14);
    let first: f64 = l[..3].iter().map(|x| x.1).sum::<f64>() / 3.0;
    let last: f64 = l[11..].iter().map(|x| x.1).sum::<f64>() / 3.0;
    assert!(last < first - 1.0, "loss did not fall: {first} -> {last}");
}

#[test]
fn resume_is_bit_exact_and_a_truncated_checkpoint_is_skipped() {
    let d = tempfile::tempdir().unwrap();
    let data = data(d.path());
    let a = d.path().join("a");
    let b = d.path().join("b");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let ra = recipe(&a, &data, "");
    let rb = recipe(&b, &data, "");
    ok(&worker_train(&ra, &["--set", "length.steps=4"]));
    ok(&worker_train(&rb, &["--set", "length.steps=2"]));
    let err = ok(&worker_train(&rb, &["--set", "length.steps=4"]));
    assert!(err.contains("resumed from") && err.contains("step-00000002"), "{err}");
    let la = losses(&a.join("metrics.jsonl"));
    let lb = losses(&b.join("metrics.jsonl"));
    assert_eq!(la, lb, "losses of the straight and the resumed run differ");
    let fa = read_f32(&a.join("ckpt/step-00000004/rank-00000-of-00001.safetensors"));
    let fb = read_f32(&b.join("ckpt/step-00000004/rank-00000-of-00001.safetensors"));
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    for (k, v) in &fa {
        assert!(v == &fb[k], "{k} differs after resume");
    }
    // Truncate the newest checkpoint: --resume auto takes the previous one and says why.
    let f = b.join("ckpt/step-00000004/rank-00000-of-00001.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    let err = ok(&worker_train(&rb, &["--set", "length.steps=3", "--set", "checkpoint.at_end=false"]));
    assert!(err.contains("skipped") && err.contains("step-00000004") && err.contains("truncated"), "{err}");
    assert!(err.contains("resumed from") && err.contains("step-00000002"), "{err}");
    // An explicit path to the damaged checkpoint is refused with the reason.
    let out = worker_train(&rb, &["--resume", b.join("ckpt/step-00000004").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("truncated"));
    // A fresh run (--resume none) into a folder holding this run's checkpoints is refused, naming it:
    // otherwise the next --resume auto (a requeue) would continue the older run.
    let out = worker_train(&rb, &["--resume", "none"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--resume none") && err.contains(&b.join("ckpt").display().to_string()) && err.contains("step-0000000"),
        "{err}"
    );
}

#[test]
fn sigterm_writes_a_loadable_checkpoint_and_exits_75() {
    let d = tempfile::tempdir().unwrap();
    let r = recipe(d.path(), &data(d.path()), "");
    let mut child =
        idavlm_tests::worker_command(&r, &["--set", "length.steps=200"]).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let metrics = d.path().join("metrics.jsonl");
    idavlm_tests::wait_for_first_step(&metrics, 120);
    idavlm_tests::send_signal(child.id(), 15);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(75));
    let (latest, _) = idavlm::checkpoint::find_latest(&d.path().join("ckpt"));
    let latest = latest.expect("a checkpoint");
    idavlm::checkpoint::verify(&latest).unwrap();
    let st = idavlm::checkpoint::read_trainer_state(&latest).unwrap();
    assert!(st.step >= 1 && st.step < 200);
    let err = ok(&worker_train(&r, &["--set", &format!("length.steps={}", st.step + 1)]));
    assert!(err.contains("resumed from"), "{err}");
}

#[test]
fn stage_two_starts_from_stage_one_with_a_zero_id_former() {
    let d = tempfile::tempdir().unwrap();
    let data = data(d.path());
    let s1 = d.path().join("s1");
    std::fs::create_dir_all(&s1).unwrap();
    let r1 = recipe(&s1, &data, "");
    let text = std::fs::read_to_string(&r1).unwrap().replace("  id_former: true", "  id_former: false");
    std::fs::write(&r1, text).unwrap();
    ok(&worker_train(&r1, &["--set", "length.steps=2"]));
    let s2 = d.path().join("s2");
    std::fs::create_dir_all(&s2).unwrap();
    let init = s1.join("ckpt/step-00000002");
    let r2 = recipe(&s2, &data, &format!("extends: {}\n", r1.display()));
    let text =
        std::fs::read_to_string(&r2).unwrap().replace("  dtype: f32", &format!("  dtype: f32\n  init: {}", init.display()));
    std::fs::write(&r2, text).unwrap();
    let err = ok(&worker_train(&r2, &["--set", "length.steps=2", "--set", "optimizer.lr=5e-6"]));
    assert!(err.contains("ID-Former not in") && err.contains("zero-initialised"), "{err}");
    // Stage 2's fresh optimizer: adam_step counts from its own start.
    let st = idavlm::checkpoint::read_trainer_state(&s2.join("ckpt/step-00000002")).unwrap();
    assert_eq!(st.adam_step, 2);
    let m = idavlm::checkpoint::verify(&s2.join("ckpt/step-00000002")).unwrap();
    assert!(m.layout.iter().any(|(_, n)| *n > 0));
}

#[test]
fn the_shipped_recipes_parse() {
    let dir = idavlm_tests::root().join("recipes");
    let s1 = idavlm::recipe::load(&dir.join("stage1.yaml"), &[]).unwrap();
    let s2 = idavlm::recipe::load(&dir.join("stage2.yaml"), &[]).unwrap();
    let demo = idavlm::recipe::load(&dir.join("demo.yaml"), &[]).unwrap();
    assert_eq!((s1.batch.micro, s1.batch.accum, s1.zero.stage, s1.optimizer.lr), (2, 8, idavlm::recipe::ZeroStage::Three, 1e-5));
    assert_eq!((s2.optimizer.lr, s2.length.epochs, s2.length.steps, s2.model.id_former), (5e-6, Some(8.0), None, true));
    assert_eq!(s2.data.inject_probability, 0.1);
    assert_eq!(s2.checkpoint.every_steps, Some(500));
    assert_eq!(demo.model.preset.as_deref(), Some("tiny"));
    // LoRA: the original script's adapter settings, stage 2's data and length.
    let lora = idavlm::recipe::load(&dir.join("lora.yaml"), &[]).unwrap();
    let l = lora.lora.as_ref().expect("lora section");
    assert_eq!((l.r, l.alpha, l.dropout, l.targets.len()), (64, 16.0, 0.05, 4));
    assert_eq!((lora.length.epochs, lora.optimizer.lr, lora.optimizer.groups.len()), (Some(8.0), 1e-4, 2));
    let plan = lora.resolve(tch::Device::Cpu).unwrap();
    let specs = idavlm::model::param_specs(&plan.cfg);
    let trained: Vec<&str> =
        specs.iter().filter(|s| plan.trainable.contains(s)).map(|s| s.name.as_str()).filter(|n| !n.contains(".lora_")).collect();
    assert!(trained.contains(&"transformer.wte.weight") && trained.contains(&"lm_head.weight"));
    assert!(trained.contains(&"transformer.visual.attn_pool.attn1.in_proj_weight"), "{trained:?}");
    assert!(trained.iter().all(|n| !n.starts_with("transformer.h.")), "{trained:?}");
}

#[test]
fn the_held_out_evaluation_runs_end_to_end() {
    let d = tempfile::tempdir().unwrap();
    let data = data(d.path());
    let r = recipe(d.path(), &data, "");
    ok(&worker_train(&r, &["--set", "length.steps=2"]));
    let preds = d.path().join("preds.jsonl");
    let out = idavlm_tests::infer(&d.path().join("ckpt/step-00000002"), &data.join("eval/mmid.json"), &preds, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("matching") && table.contains("location") && table.contains("caption_singleimage"), "{table}");
    assert_eq!(std::fs::read_to_string(&preds).unwrap().lines().count(), 16);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("preds.summary.json")).unwrap()).unwrap();
    assert_eq!(summary["matching"]["items"], 4);
    assert!(summary["location"]["mean_iou"].is_number());
}

#[test]
fn non_finite_steps_are_skipped_then_the_run_stops_with_exit_4() {
    let d = tempfile::tempdir().unwrap();
    let data = data(d.path());
    // Initial weights whose final norm is NaN: every loss and gradient norm is non-finite.
    let cfg = idavlm::model::ModelConfig::from_file(&idavlm_tests::root().join("tests/data/micro.json")).unwrap();
    let p = idavlm::model::ParamSet::init(&cfg, tch::Device::Cpu, tch::Kind::Float, 3);
    let named: Vec<(String, tch::Tensor)> = p
        .specs
        .iter()
        .zip(&p.tensors)
        .map(|(s, t)| {
            (s.name.clone(), if s.name == "transformer.ln_f.weight" { t.full_like(f64::NAN) } else { t.shallow_clone() })
        })
        .collect();
    let init = d.path().join("nan-model");
    idavlm::model::weights::save_hf(&named, &init, tch::Kind::Float, 1 << 30).unwrap();
    let r = recipe(d.path(), &data, "");
    let text = std::fs::read_to_string(&r).unwrap().replace("  dtype: f32", &format!("  dtype: f32\n  init: {}", init.display()));
    std::fs::write(&r, text).unwrap();
    let out = worker_train(&r, &["--set", "max_nonfinite_in_row=3", "--set", "length.steps=10"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("non-finite") && err.contains("3 non-finite steps in a row"), "{err}");
    // Three steps ran, each logged as skipped; none updated the optimizer (adam_step stays 0).
    let lines = idavlm_tests::metrics(&d.path().join("metrics.jsonl"));
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|v| v["skipped"] == serde_json::Value::Bool(true)), "{lines:?}");
}

#[test]
fn tensorboard_reads_the_event_files_the_run_writes() {
    let d = tempfile::tempdir().unwrap();
    let tb = d.path().join("tb");
    let r = recipe(d.path(), &data(d.path()), "");
    let text = std::fs::read_to_string(&r)
        .unwrap()
        .replace("  progress_bar: false\n", &format!("  progress_bar: false\n  tensorboard: {}\n", tb.display()));
    std::fs::write(&r, text).unwrap();
    ok(&worker_train(&r, &[]));
    let (out, _) = idavlm_tests::python_script("tb_read.py", [&tb]);
    let got: serde_json::Value = serde_json::from_str(&out).unwrap();
    // Every step's loss, lr, grad norm and speed, equal (in f32) to the metrics file's.
    let metrics = idavlm_tests::metrics(&d.path().join("metrics.jsonl"));
    assert_eq!(metrics.len(), 4);
    for (tag, key) in
        [("loss", "loss"), ("loss/id", "loss_id"), ("lr", "lr"), ("grad_norm", "grad_norm"), ("tokens_per_s", "tokens_per_s")]
    {
        let series = got[tag].as_array().unwrap_or_else(|| panic!("no {tag} in {got}"));
        let want: Vec<(u64, f32)> =
            metrics.iter().map(|m| (m["step"].as_u64().unwrap(), m[key].as_f64().unwrap() as f32)).collect();
        let have: Vec<(u64, f32)> = series.iter().map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap() as f32)).collect();
        assert_eq!(have, want, "{tag}");
    }
    assert!(got.get("mem_gib").is_some());
}

/// `eval:` every 2 steps: the held-out loss and the MM-ID scores are logged with steps 2 and 4 (metrics
/// file, TensorBoard, the log), equal on 2 ranks under ZeRO-3 and on 1 process, and the held-out loss is
/// the token mean of the saved step-4 model over the held-out split, computed here independently.
#[test]
fn eval_during_training_logs_the_heldout_loss_of_the_saved_model_and_mmid_scores() {
    use idavlm::model::{ModelConfig, QwenVl};
    use idavlm_shards::order::Locator;
    use idavlm_shards::reader::{BadImagePolicy, BatchKind, LoadOptions, MicroRequest, ReaderState, SampleLoader, Source};
    let d = tempfile::tempdir().unwrap();
    let data = data(d.path());
    let eval = format!(
        "eval:\n  every_steps: 2\n  data: {}\n  mmid: {}\n  max_new_tokens: 8\n  batch: 3\n",
        data.join("heldout").display(),
        data.join("eval/mmid.json").display()
    );
    let tb = d.path().join("tb");
    let two = idavlm_tests::sized_recipe(d.path(), "two", &data, 2, 2, 3, 4, &eval);
    let text = std::fs::read_to_string(&two)
        .unwrap()
        .replace("  progress_bar: false\n", &format!("  progress_bar: false\n  tensorboard: {}\n", tb.display()));
    std::fs::write(&two, text).unwrap();
    let err = idavlm_tests::run_ok(idavlm_tests::launch(&two, 2, &[]));
    assert!(err.contains("step 2 eval: loss") && err.contains("matching"), "{err}");
    let one = idavlm_tests::sized_recipe(d.path(), "one", &data, 2, 1, 2, 4, &eval);
    ok(&worker_train(&one, &[]));
    let m2 = idavlm_tests::metrics(&two.with_file_name("metrics.jsonl"));
    let m1 = idavlm_tests::metrics(&one.with_file_name("metrics.jsonl"));
    for (a, b) in m2.iter().zip(&m1) {
        let step = a["step"].as_u64().unwrap();
        for key in ["eval/loss", "eval/matching", "eval/location_acc", "eval/location_iou"] {
            if step % 2 == 1 {
                assert!(a.get(key).is_none(), "step {step} has {key}");
                continue;
            }
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!((0.0..=if key == "eval/loss" { 100.0 } else { 1.0 }).contains(&x), "{key} {x}");
            assert!((x - y).abs() <= 1e-5 * y.abs().max(1e-3), "step {step} {key}: 2 ranks {x}, 1 rank {y}");
        }
    }
    // The held-out loss of the step-4 checkpoint's model, computed here.
    let mut cfg = ModelConfig::from_file(&idavlm_tests::root().join("tests/data/micro.json")).unwrap();
    cfg.id_former = true;
    let ckpt = two.with_file_name("ckpt").join("step-00000004");
    let (params, _) = idavlm::plan::load_model(&ckpt, &cfg, tch::Device::Cpu, tch::Kind::Float).unwrap();
    let src = Source::open("heldout", &data.join("heldout")).unwrap();
    let samples: Vec<(usize, Locator)> = src.layout.locators().map(|l| (0, l)).collect();
    assert_eq!(samples.len(), 8);
    let opts =
        LoadOptions { image_size: 28, max_len: 2048, bad_image: BadImagePolicy::Fail, workers: 1, resize: Default::default() };
    let loader =
        SampleLoader::new(vec![src], std::sync::Arc::new(idavlm_shards::tokenizer::Tokenizer::load_default().unwrap()), opts);
    let req = MicroRequest { kind: BatchKind::Id, micro: 0, samples, packed: false, dropped_overlong: 0 };
    let mb = loader.build(&req, 0, ReaderState::default()).unwrap();
    let input = idavlm::step::model_input(&mb, 28, tch::Device::Cpu);
    let want = tch::no_grad(|| QwenVl::new(&cfg, &params).forward_loss(&input)).double_value(&[]);
    let got = m2[3]["eval/loss"].as_f64().unwrap();
    assert!(((got - want) / want).abs() <= 1e-5, "eval/loss {got}, the saved model's held-out loss {want}");
    // TensorBoard has the same eval/loss points.
    let (out, _) = idavlm_tests::python_script("tb_read.py", [&tb]);
    let tbv: serde_json::Value = serde_json::from_str(&out).unwrap();
    let series: Vec<(u64, f32)> =
        tbv["eval/loss"].as_array().unwrap().iter().map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap() as f32)).collect();
    let want: Vec<(u64, f32)> =
        [1usize, 3].iter().map(|&i| (m2[i]["step"].as_u64().unwrap(), m2[i]["eval/loss"].as_f64().unwrap() as f32)).collect();
    assert_eq!(series, want);
}
