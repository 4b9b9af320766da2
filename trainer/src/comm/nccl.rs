//! GPU ranks: NCCL through cudarc on tch tensors' device pointers.
//!
//! The process must call NCCL in the libnccl that libtorch loaded (a second copy in the process fails
//! with "corrupted comm object"): [`crate::runtime::prepare_nccl`] arranges that before anything loads
//! NCCL. Synchronous collectives run on the legacy default stream, which is libtorch's compute stream,
//! so they are ordered with the kernels that produce and consume their buffers without extra
//! synchronisation; asynchronous ones run on a stream of their own, ordered by events both ways.
//!
//! A watchdog thread checks an event recorded after every collective and aborts the communicator and
//! the process, naming the collective, when one has not completed within the timeout. Dropping the
//! communicator stops the watchdog and frees the communicator, its stream and events.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{result as cu, sys as cusys};
use cudarc::nccl::{result as nccl, sys as ncclsys};
use tch::{Kind, Tensor};

use super::rendezvous::{local_ip_towards, rendezvous, BLOB};
use super::{Communicator, InFlight, RankInfo};
use crate::error::{Error, Result};

/// The CUDA handles this module holds, as the driver gives them.
///
/// SAFETY (Send/Sync): they are opaque handles of the CUDA driver and NCCL, not memory this process
/// reads through. The driver API is thread-safe for events, streams and contexts. An NCCL communicator
/// must not be used by two threads at once: only the thread owning the [`NcclComm`] issues collectives
/// on it; the watchdog thread only calls `ncclCommAbort`, which NCCL documents as the way to unblock a
/// communicator from another thread, and then ends the process.
#[derive(Clone, Copy)]
struct Raw<T>(T);
// SAFETY (each handle type on its own, not any `T`): see above. Events move between threads only
// inside the watchdog's mutex (Send); contexts are set current from either thread (Send + Sync); the
// communicator is shared with the watchdog for `ncclCommAbort` only (Send + Sync); the collective
// stream is used by the owning thread only (Send).
unsafe impl Send for Raw<cusys::CUevent> {}
unsafe impl Send for Raw<cusys::CUcontext> {}
unsafe impl Sync for Raw<cusys::CUcontext> {}
unsafe impl Send for Raw<ncclsys::ncclComm_t> {}
unsafe impl Sync for Raw<ncclsys::ncclComm_t> {}
unsafe impl Send for Raw<cusys::CUstream> {}

struct Pending {
    event: Raw<cusys::CUevent>,
    started: Instant,
    what: &'static str,
}

/// What the owning thread and the watchdog share.
struct Shared {
    comm: Raw<ncclsys::ncclComm_t>,
    ctx: Raw<cusys::CUcontext>,
    pending: Mutex<VecDeque<Pending>>,
    /// Set by [`NcclComm`]'s `Drop`: the watchdog exits.
    shutdown: AtomicBool,
    timeout: Duration,
    rank: usize,
}

impl Shared {
    /// Releases the events of completed collectives; returns the oldest pending one's age and name
    /// when it has not completed.
    fn reap(&self) -> Option<(Duration, &'static str)> {
        let mut q = self.pending.lock().expect("watchdog lock");
        while let Some(p) = q.front() {
            // SAFETY: the event was created by `watch_on` and is destroyed only here, once.
            match unsafe { cu::event::query(p.event.0) } {
                Ok(()) => {
                    let p = q.pop_front().expect("front");
                    // SAFETY: as above; the event has completed and nothing else refers to it.
                    unsafe { cu::event::destroy(p.event.0) }.ok();
                }
                Err(_) => return Some((p.started.elapsed(), p.what)),
            }
        }
        None
    }

    fn watch(self: Arc<Self>) {
        // SAFETY: the primary context retained in `connect_with` outlives this thread (released in
        // `Drop` after the thread is joined).
        unsafe { cu::ctx::set_current(self.ctx.0) }.ok();
        while !self.shutdown.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            if let Some((age, what)) = self.reap() {
                if age > self.timeout {
                    eprintln!(
                        "rank {}: NCCL {what} did not complete within {}s; aborting the communicator and exiting (a peer probably died or hangs)",
                        self.rank,
                        self.timeout.as_secs()
                    );
                    // SAFETY: see `Raw`; the process exits right after, so nothing uses the aborted
                    // communicator again.
                    unsafe { nccl::comm_abort(self.comm.0) }.ok();
                    std::process::exit(3);
                }
            }
        }
    }
}

pub struct NcclComm {
    rank: usize,
    world: usize,
    device: usize,
    shared: Arc<Shared>,
    /// Non-blocking stream of the asynchronous collectives (the synchronous ones use libtorch's).
    comm_stream: Raw<cusys::CUstream>,
    watchdog: Option<std::thread::JoinHandle<()>>,
    /// What must live as long as the communicator (the MPI environment that carried the id); dropped
    /// after the communicator is torn down.
    _keep: Option<Box<dyn std::any::Any>>,
}

fn ce(e: cu::DriverError) -> Error {
    Error::Comm(format!("CUDA driver: {e:?}"))
}
fn ne(what: &str, rank: usize, e: nccl::NcclError) -> Error {
    Error::Comm(format!("rank {rank}: NCCL {what}: {e:?}"))
}

fn dtype(k: Kind) -> Result<ncclsys::ncclDataType_t> {
    Ok(match k {
        Kind::Float => ncclsys::ncclDataType_t::ncclFloat32,
        Kind::BFloat16 => ncclsys::ncclDataType_t::ncclBfloat16,
        Kind::Half => ncclsys::ncclDataType_t::ncclFloat16,
        Kind::Double => ncclsys::ncclDataType_t::ncclFloat64,
        Kind::Int => ncclsys::ncclDataType_t::ncclInt32,
        Kind::Int64 => ncclsys::ncclDataType_t::ncclInt64,
        k => return Err(Error::Comm(format!("NCCL: unsupported dtype {k:?}"))),
    })
}

impl NcclComm {
    /// Joins the job on CUDA device `device` (the local rank's GPU), exchanging the NCCL id over TCP.
    pub fn connect(info: &RankInfo, device: usize, timeout: Duration) -> Result<Self> {
        let ip = local_ip_towards(&info.master_addr);
        let master = if info.rank == 0 {
            format!("0.0.0.0:{}", info.master_port)
        } else {
            format!("{}:{}", info.master_addr, info.master_port)
        };
        Self::connect_with(info, device, timeout, &mut |blob| {
            Ok(rendezvous(info.rank, info.world, &master, std::net::SocketAddr::new(ip, 0), blob, timeout)?.blob)
        })
    }

    /// Keeps `x` alive until the communicator is dropped.
    pub fn keep_alive(mut self, x: Box<dyn std::any::Any>) -> Self {
        self._keep = Some(x);
        self
    }

    /// Joins the job with the NCCL unique id carried by `exchange`: it gets rank 0's id (None on other
    /// ranks) and returns rank 0's id on every rank (a TCP rendezvous, or an MPI broadcast).
    pub fn connect_with(
        info: &RankInfo,
        device: usize,
        timeout: Duration,
        exchange: &mut dyn FnMut(Option<[u8; BLOB]>) -> Result<[u8; BLOB]>,
    ) -> Result<Self> {
        cu::init().map_err(ce)?;
        let dev = cu::device::get(device as i32).map_err(ce)?;
        // SAFETY: `dev` is a valid device ordinal (just returned by the driver); the retained primary
        // context (libtorch's too) is released in `Drop`.
        let ctx = unsafe { cu::primary_ctx::retain(dev) }.map_err(ce)?;
        // SAFETY: `ctx` is the live context just retained.
        unsafe { cu::ctx::set_current(ctx) }.map_err(ce)?;
        let id = if info.rank == 0 { Some(nccl::get_uniqueid().map_err(|e| ne("get_uniqueid", 0, e))?) } else { None };
        let blob = id.map(|id| {
            let mut b = [0u8; BLOB];
            for (d, s) in b.iter_mut().zip(id.internal.iter()) {
                *d = *s as u8;
            }
            b
        });
        let blob = exchange(blob)?;
        let mut uid = ncclsys::ncclUniqueId { internal: [0; 128] };
        for (d, s) in uid.internal.iter_mut().zip(blob.iter()) {
            *d = *s as _;
        }
        let mut comm: ncclsys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; `uid` is rank 0's id on every rank; the current
        // context is this rank's device.
        unsafe { nccl::comm_init_rank(&mut comm, info.world as i32, uid, info.rank as i32) }
            .map_err(|e| ne("comm_init_rank", info.rank, e))?;
        let shared = Arc::new(Shared {
            comm: Raw(comm),
            ctx: Raw(ctx),
            pending: Mutex::new(VecDeque::new()),
            shutdown: AtomicBool::new(false),
            timeout,
            rank: info.rank,
        });
        let comm_stream = cu::stream::create(cu::stream::StreamKind::NonBlocking).map_err(ce)?;
        let w = shared.clone();
        let watchdog = std::thread::Builder::new()
            .name("idavlm-nccl-watchdog".into())
            .spawn(move || w.watch())
            .map_err(|e| Error::Comm(e.to_string()))?;
        Ok(Self {
            rank: info.rank,
            world: info.world,
            device,
            shared,
            comm_stream: Raw(comm_stream),
            watchdog: Some(watchdog),
            _keep: None,
        })
    }

    fn raw(&self) -> ncclsys::ncclComm_t {
        self.shared.comm.0
    }

    fn watch(&self, what: &'static str) -> Result<()> {
        self.watch_on(what, std::ptr::null_mut())
    }

    /// Records an event after everything queued on `stream` for the watchdog to check.
    fn watch_on(&self, what: &'static str, stream: cusys::CUstream) -> Result<()> {
        let ev = cu::event::create(cusys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(ce)?;
        // SAFETY: `ev` was just created; `stream` is the legacy default stream (null) or our own.
        unsafe { cu::event::record(ev, stream) }.map_err(ce)?;
        self.shared.pending.lock().expect("watchdog lock").push_back(Pending { event: Raw(ev), started: Instant::now(), what });
        Ok(())
    }

    /// Runs `launch` on the communication stream after everything queued so far on libtorch's stream,
    /// and returns the collective's completion event with the tensors to keep alive.
    fn on_comm_stream(
        &self,
        what: &'static str,
        keep: Vec<Tensor>,
        launch: impl FnOnce(ncclsys::cudaStream_t) -> std::result::Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<InFlight> {
        let cs = self.comm_stream.0;
        // The inputs were produced on libtorch's stream: the communication stream waits for them.
        let ready = cu::event::create(cusys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(ce)?;
        // SAFETY: `ready` was just created; `cs` lives until `Drop`. Destroying an event with a pending
        // wait is allowed: the driver releases it once the wait completes.
        unsafe {
            cu::event::record(ready, std::ptr::null_mut()).map_err(ce)?;
            cu::stream::wait_event(cs, ready, cusys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT).map_err(ce)?;
            cu::event::destroy(ready).map_err(ce)?;
        }
        launch(cs as ncclsys::cudaStream_t).map_err(|e| ne(what, self.rank, e))?;
        let done = cu::event::create(cusys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(ce)?;
        // SAFETY: as above.
        unsafe { cu::event::record(done, cs) }.map_err(ce)?;
        self.watch_on(what, cs)?;
        Ok(InFlight { event: std::ptr::NonNull::new(done as *mut std::ffi::c_void), order_after: Some(order_after_event), keep })
    }
}

impl Drop for NcclComm {
    /// Stops the watchdog, then tears the communicator down with `ncclCommAbort`: it never waits for
    /// peers (`ncclCommDestroy` finalizes, which can block forever when another rank has already
    /// failed), and every collective this rank issued has either completed or is abandoned with the job.
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Relaxed);
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        // SAFETY: the watchdog is gone, so this thread is the only user of every handle below, and
        // nothing uses them after this.
        unsafe {
            for p in self.shared.pending.lock().expect("watchdog lock").drain(..) {
                cu::event::destroy(p.event.0).ok();
            }
            nccl::comm_abort(self.shared.comm.0).ok();
            cu::stream::destroy(self.comm_stream.0).ok();
            if let Ok(dev) = cu::device::get(self.device as i32) {
                cu::primary_ctx::release(dev).ok();
            }
        }
    }
}

fn check(t: &Tensor, what: &str) -> Result<()> {
    if !t.is_contiguous() || !t.device().is_cuda() {
        return Err(Error::Comm(format!("NCCL {what}: tensor must be contiguous and on a GPU")));
    }
    Ok(())
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
        check(t, "all_reduce")?;
        let p = t.data_ptr();
        // SAFETY (every collective below): the pointers are the data of contiguous CUDA tensors on this
        // rank's device (checked), `numel` elements of the given dtype, alive until the collective
        // completes on libtorch's stream (the caller's tensors outlive the call, and libtorch frees
        // memory in stream order) or, for the asynchronous ones, held in the returned `InFlight`.
        unsafe {
            nccl::all_reduce(p, p, t.numel(), dtype(t.kind())?, ncclsys::ncclRedOp_t::ncclSum, self.raw(), std::ptr::null_mut())
        }
        .map_err(|e| ne("all_reduce", self.rank, e))?;
        self.watch("all_reduce")
    }

    fn reduce_scatter_sum(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        check(input, "reduce_scatter")?;
        check(output, "reduce_scatter")?;
        assert_eq!(input.numel(), output.numel() * self.world);
        unsafe {
            nccl::reduce_scatter(
                input.data_ptr(),
                output.data_ptr(),
                output.numel(),
                dtype(input.kind())?,
                ncclsys::ncclRedOp_t::ncclSum,
                self.raw(),
                std::ptr::null_mut(),
            )
        }
        .map_err(|e| ne("reduce_scatter", self.rank, e))?;
        self.watch("reduce_scatter")
    }

    fn all_gather(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        check(input, "all_gather")?;
        check(output, "all_gather")?;
        assert_eq!(input.numel() * self.world, output.numel());
        unsafe {
            nccl::all_gather(
                input.data_ptr(),
                output.data_ptr(),
                input.numel(),
                dtype(input.kind())?,
                self.raw(),
                std::ptr::null_mut(),
            )
        }
        .map_err(|e| ne("all_gather", self.rank, e))?;
        self.watch("all_gather")
    }

    fn reduce_scatter_sum_async(&self, input: &Tensor, output: &Tensor) -> Result<InFlight> {
        check(input, "reduce_scatter")?;
        check(output, "reduce_scatter")?;
        assert_eq!(input.numel(), output.numel() * self.world);
        let (i, o, n, dt) = (input.data_ptr(), output.data_ptr(), output.numel(), dtype(input.kind())?);
        let comm = self.raw();
        self.on_comm_stream("reduce_scatter", vec![input.shallow_clone(), output.shallow_clone()], |s| unsafe {
            nccl::reduce_scatter(i, o, n, dt, ncclsys::ncclRedOp_t::ncclSum, comm, s)
        })
    }

    fn all_gather_async(&self, input: &Tensor, output: &Tensor) -> Result<InFlight> {
        check(input, "all_gather")?;
        check(output, "all_gather")?;
        assert_eq!(input.numel() * self.world, output.numel());
        let (i, o, n, dt) = (input.data_ptr(), output.data_ptr(), input.numel(), dtype(input.kind())?);
        let comm = self.raw();
        self.on_comm_stream("all_gather", vec![input.shallow_clone(), output.shallow_clone()], |s| unsafe {
            nccl::all_gather(i, o, n, dt, comm, s)
        })
    }

    fn wait(&self, mut f: InFlight) -> Result<()> {
        if let Some(ev) = f.event.take() {
            if let Err(e) = order_after_event(ev) {
                // Dropping `f` now would free its tensors under the collective: leak them instead.
                std::mem::forget(std::mem::take(&mut f.keep));
                return Err(Error::Comm(format!("rank {}: waiting for a collective: {e}", self.rank)));
            }
        }
        drop(f);
        Ok(())
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        check(t, "broadcast")?;
        let p = t.data_ptr();
        unsafe { nccl::broadcast(p, p, t.numel(), dtype(t.kind())?, root as i32, self.raw(), std::ptr::null_mut()) }
            .map_err(|e| ne("broadcast", self.rank, e))?;
        self.watch("broadcast")
    }

    fn barrier(&self) -> Result<()> {
        let t = Tensor::zeros([1], (Kind::Float, tch::Device::Cuda(self.device)));
        self.all_reduce_sum(&t)
    }
}

/// Makes libtorch's current stream continue only after the collective whose completion event is `ev`,
/// then destroys the event: later kernels see the collective's result, and the memory of the tensors it
/// used is reused only after it (the caching allocator's frees are ordered on that stream).
fn order_after_event(ev: std::ptr::NonNull<std::ffi::c_void>) -> std::result::Result<(), String> {
    let ev = ev.as_ptr() as cusys::CUevent;
    // SAFETY: `ev` was created in `on_comm_stream` and handed over in one `InFlight`, which gives it up
    // exactly once (to `wait` or to its `Drop`), so it is destroyed exactly once.
    unsafe {
        cu::stream::wait_event(std::ptr::null_mut(), ev, cusys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
            .map_err(|e| format!("{e:?}"))?;
        cu::event::destroy(ev).map_err(|e| format!("{e:?}"))
    }
}
