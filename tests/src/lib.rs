//! Helpers shared by the integration tests: the built binaries, the project venv's python, small
//! synthetic datasets and recipes written into temporary folders.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use idavlm_shards::chat::{encode_conversation, Overflow};
use idavlm_shards::synth::{write_synth, SynthOptions};
use idavlm_shards::tokenizer::Tokenizer;

pub mod judge_server;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the repo").to_path_buf()
}

/// A binary of the workspace (built by `cargo build --workspace` before the tests run).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/..");
    let p = dir.join(name);
    assert!(p.is_file(), "{} not built: run `cargo build --workspace` first (make test does)", p.display());
    p
}

/// The project venv's python (scripts/setup.sh), with torch, numpy, PIL, safetensors.
pub fn python() -> PathBuf {
    let p = std::env::var("IDAVLM_PYTHON").map(PathBuf::from).unwrap_or_else(|_| root().join(".venv/bin/python"));
    assert!(p.is_file(), "{} missing: run `bash scripts/setup.sh` (make test does)", p.display());
    p
}

pub fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| Tokenizer::load_default().expect("tokenizer: run scripts/setup.sh"))
}

/// A checkpoint-shaped folder of the tiny model with the ID-Former (f32 safetensors + config.json),
/// random weights from seed 5: what `idavlm-infer --checkpoint` reads.
pub fn tiny_checkpoint(dir: &Path) {
    use idavlm::model::weights::save_params;
    use idavlm::model::{ModelConfig, ParamSet};
    let mut cfg = ModelConfig::tiny();
    cfg.id_former = true;
    let p = ParamSet::init(&cfg, tch::Device::Cpu, tch::Kind::Float, 5);
    save_params(&p, dir, tch::Kind::Float, usize::MAX).expect("save the tiny checkpoint");
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&cfg).expect("json")).expect("write config.json");
}

/// Writes a small synthetic dataset (id + general + eval) into `dir`.
pub fn synth(dir: &Path, id_samples: usize, general_samples: usize, row_group: usize) {
    let o = SynthOptions {
        seed: 7,
        cast_size: 8,
        id_samples,
        general_samples,
        heldout_samples: 8,
        eval_per_type: 4,
        row_group_rows: row_group,
        target_shard_bytes: 256 << 10,
        ..Default::default()
    };
    let tok = tokenizer();
    write_synth(dir, &o, &|turns| Ok(encode_conversation(tok, "t", turns, usize::MAX, Overflow::Reject)?.input_ids.len() as i32))
        .expect("synth");
}

/// A training recipe over the micro test model (tests/data/micro.json) and the dataset in `data`.
pub fn recipe(dir: &Path, data: &Path, extra: &str) -> PathBuf {
    let cfg = root().join("tests/data/micro.json");
    let text = format!(
        "model:\n  config: {cfg}\n  id_former: true\n  dtype: f32\n\
data:\n  sources:\n    - name: id\n      path: {id}\n  general:\n    name: general\n    path: {gen}\n  inject_probability: 0.0\n  max_len: 2048\n  workers: 1\n\
optimizer:\n  lr: 1.0e-3\n  weight_decay: 0.1\n  clip_grad_norm: 1.0\n\
schedule:\n  kind: warmup_log\n  warmup_steps: 2\n\
batch:\n  micro: 1\n  accum: 2\n\
zero:\n  stage: 2\n\
checkpoint:\n  dir: {ckpt}\n  keep: 10\n\
logging:\n  metrics_file: {metrics}\n  progress_bar: false\n\
seed: 11\n\
length:\n  steps: 4\n{extra}",
        cfg = cfg.display(),
        id = data.join("id").display(),
        gen = data.join("general").display(),
        ckpt = dir.join("ckpt").display(),
        metrics = dir.join("metrics.jsonl").display(),
    );
    let p = dir.join("recipe.yaml");
    std::fs::write(&p, text).expect("write recipe");
    p
}

/// [`recipe`] in its own folder `root/name`, for `world` ranks at a global batch of `global` micro-batches
/// of one sample, with the ZeRO stage and step count given and `extra` appended.
#[allow(clippy::too_many_arguments)]
pub fn sized_recipe(
    root: &Path,
    name: &str,
    data: &Path,
    global: usize,
    world: usize,
    stage: u8,
    steps: u64,
    extra: &str,
) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).expect("recipe folder");
    let r = recipe(&d, data, extra);
    let t = std::fs::read_to_string(&r)
        .expect("recipe")
        .replace("  accum: 2", &format!("  accum: {}", global / world))
        .replace("  stage: 2", &format!("  stage: {stage}"))
        .replace("  steps: 4", &format!("  steps: {steps}"));
    std::fs::write(&r, t).expect("write recipe");
    r
}

/// The records of a metrics JSONL file (none when it does not exist).
pub fn metrics(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(|l| serde_json::from_str(l).expect("json line")).collect()
}

/// Losses per step from a metrics JSONL file.
pub fn losses(path: &Path) -> Vec<(u64, f64)> {
    metrics(path).iter().map(|v| (v["step"].as_u64().expect("step"), v["loss"].as_f64().unwrap_or(f64::NAN))).collect()
}

/// Runs `tests/python/SCRIPT` with the project venv's python; returns its stdout and stderr, asserting
/// that it succeeded.
pub fn python_script<A: AsRef<std::ffi::OsStr>>(script: &str, args: impl IntoIterator<Item = A>) -> (String, String) {
    let o = Command::new(python()).arg(root().join("tests/python").join(script)).args(args).output().expect("run python");
    let (out, err) = (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
    assert!(o.status.success(), "{script} failed ({:?}):\n{out}\n{err}", o.status.code());
    (out, err)
}

/// The command of `idavlm-worker train` as one process (world 1), CPU, one torch thread.
pub fn worker_command(recipe: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(bin("idavlm-worker"));
    c.arg("train").arg(recipe).args(extra).env("IDAVLM_TORCH_THREADS", "1").env_remove("RANK").env_remove("WORLD_SIZE");
    c
}

/// [`worker_command`], run to its end.
pub fn worker_train(recipe: &Path, extra: &[&str]) -> std::process::Output {
    worker_command(recipe, extra).output().expect("run worker")
}

/// `idavlm-infer` over a benchmark with a short answer budget.
pub fn infer(checkpoint: &Path, bench: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(bin("idavlm-infer"))
        .arg("--checkpoint")
        .arg(checkpoint)
        .arg("--bench")
        .arg(bench)
        .arg("--out")
        .arg(out)
        .args(["--max-new-tokens", "8"])
        .args(extra)
        .output()
        .expect("run idavlm-infer")
}

/// `idavlm-launch --nproc-per-node n` on a free port.
pub fn launch(recipe: &Path, n: usize, extra: &[&str]) -> Command {
    let mut c = Command::new(bin("idavlm-launch"));
    c.arg("--nproc-per-node").arg(n.to_string()).arg("--master-port").arg(free_port().to_string()).arg(recipe).args(extra);
    c.env("IDAVLM_TORCH_THREADS", "1");
    c
}

/// A port nobody listens on, for a launcher's rendezvous. Taken below Linux's ephemeral range (32768 and
/// up): a port the kernel hands out (`bind(0)`, or the source port of any test's outgoing connection) can
/// be taken by another test between this check and the launcher's own bind, which failed a CI run with
/// "Address already in use". A per-process counter keeps two tests of one run apart; the process id
/// spreads runs.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(37) % SPAN;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < SPAN, "no free port in {LOW}..{}", LOW + SPAN);
        let port = (LOW + (start + n) % SPAN) as u16;
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
}

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

/// Sends signal `sig` to process `pid` (a child these tests started).
pub fn send_signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory effects; a pid that is gone only makes it return an error.
    unsafe {
        kill(pid as i32, sig);
    }
}

/// Every tensor of a safetensors file (f32 expected) by name.
pub fn read_f32(path: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).expect("read safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse safetensors");
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()))
        .collect()
}

/// Runs a command to success; returns its stderr (the failure message shows both streams).
pub fn run_ok(mut c: Command) -> String {
    let out = c.output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "failed ({:?}):\n{err}\n{}", out.status.code(), String::from_utf8_lossy(&out.stdout));
    err
}

/// Optimizer state of a checkpoint as full vectors (rank files concatenated in rank order).
pub fn ckpt_state(ckpt: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let m = idavlm::checkpoint::verify(ckpt).expect("checkpoint verifies");
    let mut out: std::collections::BTreeMap<String, Vec<f32>> = Default::default();
    for r in 0..m.world {
        for (k, v) in read_f32(&ckpt.join(format!("rank-{r:05}-of-{:05}.safetensors", m.world))) {
            out.entry(k).or_default().extend(v);
        }
    }
    out
}

/// Equal key sets and, per key, max |a - b| <= 1e-5 of the largest |a|.
pub fn assert_state_close(
    a: &std::collections::BTreeMap<String, Vec<f32>>,
    b: &std::collections::BTreeMap<String, Vec<f32>>,
    what: &str,
) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}: keys");
    for (k, va) in a {
        let vb = &b[k];
        assert_eq!(va.len(), vb.len(), "{what}: {k} length");
        let scale = va.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
        let diff = va.iter().zip(vb).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff / scale <= 1e-5, "{what}: {k} differs by {diff} (scale {scale})");
    }
}

/// The same steps, each loss within 1e-5 relative.
pub fn assert_losses_close(a: &[(u64, f64)], b: &[(u64, f64)], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: step counts");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.0, y.0, "{what}: steps");
        assert!(((x.1 - y.1) / y.1).abs() <= 1e-5, "{what}: step {} loss {} vs {}", x.0, x.1, y.1);
    }
}

/// Waits until a run has logged its first optimizer step (its metrics file has a line), at most `secs`.
pub fn wait_for_first_step(metrics: &Path, secs: u64) {
    let t = std::time::Instant::now();
    while losses(metrics).is_empty() {
        assert!(t.elapsed() < std::time::Duration::from_secs(secs), "no step within {secs} s");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
