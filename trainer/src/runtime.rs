//! Process start-up for binaries that use tch.
//!
//! The linker drops `libtorch_cuda.so` (it is linked "as needed" and nothing references it by symbol),
//! so CUDA stays invisible to libtorch unless the program loads it itself: [`init`] dlopens it with
//! RTLD_GLOBAL where it exists. Loading it also loads the libnccl that libtorch was built against, which is
//! the copy the NCCL communicator must use (a second libnccl in the process corrupts communicators).

use std::ffi::CString;
use std::path::PathBuf;
use std::sync::OnceLock;

static CUDA_LOADED: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Folders that may hold libtorch: `$IDAVLM_TORCH_LIB`, then each `$LD_LIBRARY_PATH` entry.
pub fn torch_lib_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(d) = std::env::var("IDAVLM_TORCH_LIB") {
        dirs.push(PathBuf::from(d));
    }
    if let Ok(p) = std::env::var("LD_LIBRARY_PATH") {
        dirs.extend(p.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
    }
    dirs
}

/// Process-wide settings for CPU training, once at start:
/// - glibc hands blocks above 32 MiB back to the kernel on free, so every step re-faults the pages of
///   the large gradient and optimizer temporaries (most of a CPU step went to the kernel); keeping freed
///   memory in the heap removes that.
/// - libtorch's intra-op threads are split between the ranks sharing this machine.
pub fn tune_cpu(local_world: usize) {
    // SAFETY: mallopt only changes allocator parameters; called before worker threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 30);
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = std::env::var("IDAVLM_TORCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| (cores / local_world.max(1)).max(1));
    tch::set_num_threads(threads as i32);
}

/// Loads `libtorch_cuda.so` when present; returns its path. Safe to call more than once.
///
/// Before CUDA starts it also sets libtorch's allocator to expandable segments unless the user set
/// `PYTORCH_CUDA_ALLOC_CONF`: the trainer frees and reallocates buffers of many sizes every step
/// (gathered buckets, gradient staging), which fragments fixed-size segments.
pub fn init() -> Option<PathBuf> {
    CUDA_LOADED
        .get_or_init(|| {
            if std::env::var_os("PYTORCH_CUDA_ALLOC_CONF").is_none() {
                // Called once, before the allocator reads the environment (when CUDA first allocates).
                std::env::set_var("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True");
            }
            for dir in torch_lib_dirs() {
                let lib = dir.join("libtorch_cuda.so");
                if !lib.is_file() {
                    continue;
                }
                let c = CString::new(lib.as_os_str().as_encoded_bytes()).ok()?;
                // SAFETY: dlopen with a valid NUL-terminated path; the handle is intentionally leaked so
                // the library stays loaded for the life of the process.
                let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
                if !h.is_null() {
                    return Some(lib);
                }
                // SAFETY: dlerror returns a thread-local C string or null.
                let err = unsafe { libc::dlerror() };
                let msg = if err.is_null() {
                    "unknown".to_string()
                } else {
                    unsafe { std::ffi::CStr::from_ptr(err) }.to_string_lossy().into_owned()
                };
                tracing::warn!("{} exists but could not be loaded: {msg}", lib.display());
            }
            None
        })
        .clone()
}

/// The device of a local rank: CUDA `local_rank` when CUDA is available, else the CPU.
pub fn device_for(local_rank: usize) -> tch::Device {
    init();
    if tch::Cuda::is_available() {
        tch::Device::Cuda(local_rank % tch::Cuda::device_count().max(1) as usize)
    } else {
        tch::Device::Cpu
    }
}

/// Resident set size of this process in bytes (Linux), 0 when unknown.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

static PEAK_DEVICE_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Peak device memory in use seen so far on the current CUDA device (total - free, as the driver
/// reports it: libtorch's reserved pool plus NCCL and context memory), sampled at each call.
pub fn cuda_max_memory_allocated() -> Option<u64> {
    let (free, total) = cudarc::driver::result::mem_get_info().ok()?;
    let used = (total - free) as u64;
    Some(PEAK_DEVICE_BYTES.fetch_max(used, std::sync::atomic::Ordering::Relaxed).max(used))
}

/// The path of a loaded shared library whose file name starts with `prefix` (from /proc/self/maps).
pub fn loaded_library(prefix: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(PathBuf::from)
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
}

/// Makes NCCL calls go to the libnccl that libtorch loaded.
///
/// cudarc opens NCCL by the name `libnccl.so`, which on a GPU machine can resolve to a system copy
/// different from libtorch's `libnccl.so.2`; two copies in one process corrupt communicators. So: find
/// libtorch's copy in this process's maps, put a `libnccl.so` link to it in a private folder, and when
/// that folder is not first on `LD_LIBRARY_PATH` re-execute this program with it prepended (the dynamic
/// loader reads the variable only at start). Call before anything touches NCCL; returns the library used.
pub fn prepare_nccl() -> Option<PathBuf> {
    init()?;
    let lib = loaded_library("libnccl.so")?;
    let key = lib.to_string_lossy().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let dir = std::env::temp_dir().join(format!("idavlm-nccl-{key:016x}"));
    let link = dir.join("libnccl.so");
    if std::fs::read_link(&link).ok().as_deref() != Some(lib.as_path()) {
        let _ = std::fs::create_dir_all(&dir);
        let tmp = dir.join(format!("libnccl.so.{}", std::process::id()));
        let _ = std::os::unix::fs::symlink(&lib, &tmp);
        let _ = std::fs::rename(&tmp, &link);
    }
    let ld = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    if ld.split(':').next() == Some(dir.to_string_lossy().as_ref()) {
        return Some(lib);
    }
    if std::env::var_os("IDAVLM_NCCL_REEXEC").is_some() {
        tracing::warn!("could not put {} first on LD_LIBRARY_PATH; NCCL may load another copy", dir.display());
        return Some(lib);
    }
    let new_ld = if ld.is_empty() { dir.to_string_lossy().into_owned() } else { format!("{}:{ld}", dir.display()) };
    use std::os::unix::process::CommandExt;
    let args: Vec<String> = std::env::args().collect();
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(&args[0])
        .args(&args[1..])
        .env("LD_LIBRARY_PATH", new_ld)
        .env("IDAVLM_NCCL_REEXEC", "1")
        .exec();
    tracing::warn!("re-exec for NCCL failed: {err}");
    Some(lib)
}
