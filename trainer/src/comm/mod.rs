//! Communicators: the collectives the ZeRO strategies need, over tch tensors, with one interface and
//! several backends.
//!
//! - [`Local`]: world size 1, so that single-process training runs the same code path.
//! - [`tcp::TcpComm`]: CPU ranks over TCP rings (the `--nproc-per-node` and multi-node CPU path).
//! - [`mpi_comm::MpiComm`] (feature `mpi`): CPU ranks under `mpirun`.
//! - [`nccl::NcclComm`]: GPU ranks, NCCL on the same libnccl as libtorch's.
//!
//! Every collective has a deadline: a peer that does not answer in time turns into an error naming the
//! collective, the rank and the peer, and the worker exits non-zero, so the launcher stops the job.

#[cfg(feature = "mpi")]
pub mod mpi_comm;
pub mod nccl;
pub mod rendezvous;
pub mod tcp;

use tch::Tensor;

use crate::error::Result;

/// A collective in flight on a communication stream. The tensors it touches are kept alive until
/// [`Communicator::wait`] has ordered the compute stream after it, so libtorch's caching allocator
/// cannot hand their memory to other kernels while the collective still reads or writes it. Dropped
/// without a wait (an error on the way), it orders the compute stream after the collective itself
/// before letting the tensors go; if even that fails, the tensors' memory is leaked rather than reused
/// under a running collective.
#[must_use = "a collective in flight is waited with Communicator::wait"]
pub struct InFlight {
    /// The backend's completion event (a `CUevent` of the NCCL backend), owned by this value; None when
    /// the collective already completed (or [`Communicator::wait`] took it).
    pub(crate) event: Option<std::ptr::NonNull<std::ffi::c_void>>,
    /// The backend's way of ordering the compute stream after `event` and freeing it: what its `wait`
    /// does, for a value dropped unwaited.
    pub(crate) order_after: Option<fn(std::ptr::NonNull<std::ffi::c_void>) -> std::result::Result<(), String>>,
    pub(crate) keep: Vec<Tensor>,
}

impl InFlight {
    /// A collective that completed before returning (host backends).
    pub fn done() -> Self {
        Self { event: None, order_after: None, keep: Vec::new() }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let Some(ev) = self.event.take() else { return };
        let ordered = match self.order_after {
            Some(order) => order(ev),
            None => Err("the backend gave no way to wait for it".into()),
        };
        if let Err(e) = ordered {
            tracing::error!(
                "a collective dropped while in flight could not be waited for ({e}); its {} tensors' memory is leaked \
                 rather than reused under it",
                self.keep.len()
            );
            std::mem::forget(std::mem::take(&mut self.keep));
        }
    }
}

pub trait Communicator {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Backend name for logs.
    fn name(&self) -> &'static str;
    /// In-place sum over ranks.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<()>;
    /// `input` holds world * n elements; `output` (n elements) gets the sum over ranks of chunk `rank`.
    fn reduce_scatter_sum(&self, input: &Tensor, output: &Tensor) -> Result<()>;
    /// `input` holds n elements; `output` (world * n) gets every rank's input in rank order.
    fn all_gather(&self, input: &Tensor, output: &Tensor) -> Result<()>;
    /// As [`Self::reduce_scatter_sum`], overlapping later compute where the backend can; the result is
    /// valid after [`Self::wait`]. Host backends complete before returning.
    fn reduce_scatter_sum_async(&self, input: &Tensor, output: &Tensor) -> Result<InFlight> {
        self.reduce_scatter_sum(input, output)?;
        Ok(InFlight::done())
    }
    /// As [`Self::all_gather`], asynchronously; see [`Self::reduce_scatter_sum_async`].
    fn all_gather_async(&self, input: &Tensor, output: &Tensor) -> Result<InFlight> {
        self.all_gather(input, output)?;
        Ok(InFlight::done())
    }
    /// Orders the compute stream after an asynchronous collective and releases its tensors.
    fn wait(&self, f: InFlight) -> Result<()> {
        drop(f);
        Ok(())
    }
    /// In-place broadcast from `root`.
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()> {
        let t = Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu));
        self.all_reduce_sum(&t)
    }
    /// Agreement across ranks on a rank-local flag (a stop signal, a bad batch): true if any rank says so.
    fn any(&self, flag: bool, device: tch::Device) -> Result<bool> {
        Ok(self.sum_over_ranks(&[flag as i32 as f64], device)?[0] > 0.0)
    }
    /// Element-wise sums over ranks of a few host numbers (counts, losses, FLOPs), through one small
    /// all-reduce on `device`. They travel in f32, as every backend reduces: counts stay exact below 2^24.
    fn sum_over_ranks(&self, v: &[f64], device: tch::Device) -> Result<Vec<f64>> {
        let t = Tensor::from_slice(v).to_kind(tch::Kind::Float).to_device(device);
        self.all_reduce_sum(&t)?;
        let host = Vec::<f32>::try_from(&t.to_device(tch::Device::Cpu)).expect("a contiguous f32 CPU tensor converts");
        Ok(host.into_iter().map(f64::from).collect())
    }
}

/// `t`'s values as f32 on the host (a copy): how the host backends (TCP, MPI) move tensors of any float
/// dtype and device.
pub(crate) fn host_f32(t: &Tensor) -> Vec<f32> {
    let c = tch::no_grad(|| t.to_device(tch::Device::Cpu).to_kind(tch::Kind::Float).contiguous().view([-1]));
    Vec::<f32>::try_from(&c).expect("a contiguous f32 CPU tensor converts")
}

/// Writes `v` into `t`, cast to its dtype and device.
pub(crate) fn store_f32(t: &Tensor, v: &[f32]) {
    let src = Tensor::from_slice(v).view(t.size().as_slice());
    let mut d = t.shallow_clone();
    tch::no_grad(|| d.copy_(&src));
}

/// World size 1: every collective is a copy.
pub struct Local;

impl Communicator for Local {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn name(&self) -> &'static str {
        "local"
    }
    fn all_reduce_sum(&self, _t: &Tensor) -> Result<()> {
        Ok(())
    }
    fn reduce_scatter_sum(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        let mut o = output.shallow_clone();
        tch::no_grad(|| o.copy_(input));
        Ok(())
    }
    fn all_gather(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        let mut o = output.shallow_clone();
        tch::no_grad(|| o.copy_(input));
        Ok(())
    }
    fn broadcast(&self, _t: &Tensor, _root: usize) -> Result<()> {
        Ok(())
    }
}

/// Rank, world and local rank of this process, from the environment the launcher sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankInfo {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl RankInfo {
    /// Reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (set by `idavlm-launch`); a
    /// process started on its own is rank 0 of 1.
    pub fn from_env() -> Result<Self> {
        let get = |k: &str| std::env::var(k).ok();
        let num = |k: &str, default: usize| -> Result<usize> {
            match get(k) {
                Some(v) => v.trim().parse().map_err(|_| crate::Error::Comm(format!("{k}={v:?} is not a number"))),
                None => Ok(default),
            }
        };
        let world = num("WORLD_SIZE", 1)?;
        let rank = num("RANK", 0)?;
        if rank >= world {
            return Err(crate::Error::Comm(format!("RANK={rank} is not below WORLD_SIZE={world}")));
        }
        Ok(Self {
            rank,
            world,
            local_rank: num("LOCAL_RANK", rank)?,
            master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port: num("MASTER_PORT", 29500)? as u16,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::InFlight;

    static ORDERED: AtomicUsize = AtomicUsize::new(0);

    fn order(_: std::ptr::NonNull<std::ffi::c_void>) -> std::result::Result<(), String> {
        ORDERED.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn refuse(_: std::ptr::NonNull<std::ffi::c_void>) -> std::result::Result<(), String> {
        Err("no device".into())
    }

    /// An in-flight collective dropped without a wait (an error between its start and its wait) orders
    /// the stream after it before its tensors go; one that cannot be ordered leaks them instead.
    #[test]
    fn an_unwaited_collective_is_ordered_before_its_tensors_are_freed() {
        let t = tch::Tensor::zeros([4], (tch::Kind::Float, tch::Device::Cpu));
        let before = ORDERED.load(Ordering::SeqCst);
        drop(InFlight { event: Some(std::ptr::NonNull::dangling()), order_after: Some(order), keep: vec![t.shallow_clone()] });
        assert_eq!(ORDERED.load(Ordering::SeqCst), before + 1);
        // Waited (the event taken out): nothing more to order.
        let mut f = InFlight { event: Some(std::ptr::NonNull::dangling()), order_after: Some(order), keep: vec![] };
        f.event = None;
        drop(f);
        assert_eq!(ORDERED.load(Ordering::SeqCst), before + 1);
        // Not orderable: the drop logs and leaks the tensors instead of freeing them (and does not panic).
        drop(InFlight { event: Some(std::ptr::NonNull::dangling()), order_after: Some(refuse), keep: vec![t.shallow_clone()] });
        drop(InFlight::done());
    }
}
