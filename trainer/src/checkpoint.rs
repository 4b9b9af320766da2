//! Checkpoints: one folder per step, written as `step-NNNNNNNN.tmp/` and renamed when every rank has
//! finished, with a manifest of checksums so that a truncated or partial folder is recognised.
//!
//! Saving stalls training only to stage this rank's state into host memory (buffers allocated once,
//! pinned on GPUs, reused by every save); a background thread per rank then writes its part in 64 MiB
//! pieces on several threads, hashing each piece as it is written, and leaves a `.done` marker with
//! its size and checksum. Rank 0's thread also writes the model export, the recipe and the trainer
//! state, waits for every rank's marker, writes the manifest and renames the folder: the step folder
//! appears only when complete, so a crash mid-write leaves the previous checkpoint the newest valid
//! one. A new save first waits for the previous one. `checkpoint.async: false` (and the preemption
//! save, which also skips the model export) does the same work before returning.
//!
//! Format 2 checksums (`sha256` in the manifest) are [`crate::model::weights::tree_sha256`]: sha256 over
//! the sha256 of each 64 MiB piece, so writing and verifying run in parallel. Format 1 (whole-file
//! sha256) still verifies.
//!
//! ```text
//! step-00000500/
//!   manifest.json        step, world size, ZeRO stage, layout, files with sizes and sha256
//!   recipe.yaml          the resolved recipe
//!   trainer.json         step, AdamW step count, reader state, counters
//!   rank-00000-of-00004.safetensors   that rank's f32 master / exp_avg / exp_avg_sq partitions
//!   model/               the weights in the Hugging Face layout (SPEC §1.7), when enabled
//! ```
//! Optimizer partitions are stored with their bucket's unpadded size, so a checkpoint written by any
//! world size can be re-partitioned for another.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::model::lora::{self, LoraSpec};
use crate::model::weights::{tree_sha256, tree_sha256_bytes, write_hf, write_safetensors, Written};
use crate::recipe::ZeroStage;
use crate::zero::Sharded;
use idavlm_shards::format::sha256_file;
use idavlm_shards::reader::ReaderState;

pub const FORMAT: u32 = 2;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub step: u64,
    pub world: usize,
    /// The ZeRO stage that wrote it (the saved state is the same for every stage and world size: a run
    /// may resume under another stage).
    pub zero_stage: ZeroStage,
    pub recipe_sha256: String,
    /// (bucket, elements) of what is trained.
    pub layout: Vec<(String, usize)>,
    pub files: BTreeMap<String, FileEntry>,
}

impl From<Written> for FileEntry {
    fn from(w: Written) -> Self {
        Self { bytes: w.bytes, sha256: w.sha256 }
    }
}

/// Trainer state besides tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub adam_step: u64,
    pub reader: ReaderState,
    pub seed: u64,
    pub nonfinite_in_row: u32,
    pub nonfinite_total: u64,
    pub samples_dropped: u64,
    /// This rank's part of the last checkpoint: bytes and the seconds its background write took (for the
    /// expected preemption save time at the next start).
    #[serde(default)]
    pub last_save: Option<SaveSpeed>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SaveSpeed {
    pub bytes: u64,
    pub write_s: f64,
    pub stall_s: f64,
    /// The background write's parts (rank 0 only for the last three): this rank's optimizer part,
    /// the model export, waiting for the other ranks' parts, manifest + rename + prune.
    #[serde(default)]
    pub part_s: f64,
    #[serde(default)]
    pub model_s: f64,
    #[serde(default)]
    pub wait_s: f64,
    #[serde(default)]
    pub finish_s: f64,
}

pub fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:08}"))
}

fn rank_file(rank: usize, world: usize) -> String {
    format!("rank-{rank:05}-of-{world:05}.safetensors")
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<Written> {
    let tmp = path.with_extension("part");
    std::fs::write(&tmp, data).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    Ok(Written { bytes: data.len() as u64, sha256: tree_sha256_bytes(data) })
}

/// What a save should write.
#[derive(Clone, Debug)]
pub struct SaveOptions {
    /// The model in the Hugging Face layout (`model/`, rank 0).
    pub model: bool,
    pub keep: usize,
    /// Write in the background (return after staging) or before returning.
    pub background: bool,
    /// How long rank 0 waits for the other ranks' parts.
    pub timeout: Duration,
}

/// A save in progress or finished, as this rank sees it.
#[derive(Clone, Debug)]
pub struct Saved {
    /// The step folder (complete once rank 0's write has finished).
    pub dir: PathBuf,
    pub speed: SaveSpeed,
}

type Pending = std::thread::JoinHandle<Result<Saved>>;

/// What a call of [`Saver::save`] cost the training loop, and the saves it saw complete.
#[derive(Debug)]
pub struct Stall {
    /// Waiting for the previous save's write to finish.
    pub waited_s: f64,
    /// Copying this rank's state into host memory (and, under ZeRO-3, gathering the model).
    pub stage_s: f64,
    /// The previous save, if this call waited for it to complete.
    pub previous: Option<Saved>,
    /// This save, when it was written before returning.
    pub done: Option<Saved>,
}

impl Drop for Saver {
    fn drop(&mut self) {
        // A write in flight finishes (or fails) before the process goes on without it.
        let _ = self.wait();
    }
}

/// Checkpoint writer of one rank: staging buffers reused between saves and at most one background
/// write in flight.
pub struct Saver {
    root: PathBuf,
    staging: HashMap<String, Tensor>,
    pending: Option<Pending>,
    /// One host allocation for every staging buffer (pinned on GPUs: pinning gigabytes takes seconds,
    /// so it is allocated once, in the background from the start of the run) and the bytes handed out.
    arena: Option<std::thread::JoinHandle<Tensor>>,
    arena_ready: Option<Tensor>,
    arena_used: i64,
}

const ALIGN: i64 = 64;

fn aligned(bytes: i64) -> i64 {
    (bytes + ALIGN - 1) / ALIGN * ALIGN
}

impl Saver {
    pub fn new(root: &Path) -> Self {
        Self { root: root.to_path_buf(), staging: HashMap::new(), pending: None, arena: None, arena_ready: None, arena_used: 0 }
    }

    /// Starts allocating the host memory every save of `state` will stage into (this rank's optimizer
    /// partitions, and the model on rank 0 when `model`), pinned when the state lives on a GPU. Runs in
    /// the background: the first save finds it ready.
    pub fn prepare(&mut self, state: &Sharded, rank: usize, model: bool) {
        let mut bytes = 0i64;
        for bk in &state.layout.buckets {
            bytes += 3 * aligned(bk.valid_len(rank) as i64 * 4);
        }
        if model && rank == 0 {
            let elt = state.kind.elt_size_in_bytes() as i64;
            bytes += state.specs.iter().map(|s| aligned(s.shape.iter().product::<i64>() * elt)).sum::<i64>();
        }
        let device = state.device;
        self.arena = Some(std::thread::spawn(move || {
            let t = Tensor::empty([bytes.max(ALIGN)], (Kind::Uint8, Device::Cpu));
            if device.is_cuda() {
                t.pin_memory(device)
            } else {
                t
            }
        }));
    }

    /// Host memory for a tensor shaped like `t`: a slice of the arena when it has room, else a plain
    /// allocation.
    fn host_like(&mut self, t: &Tensor) -> Tensor {
        if let Some(h) = self.arena.take() {
            self.arena_ready = h.join().ok();
        }
        let bytes = t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        if let Some(a) = &self.arena_ready {
            if bytes > 0 && self.arena_used + aligned(bytes) <= a.size()[0] {
                let v = a.narrow(0, self.arena_used, bytes).view_dtype(t.kind()).view(t.size().as_slice());
                self.arena_used += aligned(bytes);
                return v;
            }
        }
        Tensor::empty(t.size(), (t.kind(), Device::Cpu))
    }

    /// A reused host buffer for `name` holding a copy of `t`.
    fn stage(&mut self, name: &str, t: &Tensor) -> Tensor {
        let fits = |h: &Tensor| h.size() == t.size() && h.kind() == t.kind();
        if !self.staging.get(name).is_some_and(fits) {
            let h = self.host_like(t);
            self.staging.insert(name.to_string(), h);
        }
        let h = self.staging[name].shallow_clone();
        tch::no_grad(|| h.shallow_clone().copy_(t));
        h
    }

    /// Takes a checkpoint of `trainer.step` (every rank calls this). The stall is the wait for the
    /// previous save, if it is still being written, plus the staging; with `o.background` the write goes
    /// on after this returns.
    pub fn save(
        &mut self,
        comm: &dyn Communicator,
        state: &Sharded,
        trainer: &TrainerState,
        recipe_yaml: &str,
        o: &SaveOptions,
    ) -> Result<Stall> {
        let t0 = Instant::now();
        // Saves never overlap: the previous one must be complete (and succeed) first.
        let previous = self.wait()?;
        let waited_s = t0.elapsed().as_secs_f64();
        let (rank, world) = (comm.rank(), comm.world());
        let fin = step_dir(&self.root, trainer.step);
        let tmp = self.root.join(format!("step-{:08}.tmp", trainer.step));
        if rank == 0 {
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
            }
            std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        comm.barrier()?;
        // Every rank: its optimizer partitions (trimmed of the padding past each bucket's end).
        let mut part = Vec::new();
        for (b, bk) in state.layout.buckets.iter().enumerate() {
            let valid = bk.valid_len(rank);
            let n = bk.role.name();
            for (which, t) in [("master", &state.master[b]), ("exp_avg", &state.exp_avg[b]), ("exp_avg_sq", &state.exp_avg_sq[b])]
            {
                let name = format!("{n}.{which}");
                let h = self.stage(&format!("part.{name}"), &t.narrow(0, 0, valid as i64));
                part.push((name, h));
            }
        }
        // The model export: a collective under ZeRO-3 (bucket by bucket); rank 0 keeps a host copy.
        let mut model = Vec::new();
        if o.model {
            let mut staged: HashMap<String, Tensor> = HashMap::new();
            state.visit_full(comm, &mut |name, t| {
                if rank == 0 {
                    staged.insert(name.to_string(), self.stage(&format!("model.{name}"), t));
                }
                Ok(())
            })?;
            model = state.specs.iter().filter_map(|s| staged.remove(&s.name).map(|t| (s.name.clone(), t))).collect();
        }
        let stall_s = t0.elapsed().as_secs_f64() - waited_s;
        let job = Job {
            rank,
            world,
            tmp,
            fin,
            part,
            model,
            cfg: serde_json::to_vec_pretty(&state.cfg).expect("config json"),
            lora: state.cfg.lora.clone(),
            trainer: trainer.clone(),
            recipe_yaml: recipe_yaml.to_string(),
            zero_stage: state.stage,
            layout: state.layout.fingerprint(),
            keep: o.keep,
            timeout: o.timeout,
            stall_s,
            root: self.root.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("idavlm-ckpt".into())
            .spawn(move || job.run())
            .map_err(|e| Error::Other(format!("checkpoint writer thread: {e}")))?;
        self.pending = Some(handle);
        let done = if o.background { None } else { self.wait()? };
        Ok(Stall { waited_s, stage_s: stall_s, previous, done })
    }

    /// The finished save, if the one in flight has finished (its error, if it failed); never blocks.
    pub fn poll(&mut self) -> Result<Option<Saved>> {
        if self.pending.as_ref().is_some_and(|h| h.is_finished()) {
            return self.wait();
        }
        Ok(None)
    }

    /// Waits for the save in flight, if any.
    pub fn wait(&mut self) -> Result<Option<Saved>> {
        match self.pending.take() {
            None => Ok(None),
            Some(h) => h.join().map_err(|_| Error::Other("the checkpoint writer thread panicked".into()))?.map(Some),
        }
    }
}

/// One rank's background write.
struct Job {
    rank: usize,
    world: usize,
    root: PathBuf,
    tmp: PathBuf,
    fin: PathBuf,
    part: Vec<(String, Tensor)>,
    model: Vec<(String, Tensor)>,
    cfg: Vec<u8>,
    /// LoRA runs: the adapters also go to `adapter/` in PEFT's layout, and `model/` holds the rest.
    lora: Option<LoraSpec>,
    trainer: TrainerState,
    recipe_yaml: String,
    zero_stage: ZeroStage,
    layout: Vec<(String, usize)>,
    keep: usize,
    timeout: Duration,
    stall_s: f64,
}

fn marker(rank: usize, world: usize) -> String {
    format!("rank-{rank:05}-of-{world:05}.done")
}

impl Job {
    fn run(self) -> Result<Saved> {
        let t0 = Instant::now();
        let file = rank_file(self.rank, self.world);
        let w = write_safetensors(&self.tmp.join(&file), &self.part, &HashMap::new())?;
        let mut bytes = w.bytes;
        let part_s = t0.elapsed().as_secs_f64();
        let (mut model_s, mut wait_s, mut finish_s) = (0.0, 0.0, 0.0);
        // The marker says this rank's part is complete (rank 0 reads it; it never enters the manifest).
        let done = serde_json::to_vec(&(file.clone(), &w)).expect("json");
        let mk = self.tmp.join(marker(self.rank, self.world));
        std::fs::write(mk.with_extension("part"), &done).map_err(|e| Error::io(&mk, e))?;
        std::fs::rename(mk.with_extension("part"), &mk).map_err(|e| Error::io(&mk, e))?;
        if self.rank == 0 {
            let mut files = BTreeMap::new();
            let t = Instant::now();
            if !self.model.is_empty() {
                let (adapter, base): (Vec<_>, Vec<_>) = self.model.iter().partition(|(n, _)| lora::is_adapter(n));
                let base: Vec<(String, Tensor)> = base.into_iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
                for (name, w) in write_hf(&base, &self.tmp.join("model"), 4 << 30)? {
                    bytes += w.bytes;
                    files.insert(format!("model/{name}"), w.into());
                }
                let w = write_atomic(&self.tmp.join("model").join("config.json"), &self.cfg)?;
                files.insert("model/config.json".into(), w.into());
                if let Some(spec) = &self.lora {
                    // PEFT's layout: the factors and the modules trained in full, under its key names.
                    let named: Vec<(String, Tensor)> = adapter
                        .into_iter()
                        .map(|(n, t)| (lora::peft_key(n), t.shallow_clone()))
                        .chain(base.iter().filter(|(n, _)| spec.saves(n)).map(|(n, t)| (lora::peft_key(n), t.shallow_clone())))
                        .collect();
                    let dir = self.tmp.join("adapter");
                    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                    let w = write_safetensors(&dir.join(lora::ADAPTER_WEIGHTS), &named, &HashMap::new())?;
                    bytes += w.bytes;
                    files.insert(format!("adapter/{}", lora::ADAPTER_WEIGHTS), w.into());
                    let cfg = serde_json::to_vec_pretty(&spec.peft_config()).expect("json");
                    let w = write_atomic(&dir.join(lora::ADAPTER_CONFIG), &cfg)?;
                    files.insert(format!("adapter/{}", lora::ADAPTER_CONFIG), w.into());
                }
            }
            for (name, data) in [
                ("recipe.yaml", self.recipe_yaml.as_bytes().to_vec()),
                ("trainer.json", serde_json::to_vec_pretty(&self.trainer).expect("json")),
            ] {
                let w = write_atomic(&self.tmp.join(name), &data)?;
                files.insert(name.into(), w.into());
            }
            model_s = t.elapsed().as_secs_f64();
            // Every rank's part, from its marker.
            let t = Instant::now();
            let deadline = Instant::now() + self.timeout;
            for r in 0..self.world {
                let mk = self.tmp.join(marker(r, self.world));
                let text = loop {
                    if let Ok(t) = std::fs::read(&mk) {
                        break t;
                    }
                    if Instant::now() > deadline {
                        return Err(Error::checkpoint(
                            &self.tmp,
                            format!("rank {r} did not finish its part within {} s", self.timeout.as_secs()),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                };
                let (name, w): (String, Written) =
                    serde_json::from_slice(&text).map_err(|e| Error::checkpoint(&self.tmp, format!("{}: {e}", mk.display())))?;
                files.insert(name, w.into());
                std::fs::remove_file(&mk).map_err(|e| Error::io(&mk, e))?;
            }
            wait_s = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let m = Manifest {
                format: FORMAT,
                step: self.trainer.step,
                world: self.world,
                zero_stage: self.zero_stage,
                recipe_sha256: sha256_hex(self.recipe_yaml.as_bytes()),
                layout: self.layout,
                files,
            };
            write_atomic(&self.tmp.join("manifest.json"), &serde_json::to_vec_pretty(&m).expect("json"))?;
            if self.fin.exists() {
                std::fs::remove_dir_all(&self.fin).map_err(|e| Error::io(&self.fin, e))?;
            }
            std::fs::rename(&self.tmp, &self.fin).map_err(|e| Error::io(&self.tmp, e))?;
            prune(&self.root, self.keep)?;
            finish_s = t.elapsed().as_secs_f64();
        }
        Ok(Saved {
            dir: self.fin,
            speed: SaveSpeed {
                bytes,
                write_s: t0.elapsed().as_secs_f64(),
                stall_s: self.stall_s,
                part_s,
                model_s,
                wait_s,
                finish_s,
            },
        })
    }
}

/// Keeps the newest `keep` complete checkpoints.
fn prune(root: &Path, keep: usize) -> Result<()> {
    let mut steps = list_steps(root)?;
    steps.sort();
    while steps.len() > keep {
        let (_, d) = steps.remove(0);
        std::fs::remove_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    }
    Ok(())
}

fn list_steps(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(root) else { return Ok(out) };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix("step-") {
            if let Ok(s) = n.parse::<u64>() {
                out.push((s, e.path()));
            }
        }
    }
    Ok(out)
}

/// Checks a checkpoint folder against its manifest: every file present with its size and sha256.
pub fn verify(dir: &Path) -> Result<Manifest> {
    let mp = dir.join("manifest.json");
    let text = std::fs::read_to_string(&mp).map_err(|_| Error::checkpoint(dir, "no manifest.json (incomplete checkpoint)"))?;
    let m: Manifest = serde_json::from_str(&text).map_err(|e| Error::checkpoint(dir, format!("manifest.json: {e}")))?;
    if m.format != FORMAT && m.format != 1 {
        return Err(Error::checkpoint(dir, format!("format {} (this build reads 1 and {FORMAT})", m.format)));
    }
    for (rel, fe) in &m.files {
        let p = dir.join(rel);
        let meta = std::fs::metadata(&p).map_err(|_| Error::checkpoint(dir, format!("{rel} is missing")))?;
        if meta.len() != fe.bytes {
            return Err(Error::checkpoint(
                dir,
                format!("{rel}: {} bytes, the manifest says {} (truncated?)", meta.len(), fe.bytes),
            ));
        }
        let sum = if m.format == 1 { sha256_file(&p)? } else { tree_sha256(&p)? };
        if sum != fe.sha256 {
            return Err(Error::checkpoint(dir, format!("{rel}: sha256 differs from the manifest (corrupt)")));
        }
    }
    Ok(m)
}

/// The newest checkpoint under `root` that verifies, with a line for each newer one skipped and why.
pub fn find_latest(root: &Path) -> (Option<PathBuf>, Vec<String>) {
    let mut steps = list_steps(root).unwrap_or_default();
    steps.sort();
    let mut skipped = Vec::new();
    for (_, d) in steps.into_iter().rev() {
        match verify(&d) {
            Ok(_) => return (Some(d), skipped),
            Err(e) => skipped.push(format!("skipped {}: {e}", d.display())),
        }
    }
    (None, skipped)
}

pub fn read_trainer_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join("trainer.json");
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    serde_json::from_str(&text).map_err(|e| Error::checkpoint(dir, format!("trainer.json: {e}")))
}

/// Loads optimizer state from a checkpoint written by any world size into `state` (every rank calls).
pub fn load_optimizer(dir: &Path, m: &Manifest, comm: &dyn Communicator, state: &mut Sharded, adam_step: u64) -> Result<()> {
    if m.zero_stage != state.stage || m.world != comm.world() {
        tracing::info!(
            "{} was written by {} rank(s) under ZeRO-{}; resuming on {} rank(s) under ZeRO-{}",
            dir.display(),
            m.world,
            m.zero_stage,
            comm.world(),
            state.stage
        );
    }
    if m.layout != state.layout.fingerprint() {
        return Err(Error::checkpoint(
            dir,
            format!(
                "trains {:?}, this recipe trains {:?}; resume needs the same trainable set (start a new stage from the checkpoint's model/ instead)",
                m.layout,
                state.layout.fingerprint()
            ),
        ));
    }
    // Read every rank file once (memory-mapped) and assemble each bucket's full vector.
    let files: Vec<PathBuf> = (0..m.world).map(|r| dir.join(rank_file(r, m.world))).collect();
    let maps: Vec<memmap2::Mmap> = files
        .iter()
        .map(|f| {
            let h = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
            // SAFETY: read-only map of a verified, immutable checkpoint file.
            unsafe { memmap2::Mmap::map(&h) }.map_err(|e| Error::io(f, e))
        })
        .collect::<Result<_>>()?;
    let parsed: Vec<safetensors::SafeTensors> = maps
        .iter()
        .zip(&files)
        .map(|(mm, f)| {
            safetensors::SafeTensors::deserialize(mm).map_err(|e| Error::checkpoint(dir, format!("{}: {e}", f.display())))
        })
        .collect::<Result<_>>()?;
    let cache: std::cell::RefCell<HashMap<String, Tensor>> = Default::default();
    let get = |name: &str| -> Result<Tensor> {
        if let Some(t) = cache.borrow().get(name) {
            return Ok(t.shallow_clone());
        }
        let mut parts = Vec::new();
        for (st, f) in parsed.iter().zip(&files) {
            let v = st.tensor(name).map_err(|e| Error::checkpoint(dir, format!("{}: {name}: {e}", f.display())))?;
            let shape: Vec<i64> = v.shape().iter().map(|&d| d as i64).collect();
            parts.push(Tensor::from_data_size(v.data(), &shape, Kind::Float));
        }
        let full = Tensor::cat(&parts, 0).to_device(Device::Cpu);
        cache.borrow_mut().insert(name.to_string(), full.shallow_clone());
        Ok(full)
    };
    state.load_state(comm, adam_step, &get)
}

/// The lock file that makes a checkpoint folder one run's at a time.
pub const LOCK_FILE: &str = "idavlm.lock";

/// Who holds a checkpoint folder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LockOwner {
    pub host: String,
    pub pid: u32,
    /// Unix seconds.
    pub started: u64,
    /// `SLURM_JOB_ID` of the owner, when it ran under Slurm (a requeued job keeps its id).
    #[serde(default)]
    pub slurm_job: Option<String>,
}

impl LockOwner {
    fn me() -> Self {
        Self {
            host: hostname(),
            pid: std::process::id(),
            started: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            slurm_job: std::env::var("SLURM_JOB_ID").ok().filter(|s| !s.is_empty()),
        }
    }
    fn describe(&self) -> String {
        let job = self.slurm_job.as_ref().map(|j| format!(", Slurm job {j}")).unwrap_or_default();
        format!("host {}, pid {}, started {} (unix s){job}", self.host, self.pid, self.started)
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill(pid, 0) only checks for existence and permission; it sends nothing.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// An exclusive hold on a checkpoint folder for the life of the run (rank 0 takes it). The kernel's
/// `flock` on `idavlm.lock` is released however the process ends, SIGKILL included, so a dead run's lock
/// is simply taken over (with a message naming it). Where the filesystem has no `flock`, the owner
/// recorded in the file decides: a live pid on this host, or another host's run not of this Slurm job,
/// keeps the folder.
pub struct FolderLock {
    file: std::fs::File,
}

impl FolderLock {
    /// Takes the folder or fails naming the run that holds it. Returns the lock and, when a dead run's
    /// lock was taken over, a line saying whose.
    pub fn acquire(root: &Path) -> Result<(Self, Option<String>)> {
        use std::io::{Read, Seek, Write};
        use std::os::unix::io::AsRawFd;
        std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        let path = root.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        let previous: Option<LockOwner> = serde_json::from_str(&text).ok();
        // SAFETY: flock on a file descriptor this function owns.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        let me = LockOwner::me();
        let in_use = |o: &LockOwner, how: &str| {
            Error::checkpoint(
                root,
                format!(
                    "the folder is in use by another run ({}; {how}). Two runs writing one checkpoint folder \
                     destroy each other's checkpoints: wait for that run to end, or set checkpoint.dir to another \
                     folder. If that run is gone, remove {}",
                    o.describe(),
                    path.display()
                ),
            )
        };
        if r != 0 {
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EWOULDBLOCK) => {
                    let o = previous.unwrap_or(LockOwner { host: "?".into(), pid: 0, started: 0, slurm_job: None });
                    return Err(in_use(&o, "it holds the lock"));
                }
                // No flock on this filesystem: judge by the recorded owner.
                _ => {
                    if let Some(o) = previous.as_ref().filter(|o| o.pid != me.pid || o.host != me.host) {
                        let same_job = o.slurm_job.is_some() && o.slurm_job == me.slurm_job;
                        let alive_here = o.host == me.host && pid_alive(o.pid);
                        if !same_job && (alive_here || o.host != me.host) {
                            return Err(in_use(o, &format!("this filesystem has no flock ({err})")));
                        }
                    }
                }
            }
        }
        let took_over = previous
            .filter(|o| o.pid != me.pid || o.host != me.host)
            .map(|o| format!("{}: took over the lock of a run that has ended ({})", path.display(), o.describe()));
        file.set_len(0).map_err(|e| Error::io(&path, e))?;
        file.rewind().map_err(|e| Error::io(&path, e))?;
        file.write_all(&serde_json::to_vec(&me).expect("json")).map_err(|e| Error::io(&path, e))?;
        file.sync_all().map_err(|e| Error::io(&path, e))?;
        Ok((Self { file }, took_over))
    }
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        // A clean end leaves an empty lock file (no owner to report); the flock goes with the descriptor.
        let _ = self.file.set_len(0);
    }
}
