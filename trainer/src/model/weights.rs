//! Hugging Face safetensors I/O by the names of SPEC §1.7: one file or shards with
//! `model.safetensors.index.json`, any of bf16/f16/f32 converted to the target dtype. Missing and
//! unexpected keys fail by name, except the ID-Former's, which are created (zero `out_proj`) when absent.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use tch::{Device, Kind, Tensor};

use super::{init_tensor, param_specs, ModelConfig, ParamSet, Part};
use crate::error::{Error, Result};

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";

/// The safetensors files of a checkpoint path (a file, or a folder with an index or one file), and for
/// sharded folders the name -> file map of the index.
fn checkpoint_files(path: &Path) -> Result<(Vec<PathBuf>, Option<HashMap<String, String>>)> {
    if path.is_file() {
        return Ok((vec![path.to_path_buf()], None));
    }
    let index = path.join(INDEX_FILE);
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::weights(&index, format!("invalid JSON: {e}")))?;
        let map =
            v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::weights(&index, "no \"weight_map\" object"))?;
        let mut wm = HashMap::new();
        let mut files: Vec<String> = Vec::new();
        for (k, f) in map {
            let f = f.as_str().ok_or_else(|| Error::weights(&index, format!("weight_map[{k:?}] is not a string")))?;
            if !files.iter().any(|x| x == f) {
                files.push(f.to_string());
            }
            wm.insert(k.clone(), f.to_string());
        }
        files.sort();
        return Ok((files.iter().map(|f| path.join(f)).collect(), Some(wm)));
    }
    let single = path.join(SINGLE_FILE);
    if single.is_file() {
        return Ok((vec![single], None));
    }
    Err(Error::weights(path, format!("neither {INDEX_FILE} nor {SINGLE_FILE} found")))
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F32 => Some(Kind::Float),
        Dtype::BF16 => Some(Kind::BFloat16),
        Dtype::F16 => Some(Kind::Half),
        _ => None,
    }
}

fn tensor_from_view(view: &TensorView<'_>, file: &Path, name: &str) -> Result<Tensor> {
    let kind = kind_of(view.dtype())
        .ok_or_else(|| Error::weights(file, format!("{name}: dtype {:?} is not bf16, f16 or f32", view.dtype())))?;
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    Ok(Tensor::from_data_size(view.data(), &shape, kind))
}

/// What loading found besides the expected keys.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub created_id_former: Vec<String>,
    /// LoRA factors created because the checkpoint has none.
    pub created_lora: usize,
    /// Adapters of a PEFT folder loaded into the model's own factors, and merged into base weights
    /// (filled by [`crate::plan::load_model`]).
    pub adapters_loaded: usize,
    pub adapters_merged: usize,
}

/// Loads weights for `cfg` from a HF checkpoint into `kind` on `device`.
pub fn load_hf(path: &Path, cfg: &ModelConfig, device: Device, kind: Kind) -> Result<(ParamSet, LoadReport)> {
    load_specs(path, param_specs(cfg), &[], device, kind)
}

/// Loads the tensors of a weight table from a HF checkpoint: every spec by name and shape, the
/// ID-Former and LoRA factors created when absent, `ignored` keys skipped (a tied head saved anyway),
/// any other key an error.
pub fn load_specs(
    path: &Path,
    specs: Vec<super::ParamSpec>,
    ignored: &[&str],
    device: Device,
    kind: Kind,
) -> Result<(ParamSet, LoadReport)> {
    let (files, index) = checkpoint_files(path)?;
    let wanted: HashMap<&str, usize> = specs.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
    let mut tensors: Vec<Option<Tensor>> = (0..specs.len()).map(|_| None).collect();
    let mut unexpected = Vec::new();
    let mut seen_in_files = HashSet::new();
    for file in &files {
        let f = File::open(file).map_err(|e| Error::io(file, e))?;
        // SAFETY: the file is opened read-only and not modified while mapped (checkpoints are immutable
        // once written); the map lives only inside this loop iteration.
        let mmap = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(file, e))?;
        let st = SafeTensors::deserialize(&mmap)
            .map_err(|e| Error::weights(file, format!("not a readable safetensors file (truncated or corrupt?): {e}")))?;
        for (name, view) in st.tensors() {
            seen_in_files.insert(name.clone());
            if ignored.contains(&name.as_str()) {
                continue;
            }
            let Some(&i) = wanted.get(name.as_str()) else {
                // The original keeps non-persistent buffers out of checkpoints; anything else is a mismatch.
                unexpected.push(name);
                continue;
            };
            let spec = &specs[i];
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if shape != spec.shape {
                return Err(Error::weights(file, format!("{name}: shape {shape:?}, the config expects {:?}", spec.shape)));
            }
            let t = tensor_from_view(&view, file, &name)?;
            tensors[i] = Some(t.to_device(device).to_kind(kind));
        }
    }
    if let Some(index) = &index {
        let missing_from_files: Vec<&String> = index.keys().filter(|k| !seen_in_files.contains(*k)).collect();
        if let Some(k) = missing_from_files.first() {
            return Err(Error::weights(path, format!("{INDEX_FILE} maps {k} to {}, which does not contain it", index[*k])));
        }
    }
    unexpected.sort();
    if !unexpected.is_empty() {
        return Err(Error::weights(path, format!("unexpected keys for this config: {}", unexpected.join(", "))));
    }
    let mut report = LoadReport::default();
    let mut missing = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        if tensors[i].is_some() {
            continue;
        }
        match spec.part {
            // IDA-VLM's ID-Former is new in stage 2: created with its init rule (zero out_proj).
            Part::IdFormer => {
                tracing::info!("{}: not in the checkpoint, created ({:?})", spec.name, spec.init);
                report.created_id_former.push(spec.name.clone());
            }
            // New adapters on a base model: A drawn (from libtorch's generator, seeded by the caller),
            // B zero, so the adapted model starts as the base.
            Part::Lora => report.created_lora += 1,
            _ => {
                missing.push(spec.name.clone());
                continue;
            }
        }
        tensors[i] = Some(tch::no_grad(|| init_tensor(spec, device).to_kind(kind)));
    }
    if !missing.is_empty() {
        return Err(Error::weights(path, format!("missing keys: {}", missing.join(", "))));
    }
    Ok((ParamSet::from_tensors(specs, tensors.into_iter().map(Option::unwrap).collect()), report))
}

/// Chunk of the parallel writer and of the checkpoint checksum: files are written and hashed in
/// independent 64 MiB pieces, several at a time.
pub const CHUNK: usize = 64 << 20;

/// What a written file is, for manifests: its size and its chunked checksum ([`tree_sha256`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Written {
    pub bytes: u64,
    pub sha256: String,
}

fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

/// The checksum of checkpoint files (format 2): sha256 over the concatenated sha256 digests of each
/// [`CHUNK`]-sized piece of the file, so that writing and verifying hash pieces in parallel. An empty
/// file hashes no piece.
fn tree_digest(pieces: &[[u8; 32]]) -> String {
    let cat: Vec<u8> = pieces.iter().flatten().copied().collect();
    hex::encode(sha256(&cat))
}

fn threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(1, 8)
}

/// [`tree_sha256`] of bytes in memory (what the file holding exactly them hashes to).
pub fn tree_sha256_bytes(data: &[u8]) -> String {
    let pieces: Vec<[u8; 32]> = data.chunks(CHUNK).map(sha256).collect();
    tree_digest(&pieces)
}

/// [`tree_sha256`] of a file on disk, its pieces read and hashed on several threads.
pub fn tree_sha256(path: &Path) -> Result<String> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len() as usize;
    let n = len.div_ceil(CHUNK);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let pieces = std::sync::Mutex::new(vec![[0u8; 32]; n]);
    let failed = std::sync::Mutex::new(None);
    std::thread::scope(|sc| {
        for _ in 0..threads().min(n.max(1)) {
            sc.spawn(|| {
                let mut buf = vec![0u8; CHUNK.min(len)];
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if k >= n {
                        break;
                    }
                    let piece = &mut buf[..CHUNK.min(len - k * CHUNK)];
                    if let Err(e) = f.read_exact_at(piece, (k * CHUNK) as u64) {
                        *failed.lock().expect("lock") = Some(e);
                        break;
                    }
                    pieces.lock().expect("lock")[k] = sha256(piece);
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().expect("lock") {
        return Err(Error::io(path, e));
    }
    Ok(tree_digest(&pieces.into_inner().expect("lock")))
}

fn dtype_name(kind: Kind) -> Result<&'static str> {
    Ok(match kind {
        Kind::Float => "F32",
        Kind::BFloat16 => "BF16",
        Kind::Half => "F16",
        k => return Err(Error::Other(format!("cannot save dtype {k:?}"))),
    })
}

/// The bytes of a CPU, contiguous tensor.
fn bytes_of(t: &Tensor) -> &[u8] {
    assert!(t.device() == Device::Cpu && t.is_contiguous(), "bytes_of needs a contiguous CPU tensor");
    let n = t.numel() * t.kind().elt_size_in_bytes();
    if n == 0 {
        return &[];
    }
    // SAFETY: a contiguous CPU tensor holds numel * element-size bytes at data_ptr; the slice borrows
    // the tensor, which keeps its storage alive and is not written while the slice lives.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, n) }
}

/// Writes CPU contiguous tensors as one safetensors file: the header, then each tensor's bytes, in
/// [`CHUNK`]-sized pieces written (positioned writes) and hashed on several threads. The file appears
/// under its name only when complete (written as `NAME.tmp`, synced, renamed). Returns its size and
/// [`tree_sha256`].
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)], metadata: &HashMap<String, String>) -> Result<Written> {
    use std::os::unix::fs::FileExt;
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata).expect("json"));
    }
    let mut offset = 0usize;
    let mut segments: Vec<&[u8]> = Vec::with_capacity(tensors.len() + 1);
    for (name, t) in tensors {
        let data = bytes_of(t);
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype_name(t.kind())?, "shape": t.size(), "data_offsets": [offset, offset + data.len()]}),
        );
        offset += data.len();
        segments.push(data);
    }
    let mut head = serde_json::to_vec(&header).expect("json");
    // The data starts 8-byte aligned, as the safetensors writer does it.
    while (8 + head.len()) % 8 != 0 {
        head.push(b' ');
    }
    let mut prefix = (head.len() as u64).to_le_bytes().to_vec();
    prefix.extend_from_slice(&head);
    segments.insert(0, &prefix);
    let total: usize = segments.iter().map(|s| s.len()).sum();
    // Start offset of each segment in the file.
    let starts: Vec<usize> = segments.iter().scan(0usize, |at, s| Some(std::mem::replace(at, *at + s.len()))).collect();
    let tmp = path.with_file_name(format!("{}.tmp", path.file_name().expect("file name").to_string_lossy()));
    let f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.set_len(total as u64).map_err(|e| Error::io(&tmp, e))?;
    let n = total.div_ceil(CHUNK);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let pieces = std::sync::Mutex::new(vec![[0u8; 32]; n]);
    let failed = std::sync::Mutex::new(None);
    let delay = fault_delay();
    std::thread::scope(|sc| {
        for _ in 0..threads().min(n.max(1)) {
            sc.spawn(|| {
                let mut buf = Vec::with_capacity(CHUNK.min(total));
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if k >= n {
                        break;
                    }
                    let (lo, hi) = (k * CHUNK, ((k + 1) * CHUNK).min(total));
                    buf.clear();
                    // The segments overlapping [lo, hi), in file order.
                    let first = starts.partition_point(|&s| s <= lo) - 1;
                    for (seg, &st) in segments[first..].iter().zip(&starts[first..]) {
                        if st >= hi {
                            break;
                        }
                        let a = lo.max(st) - st;
                        let b = hi.min(st + seg.len()) - st;
                        buf.extend_from_slice(&seg[a..b]);
                    }
                    if let Some(d) = delay {
                        std::thread::sleep(d);
                    }
                    if let Err(e) = f.write_all_at(&buf, lo as u64) {
                        *failed.lock().expect("lock") = Some(e);
                        break;
                    }
                    pieces.lock().expect("lock")[k] = sha256(&buf);
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().expect("lock") {
        return Err(Error::io(&tmp, e));
    }
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(&tmp, e))?;
    Ok(Written { bytes: total as u64, sha256: tree_digest(&pieces.into_inner().expect("lock")) })
}

/// Fault injection for the crash tests: `IDAVLM_CKPT_WRITE_DELAY_MS` slows every piece of every
/// checkpoint write by that long, so a test can kill a worker in the middle of one.
fn fault_delay() -> Option<std::time::Duration> {
    std::env::var("IDAVLM_CKPT_WRITE_DELAY_MS").ok().and_then(|v| v.parse().ok()).map(std::time::Duration::from_millis)
}

/// Writes CPU tensors (already in their dtype) as HF shards of at most `max_shard_bytes` plus the index;
/// returns each written file (relative name) with its size and checksum.
pub fn write_hf(named: &[(String, Tensor)], dir: &Path, max_shard_bytes: usize) -> Result<Vec<(String, Written)>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut cur = 0usize;
    let mut total = 0usize;
    for (name, t) in named {
        let b = t.numel() * t.kind().elt_size_in_bytes();
        if cur > 0 && cur + b > max_shard_bytes {
            shards.push(Vec::new());
            cur = 0;
        }
        cur += b;
        total += b;
        shards.last_mut().expect("at least one shard").push((name.clone(), t.shallow_clone()));
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let mut out = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        let fname = if n == 1 { SINGLE_FILE.to_string() } else { format!("model-{:05}-of-{:05}.safetensors", i + 1, n) };
        out.push((fname.clone(), write_safetensors(&dir.join(&fname), shard, &meta)?));
        for (k, _) in shard {
            weight_map.insert(k.clone(), fname.clone());
        }
    }
    if n > 1 {
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let bytes = serde_json::to_vec_pretty(&index).expect("json");
        let p = dir.join(INDEX_FILE);
        let tmp = dir.join(format!("{INDEX_FILE}.tmp"));
        std::fs::write(&tmp, &bytes).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &p).map_err(|e| Error::io(&p, e))?;
        out.push((INDEX_FILE.to_string(), Written { bytes: bytes.len() as u64, sha256: tree_sha256_bytes(&bytes) }));
    }
    Ok(out)
}

/// Writes `named` tensors (in order) as HF shards of at most `max_shard_bytes` plus the index, in `kind`.
/// Each file is written under a temporary name and renamed when complete.
pub fn save_hf(named: &[(String, Tensor)], dir: &Path, kind: Kind, max_shard_bytes: usize) -> Result<()> {
    dtype_name(kind)?;
    let host: Vec<(String, Tensor)> =
        named.iter().map(|(n, t)| (n.clone(), t.to_device(Device::Cpu).to_kind(kind).contiguous())).collect();
    write_hf(&host, dir, max_shard_bytes).map(|_| ())
}

/// Saves a whole parameter set in the HF layout.
pub fn save_params(params: &ParamSet, dir: &Path, kind: Kind, max_shard_bytes: usize) -> Result<()> {
    let named: Vec<(String, Tensor)> = params.iter().map(|(s, t)| (s.name.clone(), t.shallow_clone())).collect();
    save_hf(&named, dir, kind, max_shard_bytes)
}

/// Applies a PEFT LoRA adapter folder (`adapter_config.json`, `adapter_model.safetensors`) to `params`:
/// each factor pair goes into the model's own factors when it has them (a LoRA run resuming from its
/// adapters), and is merged into the base weight (`W + (alpha/r) B A`) when it has not; the weights of
/// modules trained in full replace the model's. Every key must land somewhere. Returns
/// (factor pairs loaded, pairs merged).
pub fn apply_adapter(params: &ParamSet, dir: &Path) -> Result<(usize, usize)> {
    use super::lora;
    let cfg_path = dir.join(lora::ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::weights(&cfg_path, e.to_string()))?;
    let spec = lora::LoraSpec::from_peft_config(&v).map_err(|e| Error::weights(&cfg_path, e))?;
    let file = dir.join(lora::ADAPTER_WEIGHTS);
    let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
    let st =
        SafeTensors::deserialize(&bytes).map_err(|e| Error::weights(&file, format!("not a readable safetensors file: {e}")))?;
    // Copies `t` into the model's parameter `name`, refusing another shape.
    let copy_into = |name: &str, t: &Tensor, hint: &str| -> Result<()> {
        let p = params.position(name).ok_or_else(|| Error::weights(&file, format!("{name}: no such parameter in this model")))?;
        let dst = &params.tensors[p];
        if dst.size() != t.size() {
            return Err(Error::weights(&file, format!("{name}: shape {:?}, the model has {:?}{hint}", t.size(), dst.size())));
        }
        tch::no_grad(|| dst.shallow_clone().copy_(t));
        Ok(())
    };
    let mut factors: HashMap<String, Tensor> = HashMap::new();
    for (key, view) in st.tensors() {
        let name = lora::from_peft_key(&key)
            .ok_or_else(|| Error::weights(&file, format!("{key}: not a PEFT key (base_model.model.*)")))?;
        let t = tensor_from_view(&view, &file, &key)?;
        if lora::is_adapter(name) {
            factors.insert(name.to_string(), t);
        } else {
            copy_into(name, &t, "")?;
        }
    }
    let (mut loaded, mut merged) = (0, 0);
    let modules: std::collections::BTreeSet<String> =
        factors.keys().filter_map(|k| k.split_once(".lora_").map(|(m, _)| m.to_string())).collect();
    for m in modules {
        let get = |w: &str| {
            factors.get(&format!("{m}.lora_{w}.weight")).ok_or_else(|| Error::weights(&file, format!("{m}: lora_{w} missing")))
        };
        let (a, b) = (get("A")?, get("B")?);
        let (an, bn) = (format!("{m}.lora_A.weight"), format!("{m}.lora_B.weight"));
        if params.position(&an).is_some() && params.position(&bn).is_some() {
            copy_into(&an, a, " (another r?)")?;
            copy_into(&bn, b, " (another r?)")?;
            loaded += 1;
        } else {
            let wn = format!("{m}.weight");
            let p = params.position(&wn).ok_or_else(|| Error::weights(&file, format!("{m}: no such linear in this model")))?;
            let w = &params.tensors[p];
            let out = lora::merged(w, &a.to_device(w.device()), &b.to_device(w.device()), spec.scale());
            tch::no_grad(|| w.shallow_clone().copy_(&out));
            merged += 1;
        }
    }
    Ok((loaded, merged))
}
