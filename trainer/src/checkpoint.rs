//! Checkpoints: one folder per step, written as `step-NNNNNNNN.tmp/` and renamed when every rank has
//! finished, with a manifest of sha256 checksums so that a truncated or partial folder is recognised.
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

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::model::weights::save_hf;
use crate::zero::Sharded;
use idavlm_shards::format::sha256_file;
use idavlm_shards::reader::ReaderState;

pub const FORMAT: u32 = 1;

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
    pub zero_stage: u8,
    pub recipe_sha256: String,
    /// (bucket, elements) of what is trained.
    pub layout: Vec<(String, usize)>,
    pub files: BTreeMap<String, FileEntry>,
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

fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("part");
    std::fs::write(&tmp, data).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Writes a checkpoint of `step`; every rank calls this. Returns the final folder.
#[allow(clippy::too_many_arguments)]
pub fn save(
    root: &Path,
    comm: &dyn Communicator,
    state: &Sharded,
    trainer: &TrainerState,
    recipe_yaml: &str,
    save_model: bool,
    keep: usize,
) -> Result<PathBuf> {
    let (rank, world) = (comm.rank(), comm.world());
    let fin = step_dir(root, trainer.step);
    let tmp = root.join(format!("step-{:08}.tmp", trainer.step));
    if rank == 0 {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    comm.barrier()?;
    // Every rank: its optimizer partitions (trimmed of the padding past each bucket's end).
    let mut named = Vec::new();
    for (b, bk) in state.layout.buckets.iter().enumerate() {
        let start = rank * bk.shard;
        let valid = bk.numel.saturating_sub(start).min(bk.shard);
        let n = bk.role.name();
        for (which, t) in [("master", &state.master[b]), ("exp_avg", &state.exp_avg[b]), ("exp_avg_sq", &state.exp_avg_sq[b])] {
            named.push((format!("{n}.{which}"), t.narrow(0, 0, valid as i64)));
        }
    }
    let file = tmp.join(rank_file(rank, world));
    let parts: Vec<(String, Tensor)> = named;
    save_hf_file(&parts, &file)?;
    if save_model {
        // A collective under ZeRO-3: every rank gathers, rank 0 writes.
        let full = state.full_named(comm)?;
        if rank == 0 {
            save_hf(&full, &tmp.join("model"), state.kind, 4 << 30)?;
            let cfg = serde_json::to_vec_pretty(&state.cfg).expect("config json");
            write_atomic(&tmp.join("model").join("config.json"), &cfg)?;
        }
    }
    comm.barrier()?;
    if rank == 0 {
        write_atomic(&tmp.join("recipe.yaml"), recipe_yaml.as_bytes())?;
        write_atomic(&tmp.join("trainer.json"), &serde_json::to_vec_pretty(trainer).expect("json"))?;
        let mut files = BTreeMap::new();
        for rel in list_files(&tmp)? {
            let p = tmp.join(&rel);
            let bytes = std::fs::metadata(&p).map_err(|e| Error::io(&p, e))?.len();
            files.insert(rel, FileEntry { bytes, sha256: sha256_file(&p)? });
        }
        let m = Manifest {
            format: FORMAT,
            step: trainer.step,
            world,
            zero_stage: state.stage,
            recipe_sha256: sha256_hex(recipe_yaml.as_bytes()),
            layout: state.layout.fingerprint(),
            files,
        };
        write_atomic(&tmp.join("manifest.json"), &serde_json::to_vec_pretty(&m).expect("json"))?;
        if fin.exists() {
            std::fs::remove_dir_all(&fin).map_err(|e| Error::io(&fin, e))?;
        }
        std::fs::rename(&tmp, &fin).map_err(|e| Error::io(&tmp, e))?;
        prune(root, keep)?;
    }
    comm.barrier()?;
    Ok(fin)
}

fn save_hf_file(named: &[(String, Tensor)], file: &Path) -> Result<()> {
    let dir = file.parent().expect("rank file has a folder");
    let tmpdir = dir.join(format!(".{}", file.file_name().expect("name").to_string_lossy()));
    save_hf(named, &tmpdir, Kind::Float, usize::MAX)?;
    std::fs::rename(tmpdir.join(crate::model::weights::SINGLE_FILE), file).map_err(|e| Error::io(file, e))?;
    std::fs::remove_dir_all(&tmpdir).map_err(|e| Error::io(&tmpdir, e))
}

fn list_files(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) -> Result<()> {
        for e in std::fs::read_dir(d).map_err(|e| Error::io(d, e))? {
            let e = e.map_err(|e| Error::io(d, e))?;
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out)?;
            } else {
                out.push(p.strip_prefix(base).expect("under base").to_string_lossy().into_owned());
            }
        }
        Ok(())
    }
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
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
    if m.format != FORMAT {
        return Err(Error::checkpoint(dir, format!("format {} (this build reads {FORMAT})", m.format)));
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
        if sha256_file(&p)? != fe.sha256 {
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

