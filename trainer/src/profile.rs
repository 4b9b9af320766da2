//! An opt-in time split of the training step by phase. When on, the device is synchronised at every
//! phase boundary, so each phase's wall time is its own (and the step runs slightly slower); when off,
//! [`time`] is a plain call.
//!
//! Separately, [`trace`] records one stretch of work as a timeline (libtorch's Kineto profiler: CPU ops,
//! CUDA runtime calls, GPU kernels), each phase of [`time`] a named range in it; `scripts/trace-gaps.py`
//! reads it for where the GPU waits on the host.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

pub const PHASES: [&str; 8] = [
    "stem_forward",
    "blocks_forward",
    "head_fwd_bwd",
    "blocks_recompute_bwd",
    "stem_backward",
    "reduce_scatter",
    "all_gather",
    "optimizer",
];
pub const STEM_FWD: usize = 0;
pub const BLOCKS_FWD: usize = 1;
pub const HEAD: usize = 2;
pub const BLOCKS_BWD: usize = 3;
pub const STEM_BWD: usize = 4;
pub const REDUCE_SCATTER: usize = 5;
pub const ALL_GATHER: usize = 6;
pub const OPTIMIZER: usize = 7;

static ON: AtomicBool = AtomicBool::new(false);
static TRACING: AtomicBool = AtomicBool::new(false);

#[derive(Clone, Debug, Default)]
pub struct Split {
    pub secs: [f64; 8],
    pub bytes: [f64; 8],
}

impl Split {
    /// Seconds by phase name.
    pub fn named(&self) -> std::collections::BTreeMap<String, f64> {
        PHASES.iter().zip(self.secs).map(|(n, s)| (n.to_string(), s)).collect()
    }
}

thread_local! {
    static SPLIT: RefCell<Split> = RefCell::new(Split::default());
    static DEVICE: RefCell<Option<i64>> = const { RefCell::new(None) };
}

pub fn enable(on: bool, device: tch::Device) {
    ON.store(on, Ordering::Relaxed);
    DEVICE.with(|d| *d.borrow_mut() = if let tch::Device::Cuda(i) = device { Some(i as i64) } else { None });
}

pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

fn sync() {
    DEVICE.with(|d| {
        if let Some(i) = *d.borrow() {
            tch::Cuda::synchronize(i);
        }
    });
}

/// Runs `f` as phase `phase` moving `bytes` (for bandwidth figures; 0 for compute).
pub fn time<T>(phase: usize, bytes: f64, f: impl FnOnce() -> T) -> T {
    let _range = TRACING.load(Ordering::Relaxed).then(|| Range::new(PHASES[phase]));
    if !enabled() {
        return f();
    }
    sync();
    let t = Instant::now();
    let r = f();
    sync();
    SPLIT.with(|s| {
        let mut s = s.borrow_mut();
        s.secs[phase] += t.elapsed().as_secs_f64();
        s.bytes[phase] += bytes;
    });
    r
}

/// Takes (and resets) the split accumulated on this thread.
pub fn take() -> Split {
    SPLIT.with(|s| std::mem::take(&mut *s.borrow_mut()))
}

extern "C" {
    fn idavlm_trace_start(cuda: i32) -> *mut std::ffi::c_char;
    fn idavlm_trace_stop(path: *const std::ffi::c_char) -> *mut std::ffi::c_char;
    fn idavlm_range_begin(name: *const std::ffi::c_char) -> *mut std::ffi::c_void;
    fn idavlm_range_end(handle: *mut std::ffi::c_void);
}

/// A named range in the trace, closed when dropped.
struct Range(*mut std::ffi::c_void);

impl Range {
    fn new(name: &str) -> Self {
        let name = std::ffi::CString::new(name).expect("phase names have no NUL");
        // SAFETY: a NUL-terminated name; the shim copies it.
        Range(unsafe { idavlm_range_begin(name.as_ptr()) })
    }
}

impl Drop for Range {
    fn drop(&mut self) {
        // SAFETY: the handle from idavlm_range_begin (or null), ended once.
        unsafe { idavlm_range_end(self.0) }
    }
}

/// Records what runs until [`trace_stop`] (GPU kernels too on a CUDA device).
pub fn trace_start(device: tch::Device) -> Result<(), String> {
    // SAFETY: the shim starts libtorch's profiler; failures come back as a message.
    crate::model::fused::result(unsafe { idavlm_trace_start(i32::from(device.is_cuda())) })?;
    TRACING.store(true, Ordering::Relaxed);
    Ok(())
}

/// Stops the trace of [`trace_start`] and writes it to `path` as a Chrome trace (JSON).
pub fn trace_stop(path: &std::path::Path) -> Result<(), String> {
    TRACING.store(false, Ordering::Relaxed);
    let c = std::ffi::CString::new(path.to_string_lossy().as_bytes()).map_err(|_| format!("{}: NUL in path", path.display()))?;
    // SAFETY: a NUL-terminated path; the shim stops the profiler and writes the file.
    crate::model::fused::result(unsafe { idavlm_trace_stop(c.as_ptr()) }).map_err(|e| format!("trace {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A traced stretch lands in a Chrome trace with its CPU ops and the phase as a named range.
    #[test]
    fn a_trace_holds_the_ops_and_the_phase_ranges() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("t.json");
        trace_start(tch::Device::Cpu).expect("start");
        let y = time(BLOCKS_FWD, 0.0, || {
            let a = tch::Tensor::ones([64, 64], (tch::Kind::Float, tch::Device::Cpu));
            a.mm(&a)
        });
        trace_stop(&path).expect("stop");
        assert_eq!(y.double_value(&[0, 0]), 64.0);
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("written")).expect("JSON");
        let ev = v["traceEvents"].as_array().expect("events");
        let named = |cat: &str, name: &str| ev.iter().any(|e| e["cat"] == cat && e["name"] == name);
        assert!(named("user_annotation", "blocks_forward"), "the phase is a range");
        assert!(named("cpu_op", "aten::mm"), "the op is recorded");
        assert!(trace_stop(&path).is_err(), "a second stop is an error, not a crash");
    }
}
