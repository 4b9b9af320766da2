//! Nothing silently wrong: each case a hostile but realistic user found, reproduced.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use idavlm_shards::convert::{convert, ConvertOptions, OnBad};
use idavlm_shards::format::{sha256_file, Manifest};
use idavlm_tests::{bin, free_port, metrics, recipe, tokenizer, wait_for_first_step, worker_train};

use crate::train::data;

fn fails(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "expected a failure, got success:\n{err}");
    err
}

/// Rewrites index.json so that its checksums match the shards as they are now (a damaged folder whose
/// manifest was regenerated: only the content checks can catch it).
fn rehash(dir: &Path) {
    let mut m = Manifest::load(dir).unwrap();
    for sh in &mut m.shards {
        sh.sha256 = sha256_file(&dir.join(&sh.file)).unwrap();
        sh.bytes = std::fs::metadata(dir.join(&sh.file)).unwrap().len();
    }
    std::fs::write(dir.join("index.json"), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

#[test]
fn a_bit_rotted_shard_stops_training_naming_it() {
    let d = tempfile::tempdir().unwrap();
    let data = data(d.path());
    let shard = data.join("id").join(&Manifest::load(&data.join("id")).unwrap().shards[0].file);
    let mut bytes = std::fs::read(&shard).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&shard, &bytes).unwrap();
    let r = recipe(d.path(), &data, "");
    let err = fails(&worker_train(&r, &["--set", "length.steps=2", "--set", "checkpoint.at_end=false"]));
    assert!(err.contains(&shard.display().to_string()) && err.contains("sha256") && err.contains("corrupt"), "{err}");
    // The path appears once in the message, not repeated by every layer.
    let line = err.lines().find(|l| l.contains("sha256")).unwrap();
    assert_eq!(line.matches(&shard.display().to_string()).count(), 1, "{line}");
}

/// A dataset records the chat template it was tokenised for; training a model of another template on
/// it stops before any step, naming the dataset and both templates. A manifest from before the field
/// reads as Qwen-VL's (what every earlier dataset was).
#[test]
fn a_dataset_of_another_chat_template_is_refused_naming_both() {
    let d = tempfile::tempdir().unwrap();
    let data = data(d.path());
    let index = data.join("id").join("index.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
    assert_eq!(m["template"], "qwen-vl", "datasets record their template");
    m["template"] = "qwen3-vl".into();
    std::fs::write(&index, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let r = recipe(d.path(), &data, "");
    let err = fails(&worker_train(&r, &["--set", "length.steps=2", "--set", "checkpoint.at_end=false"]));
    assert!(err.contains(&index.display().to_string()) && err.contains("qwen3-vl") && err.contains("reads qwen-vl"), "{err}");
    assert!(!d.path().join("metrics.jsonl").exists() || metrics(&d.path().join("metrics.jsonl")).is_empty(), "no step ran");
    // The field absent (an older dataset): Qwen-VL's.
    m.as_object_mut().unwrap().remove("template");
    std::fs::write(&index, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    assert_eq!(Manifest::load(&data.join("id")).unwrap().template, "qwen-vl");
}

#[test]
fn verify_checks_magic_bytes_and_schema_not_only_checksums() {
    let d = tempfile::tempdir().unwrap();
    let data = data(d.path());
    let verify = |dir: &Path| Command::new(bin("idavlm-shards")).arg("verify").arg(dir).output().unwrap();
    assert!(verify(&data.join("id")).status.success());
    // Broken magic bytes, manifest rehashed.
    let dir = data.join("general");
    let shard = dir.join(&Manifest::load(&dir).unwrap().shards[0].file);
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[..4].copy_from_slice(b"PAR0");
    std::fs::write(&shard, &bytes).unwrap();
    rehash(&dir);
    let out = verify(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("magic") && err.contains(&shard.display().to_string()), "{err}");
    // A Parquet file of another schema in place of a shard, manifest rehashed.
    let dir = data.join("id");
    let shard = dir.join(&Manifest::load(&dir).unwrap().shards[0].file);
    let schema = Arc::new(arrow::datatypes::Schema::new(vec![arrow::datatypes::Field::new(
        "id",
        arrow::datatypes::DataType::Int64,
        false,
    )]));
    let batch =
        arrow::array::RecordBatch::try_new(schema.clone(), vec![Arc::new(arrow::array::Int64Array::from(vec![1i64, 2, 3]))])
            .unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&shard).unwrap(), schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    rehash(&dir);
    let out = verify(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("schema") && err.contains("found:") && err.contains("expected:"), "{err}");
    // The reader refuses it too, at open.
    let e = idavlm_shards::reader::Source::open("id", &dir).unwrap_err().to_string();
    assert!(e.contains("schema"), "{e}");
}

#[test]
fn convert_refuses_truncated_images_and_paths_outside_the_image_root() {
    let d = tempfile::tempdir().unwrap();
    let imgs = d.path().join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    let jpeg = idavlm_shards::synth::photo_jpeg(64, 48, 3);
    std::fs::write(imgs.join("ok.jpg"), &jpeg).unwrap();
    std::fs::write(imgs.join("cut.jpg"), &jpeg[..jpeg.len() * 2 / 3]).unwrap();
    std::fs::write(d.path().join("outside.jpg"), &jpeg).unwrap();
    let row = |id: &str, img: &str| serde_json::json!({"id": id, "conversations": [{"from": "user", "value": format!("<img>{img}</img> what?")}, {"from": "assistant", "value": "a square"}]});
    let rows = vec![row("good", "ok.jpg"), row("cut", "cut.jpg"), row("escape", "../outside.jpg"), row("abs", "/etc/hostname")];
    let json = d.path().join("d.json");
    std::fs::write(&json, serde_json::to_vec(&rows).unwrap()).unwrap();
    let o = ConvertOptions {
        source: "t".into(),
        max_len: 2048,
        target_shard_bytes: 1 << 20,
        row_group_rows: 4,
        on_bad: OnBad::Fail,
        workers: 1,
    };
    let r = convert(&json, &imgs, &d.path().join("out"), tokenizer(), &o).unwrap();
    let reason = |id: &str| r.bad.iter().find(|b| b.id == id).map(|b| b.reason.clone()).unwrap_or_default();
    assert_eq!(r.bad.len(), 3, "{:?}", r.bad);
    assert!(reason("cut").contains("truncated") && reason("cut").contains("cut.jpg"), "{}", reason("cut"));
    assert!(reason("escape").contains("leaves the image root"), "{}", reason("escape"));
    assert!(reason("abs").contains("leaves the image root"), "{}", reason("abs"));
}

#[test]
fn resume_auto_refuses_to_restart_from_scratch_when_no_checkpoint_verifies() {
    let d = tempfile::tempdir().unwrap();
    let r = recipe(d.path(), &data(d.path()), "");
    let out = worker_train(&r, &["--set", "length.steps=2", "--set", "checkpoint.every_steps=1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for s in ["step-00000001", "step-00000002"] {
        let f = d.path().join("ckpt").join(s).join("rank-00000-of-00001.safetensors");
        let bytes = std::fs::read(&f).unwrap();
        std::fs::write(&f, &bytes[..bytes.len() - 10]).unwrap();
    }
    let err = fails(&worker_train(&r, &["--set", "length.steps=3"]));
    assert!(err.contains("none verifies") && err.contains("step-00000001") && err.contains("step-00000002"), "{err}");
    assert!(err.contains("truncated") && err.contains("--resume none"), "{err}");
    assert!(idavlm_tests::losses(&d.path().join("metrics.jsonl")).len() == 2, "the refused run trained");
    // Asked for explicitly, a fresh start is allowed.
    let out = worker_train(&r, &["--set", "length.steps=1", "--resume", "none", "--set", "checkpoint.at_end=false"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_checkpoint_folder_is_one_runs_at_a_time_and_a_dead_owner_is_taken_over() {
    let d = tempfile::tempdir().unwrap();
    let r = recipe(d.path(), &data(d.path()), "");
    let mut first = idavlm_tests::worker_command(&r, &["--set", "length.steps=400"]).stderr(Stdio::null()).spawn().unwrap();
    wait_for_first_step(&d.path().join("metrics.jsonl"), 120);
    let second = worker_train(&r, &["--set", "length.steps=2", "--set", "logging.metrics_file=null"]);
    let err = fails(&second);
    assert!(err.contains("in use by another run") && err.contains(&format!("pid {}", first.id())), "{err}");
    // The first run is unharmed: it stops on SIGTERM with its checkpoint as usual.
    idavlm_tests::send_signal(first.id(), 15);
    assert_eq!(first.wait().unwrap().code(), Some(75));
    let (latest, skipped) = idavlm::checkpoint::find_latest(&d.path().join("ckpt"));
    assert!(latest.is_some() && skipped.is_empty(), "{skipped:?}");
    // A lock left by a process that is gone (here: a finished child's pid) is taken over, with a message.
    let gone = Command::new("true").spawn().unwrap();
    let pid = gone.id();
    let _ = { gone }.wait();
    let owner = serde_json::json!({"host": std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim(), "pid": pid, "started": 1});
    std::fs::write(d.path().join("ckpt").join(idavlm::checkpoint::LOCK_FILE), owner.to_string()).unwrap();
    let out = worker_train(&r, &["--set", "checkpoint.at_end=false"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("took over the lock") && err.contains(&format!("pid {pid}")), "{err}");
}

#[test]
fn sigterm_during_start_up_exits_75() {
    let d = tempfile::tempdir().unwrap();
    let r = recipe(d.path(), &data(d.path()), "");
    let port = free_port();
    let rank = |k: usize| -> std::process::Child {
        Command::new(bin("idavlm-worker"))
            .arg("train")
            .arg(&r)
            .args(["--comm", "tcp"])
            .env("IDAVLM_TORCH_THREADS", "1")
            .env("RANK", k.to_string())
            .env("WORLD_SIZE", "2")
            .env("LOCAL_RANK", k.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Rank 0 alone waits in the rendezvous (rank 1 is not started yet): it is still starting up.
    let r0 = rank(0);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    idavlm_tests::send_signal(r0.id(), 15);
    let r1 = rank(1);
    for (k, c) in [(0, r0), (1, r1)] {
        let out = c.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(75), "rank {k}:\n{err}");
        if k == 0 {
            assert!(err.contains("during start-up"), "{err}");
        }
    }
    assert!(idavlm_tests::losses(&d.path().join("metrics.jsonl")).is_empty(), "no step ran");
}

#[test]
fn a_max_len_that_cuts_every_answer_drops_the_samples_and_stops_clearly() {
    let d = tempfile::tempdir().unwrap();
    let r = recipe(d.path(), &data(d.path()), "");
    let err = fails(&worker_train(&r, &["--set", "data.max_len=10", "--set", "length.steps=2"]));
    assert!(err.contains("leave no answer token") && err.contains("every sample of the global batch was dropped"), "{err}");
    // A max length that keeps part of each answer trains (the samples are truncated, not dropped).
    let out = worker_train(&r, &["--set", "data.max_len=2048", "--set", "length.steps=1", "--set", "checkpoint.at_end=false"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn recipe_values_are_checked_and_set_indexes_lists() {
    let d = tempfile::tempdir().unwrap();
    let r = recipe(d.path(), &d.path().join("data"), "");
    let text = std::fs::read_to_string(&r).unwrap();
    let line_of = |needle: &str| text.lines().position(|l| l.starts_with(needle)).unwrap() + 1;
    // beta = 1 would run into NaN.
    let e = idavlm::recipe::load(&r, &["optimizer.betas=[1.0, 0.95]".into()]).unwrap_err().to_string();
    assert!(e.contains("optimizer.betas") && e.contains("[0, 1)"), "{e}");
    // List indices in --set, as stage1.yaml's header documents.
    let c = idavlm::recipe::load(&r, &["data.sources.0.path=/elsewhere/id".into()]).unwrap();
    assert_eq!(c.data.sources[0].path, PathBuf::from("/elsewhere/id"));
    let e = idavlm::recipe::load(&r, &["data.sources.3.path=x".into()]).unwrap_err().to_string();
    assert!(e.contains("data.sources has 1 item(s), no index 3"), "{e}");
    // A missing field names the file and the line of the mapping that lacks it.
    std::fs::write(&r, text.replace("  lr: 1.0e-3\n", "")).unwrap();
    let e = idavlm::recipe::load(&r, &[]).unwrap_err().to_string();
    assert!(e.contains("missing field `lr`") && e.contains(&format!("recipe.yaml:{}", line_of("optimizer:"))), "{e}");
    // LoRA: targets that would adapt vision-tower linears, and a `trainable` section it would ignore.
    std::fs::write(&r, &text).unwrap();
    let e = idavlm::recipe::load(&r, &["lora.targets=[c_proj]".into()]).unwrap_err().to_string();
    assert!(e.contains("`lora.targets` (--set lora.targets=[c_proj])") && e.contains("resblocks.0.mlp.c_proj"), "{e}");
    let e = idavlm::recipe::load(&r, &["lora.r=8".into(), "trainable.include=[\"lm_head.*\"]".into()]).unwrap_err().to_string();
    assert!(e.contains("`trainable`") && e.contains("lora.modules_to_save"), "{e}");
    let e = idavlm::recipe::load(&r, &["activation_checkpointing=some".into()]).unwrap_err().to_string();
    assert!(e.contains("`activation_checkpointing`") && e.contains("auto, full, none"), "{e}");
    let e = idavlm::recipe::load(&r, &["logging.trace.step=0".into(), "logging.trace.dir=t".into()]).unwrap_err().to_string();
    assert!(e.contains("logging.trace.step") && e.contains("from 1"), "{e}");
    let e = idavlm::recipe::load(&r, &["logging.trace.step=3".into()]).unwrap_err().to_string();
    assert!(e.contains("missing field `dir`"), "{e}");
    // The recipe documented in stage1.yaml's header: its --set line works as written there.
    let s1 = idavlm_tests::root().join("recipes/stage1.yaml");
    let header = std::fs::read_to_string(&s1).unwrap();
    let set = header.lines().find(|l| l.contains("--set data.sources.0.path=")).expect("stage1.yaml documents the override");
    let arg = set.split("--set ").nth(1).unwrap().split_whitespace().next().unwrap();
    let c = idavlm::recipe::load(&s1, &[arg.to_string()]).unwrap();
    assert_eq!(c.data.sources[0].path.to_string_lossy(), arg.split_once('=').unwrap().1);
}

/// The `.tmp` step folders present now.
fn tmp_folders(ckpt: &Path) -> Vec<String> {
    std::fs::read_dir(ckpt)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.ends_with(".tmp")).collect())
        .unwrap_or_default()
}

#[test]
fn checkpoints_are_written_in_the_background_never_overlap_and_survive_a_kill_mid_write() {
    let d = tempfile::tempdir().unwrap();
    let r = recipe(d.path(), &data(d.path()), "");
    let (ckpt, metrics) = (d.path().join("ckpt"), d.path().join("metrics.jsonl"));
    let spawn = |steps: u64| {
        idavlm_tests::worker_command(&r, &["--set", &format!("length.steps={steps}"), "--set", "checkpoint.every_steps=1"])
            .env("IDAVLM_CKPT_WRITE_DELAY_MS", "700")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // 1. Every step saves, each write slowed down: training goes on while a write runs, and at most
    // one save is ever in flight.
    let mut child = spawn(5);
    let (mut most_tmp, mut overlapped) = (0, false);
    while child.try_wait().unwrap().is_none() {
        let tmp = tmp_folders(&ckpt);
        most_tmp = most_tmp.max(tmp.len());
        if let Some(t) = tmp.first() {
            let step: u64 = t.trim_start_matches("step-").trim_end_matches(".tmp").parse().unwrap();
            overlapped |= idavlm_tests::losses(&metrics).iter().any(|(s, _)| *s > step);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(most_tmp, 1, "saves overlapped");
    assert!(overlapped, "no step ran while a checkpoint was being written:\n{err}");
    assert!(err.contains("written in the background") && err.contains("complete:"), "{err}");
    for s in 1..=5 {
        idavlm::checkpoint::verify(&idavlm::checkpoint::step_dir(&ckpt, s)).unwrap();
    }
    // 2. Killed (SIGKILL) while step 7's part is being written: the folder never appears, and
    // --resume auto continues from step 6, the newest complete one.
    let mut child = spawn(20);
    let t = std::time::Instant::now();
    while !tmp_folders(&ckpt).contains(&"step-00000007.tmp".to_string()) {
        assert!(t.elapsed().as_secs() < 120, "step 7's save never started");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap();
    let _ = child.wait();
    let (latest, _) = idavlm::checkpoint::find_latest(&ckpt);
    assert_eq!(latest, Some(idavlm::checkpoint::step_dir(&ckpt, 6)));
    let out = worker_train(&r, &["--set", "length.steps=8", "--set", "checkpoint.at_end=false"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("resumed from") && err.contains("step-00000006"), "{err}");
}
