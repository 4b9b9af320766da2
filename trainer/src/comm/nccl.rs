//! GPU ranks: NCCL through cudarc on tch tensors' device pointers.
//!
//! The process must call NCCL in the libnccl that libtorch loaded (a second copy in the process fails
//! with "corrupted comm object"): [`crate::runtime::prepare_nccl`] arranges that before anything loads
//! NCCL. Collectives run on the legacy default stream, which is libtorch's compute stream, so they are
//! ordered with the kernels that produce and consume their buffers without extra synchronisation.
//!
//! A watchdog thread records an event after every collective and aborts the communicator and the
//! process, naming the collective, when one has not completed within the timeout.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{result as cu, sys as cusys};
use cudarc::nccl::{result as nccl, sys as ncclsys};
use tch::{Kind, Tensor};

use super::rendezvous::{local_ip_towards, rendezvous, BLOB};
use super::{Communicator, RankInfo};
use crate::error::{Error, Result};

struct Pending {
    event: usize,
    started: Instant,
    what: &'static str,
}

pub struct NcclComm {
    rank: usize,
    world: usize,
    comm: usize,
    device: usize,
    pending: Arc<Mutex<VecDeque<Pending>>>,
}

// The raw handles are plain pointers owned by this struct; NCCL and the driver are thread-safe for the
// uses here (the watchdog only queries events and, on timeout, aborts).
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
        cu::init().map_err(ce)?;
        let ctx = unsafe { cu::primary_ctx::retain(cu::device::get(device as i32).map_err(ce)?) }.map_err(ce)?;
        unsafe { cu::ctx::set_current(ctx) }.map_err(ce)?;
        let id = if info.rank == 0 { Some(nccl::get_uniqueid().map_err(|e| ne("get_uniqueid", 0, e))?) } else { None };
        let blob = id.map(|id| {
            let mut b = [0u8; BLOB];
            for (d, s) in b.iter_mut().zip(id.internal.iter()) {
                *d = *s as u8;
            }
            b
        });
        let ip = local_ip_towards(&info.master_addr);
        let master = if info.rank == 0 {
            format!("0.0.0.0:{}", info.master_port)
        } else {
            format!("{}:{}", info.master_addr, info.master_port)
        };
        let table = rendezvous(info.rank, info.world, &master, std::net::SocketAddr::new(ip, 0), blob, timeout)?;
        let mut uid = ncclsys::ncclUniqueId { internal: [0; 128] };
        for (d, s) in uid.internal.iter_mut().zip(table.blob.iter()) {
            *d = *s as _;
        }
        let mut comm: ncclsys::ncclComm_t = std::ptr::null_mut();
        unsafe { nccl::comm_init_rank(&mut comm, info.world as i32, uid, info.rank as i32) }
            .map_err(|e| ne("comm_init_rank", info.rank, e))?;
        let pending: Arc<Mutex<VecDeque<Pending>>> = Arc::new(Mutex::new(VecDeque::new()));
        let watch = pending.clone();
        let (rank, comm_addr, ctx_addr) = (info.rank, comm as usize, ctx as usize);
        std::thread::Builder::new()
            .name("idavlm-nccl-watchdog".into())
            .spawn(move || {
                unsafe { cu::ctx::set_current(ctx_addr as cusys::CUcontext) }.ok();
                loop {
                    std::thread::sleep(Duration::from_millis(200));
                    let mut q = watch.lock().expect("watchdog lock");
                    while let Some(p) = q.front() {
                        match unsafe { cu::event::query(p.event as cusys::CUevent) } {
                            Ok(()) => {
                                let p = q.pop_front().expect("front");
                                unsafe { cu::event::destroy(p.event as cusys::CUevent) }.ok();
                            }
                            Err(_) if p.started.elapsed() > timeout => {
                                eprintln!(
                                    "rank {rank}: NCCL {} did not complete within {}s; aborting the communicator and exiting (a peer probably died or hangs)",
                                    p.what,
                                    timeout.as_secs()
                                );
                                unsafe { nccl::comm_abort(comm_addr as ncclsys::ncclComm_t) }.ok();
                                std::process::exit(3);
                            }
                            Err(_) => break,
                        }
                    }
                }
            })
            .map_err(|e| Error::Comm(e.to_string()))?;
        Ok(Self { rank: info.rank, world: info.world, comm: comm as usize, device, pending })
    }

    fn raw(&self) -> ncclsys::ncclComm_t {
        self.comm as ncclsys::ncclComm_t
    }

    fn watch(&self, what: &'static str) -> Result<()> {
        let ev = cu::event::create(cusys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(ce)?;
        unsafe { cu::event::record(ev, std::ptr::null_mut()) }.map_err(ce)?;
        self.pending.lock().expect("watchdog lock").push_back(Pending { event: ev as usize, started: Instant::now(), what });
        Ok(())
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
