//! CPU ranks under `mpirun` through MPI (rsmpi). Tensors are staged through f32 host buffers.
//!
//! MPI has no deadline of its own: a watchdog thread watches the collective in flight and, past the
//! timeout, prints which one hung and exits the process non-zero; `mpirun` then stops every rank.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mpi::collective::SystemOperation;
use mpi::traits::Communicator as _;
use mpi::traits::*;
use tch::Tensor;

use super::{host_f32, store_f32, Communicator};
use crate::error::{Error, Result};

pub struct MpiComm {
    _universe: mpi::environment::Universe,
    world: mpi::topology::SimpleCommunicator,
    rank: usize,
    size: usize,
    /// Milliseconds since `t0` when the current collective started; 0 when idle. Bits 48.. hold its name index.
    in_flight: Arc<AtomicU64>,
    t0: Instant,
}

const NAMES: [&str; 5] = ["all_reduce", "reduce_scatter", "all_gather", "broadcast", "barrier"];

impl MpiComm {
    /// Initialises MPI (once per process) and starts the watchdog.
    pub fn init(timeout: Duration) -> Result<Self> {
        let universe = mpi::initialize().ok_or_else(|| Error::Comm("MPI was already initialised".into()))?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let in_flight = Arc::new(AtomicU64::new(0));
        let t0 = Instant::now();
        let watch = in_flight.clone();
        std::thread::Builder::new()
            .name("idavlm-mpi-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(250));
                let v = watch.load(Ordering::Relaxed);
                if v == 0 {
                    continue;
                }
                let started = v & ((1 << 48) - 1);
                let name = NAMES[(v >> 48) as usize % NAMES.len()];
                let now = t0.elapsed().as_millis() as u64;
                if now.saturating_sub(started) > timeout.as_millis() as u64 {
                    eprintln!(
                        "rank {rank}: MPI {name} did not complete within {}s; exiting (a peer probably died or hangs)",
                        timeout.as_secs()
                    );
                    std::process::exit(3);
                }
            })
            .map_err(|e| Error::Comm(e.to_string()))?;
        Ok(Self { _universe: universe, world, rank, size, in_flight, t0 })
    }

    fn guard<T>(&self, which: usize, f: impl FnOnce() -> T) -> T {
        let start = (self.t0.elapsed().as_millis() as u64).max(1);
        self.in_flight.store(start | ((which as u64) << 48), Ordering::Relaxed);
        let r = f();
        self.in_flight.store(0, Ordering::Relaxed);
        r
    }
}

/// MPI used only to start another communicator: broadcasts rank 0's 128-byte blob (the NCCL unique
/// id) to every rank. The returned universe keeps MPI initialised for the life of the process, so
/// `mpirun` keeps treating the ranks as one job.
pub fn broadcast_blob(blob: Option<[u8; 128]>, rank: usize, world: usize) -> Result<([u8; 128], mpi::environment::Universe)> {
    let universe = mpi::initialize().ok_or_else(|| Error::Comm("MPI was already initialised".into()))?;
    let w = universe.world();
    if w.rank() as usize != rank || w.size() as usize != world {
        return Err(Error::Comm(format!("MPI says rank {} of {}, the environment says {rank} of {world}", w.rank(), w.size())));
    }
    let mut buf = blob.unwrap_or([0u8; 128]);
    w.process_at_rank(0).broadcast_into(&mut buf[..]);
    Ok((buf, universe))
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.size
    }
    fn name(&self) -> &'static str {
        "mpi"
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
        let send = host_f32(t);
        let mut recv = vec![0f32; send.len()];
        self.guard(0, || self.world.all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum()));
        store_f32(t, &recv);
        Ok(())
    }
    fn reduce_scatter_sum(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        let send = host_f32(input);
        let mut recv = vec![0f32; output.numel()];
        assert_eq!(send.len(), recv.len() * self.size);
        self.guard(1, || self.world.reduce_scatter_block_into(&send[..], &mut recv[..], SystemOperation::sum()));
        store_f32(output, &recv);
        Ok(())
    }
    fn all_gather(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        let send = host_f32(input);
        let mut recv = vec![0f32; output.numel()];
        assert_eq!(send.len() * self.size, recv.len());
        self.guard(2, || self.world.all_gather_into(&send[..], &mut recv[..]));
        store_f32(output, &recv);
        Ok(())
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        let mut buf = host_f32(t);
        self.guard(3, || self.world.process_at_rank(root as i32).broadcast_into(&mut buf[..]));
        store_f32(t, &buf);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.guard(4, || self.world.barrier());
        Ok(())
    }
}
