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
}

/// Loads weights for `cfg` from a HF checkpoint into `kind` on `device`.
pub fn load_hf(path: &Path, cfg: &ModelConfig, device: Device, kind: Kind) -> Result<(ParamSet, LoadReport)> {
    let (files, index) = checkpoint_files(path)?;
    let specs = param_specs(cfg);
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
        if spec.part == Part::IdFormer {
            // IDA-VLM's ID-Former is new in stage 2: created with its init rule (zero out_proj).
            tracing::info!("{}: not in the checkpoint, created ({:?})", spec.name, spec.init);
            report.created_id_former.push(spec.name.clone());
            tensors[i] = Some(tch::no_grad(|| init_tensor(spec, device).to_kind(kind)));
        } else {
            missing.push(spec.name.clone());
        }
    }
    if !missing.is_empty() {
        return Err(Error::weights(path, format!("missing keys: {}", missing.join(", "))));
    }
    Ok((ParamSet::from_tensors(specs, tensors.into_iter().map(Option::unwrap).collect()), report))
}

/// A tensor's bytes for safetensors.
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn raw_of(t: &Tensor, kind: Kind) -> Result<Raw> {
    let t = t.to_device(Device::Cpu).to_kind(kind).contiguous();
    let dtype = match kind {
        Kind::Float => Dtype::F32,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        k => return Err(Error::Other(format!("cannot save dtype {k:?}"))),
    };
    let numel = t.numel();
    let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
    t.copy_data_u8(&mut data, numel);
    Ok(Raw { dtype, shape: t.size().iter().map(|&d| d as usize).collect(), data })
}

/// Writes `named` tensors (in order) as HF shards of at most `max_shard_bytes` plus the index, in `kind`.
/// Each file is written under a temporary name and renamed when complete.
pub fn save_hf(named: &[(String, Tensor)], dir: &Path, kind: Kind, max_shard_bytes: usize) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut shards: Vec<Vec<(String, Raw)>> = vec![Vec::new()];
    let mut cur = 0usize;
    let mut total = 0usize;
    for (name, t) in named {
        let raw = raw_of(t, kind)?;
        if cur > 0 && cur + raw.data.len() > max_shard_bytes {
            shards.push(Vec::new());
            cur = 0;
        }
        cur += raw.data.len();
        total += raw.data.len();
        shards.last_mut().expect("at least one shard").push((name.clone(), raw));
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    for (i, shard) in shards.iter().enumerate() {
        let fname = if n == 1 { SINGLE_FILE.to_string() } else { format!("model-{:05}-of-{:05}.safetensors", i + 1, n) };
        let tmp = dir.join(format!("{fname}.tmp"));
        let views: Vec<(&str, &Raw)> = shard.iter().map(|(k, r)| (k.as_str(), r)).collect();
        safetensors::serialize_to_file(views, Some(meta.clone()), &tmp)
            .map_err(|e| Error::weights(&tmp, format!("write failed: {e}")))?;
        std::fs::rename(&tmp, dir.join(&fname)).map_err(|e| Error::io(&tmp, e))?;
        for (k, _) in shard {
            weight_map.insert(k.clone(), fname.clone());
        }
    }
    if n > 1 {
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let p = dir.join(INDEX_FILE);
        let tmp = dir.join(format!("{INDEX_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(&index).expect("json")).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &p).map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}

/// Saves a whole parameter set in the HF layout.
pub fn save_params(params: &ParamSet, dir: &Path, kind: Kind, max_shard_bytes: usize) -> Result<()> {
    let named: Vec<(String, Tensor)> = params.iter().map(|(s, t)| (s.name.clone(), t.shallow_clone())).collect();
    save_hf(&named, dir, kind, max_shard_bytes)
}
