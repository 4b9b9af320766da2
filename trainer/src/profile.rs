//! An opt-in time split of the training step by phase. When on, the device is synchronised at every
//! phase boundary, so each phase's wall time is its own (and the step runs slightly slower); when off,
//! [`time`] is a plain call.

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
