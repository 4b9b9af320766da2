//! ZeRO-1/2/3 data parallelism over flat buckets (see [`layout`]).
//!
//! - Stage 1: every rank keeps full compute-dtype parameters and accumulates full gradients over the
//!   step's micro-batches; at the end of the step each bucket's gradient is reduce-scattered once.
//!   f32 master weights and AdamW moments are partitioned.
//! - Stage 2: as 1, but each bucket's gradient is reduce-scattered into the rank's f32 partition as soon
//!   as the bucket's backward finishes, every micro-batch; no full gradient is kept.
//! - Stage 3: as 2, and the compute-dtype parameters are partitioned too: a bucket is all-gathered just
//!   before its forward and again before its backward recompute, and dropped after use.
//!
//! Frozen parameters (the ViT, ln_post, proj) are replicated and never touch the optimizer. After the
//! optimizer step the updated master partitions are cast to the compute dtype and all-gathered back
//! into the full parameters (stages 1/2) or kept as the rank's parameter shard (stage 3).

pub mod layout;

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use crate::comm::{Communicator, InFlight};
use crate::error::{Error, Result};
use crate::model::{ModelConfig, ParamSet, ParamSpec};
use crate::optim::{clip_coef, AdamW};
use crate::profile;
pub use layout::{Bucket, Layout, Role};

/// Outcome of one optimizer step.
#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    pub grad_norm: f64,
    pub skipped: bool,
}

pub struct Sharded {
    pub stage: u8,
    pub layout: Layout,
    pub cfg: ModelConfig,
    pub specs: Vec<ParamSpec>,
    pub device: Device,
    /// Compute dtype of parameters and activations.
    pub kind: Kind,
    pub rank: usize,
    frozen: HashMap<String, Tensor>,
    /// name -> (bucket, entry index).
    where_is: HashMap<String, (usize, usize)>,
    /// Stages 1/2: full flat compute-dtype parameters per bucket.
    full: Vec<Option<Tensor>>,
    /// Stage 3: this rank's compute-dtype shard per bucket.
    shard_params: Vec<Option<Tensor>>,
    pub master: Vec<Tensor>,
    pub exp_avg: Vec<Tensor>,
    pub exp_avg_sq: Vec<Tensor>,
    /// f32 gradient partitions, accumulated over the step.
    grad_shard: Vec<Tensor>,
    /// Stage 1: full f32 gradients, accumulated over the step.
    full_grad: Vec<Option<Tensor>>,
    /// AdamW steps taken (bias correction counts these).
    pub adam_step: u64,
    /// Reduce-scatters in flight: (collective, partition it writes, bucket).
    in_flight: std::collections::VecDeque<(InFlight, Tensor, usize)>,
}

/// Gradient reduce-scatters allowed in flight at once: each overlaps the backward of the blocks after
/// it, and each holds its bucket's f32 gradient until it completes.
const MAX_IN_FLIGHT: usize = 2;

fn flat_of(b: &Bucket, params: &ParamSet, kind: Kind, device: Device) -> Tensor {
    let flat = Tensor::zeros([b.padded as i64], (kind, device));
    tch::no_grad(|| {
        for e in &b.entries {
            flat.narrow(0, e.offset as i64, e.numel as i64).copy_(&params.tensors[e.param].reshape([-1]));
        }
    });
    flat
}

impl Sharded {
    /// Partitions a full parameter set (identical on every rank) for this rank.
    pub fn new(
        cfg: &ModelConfig,
        params: ParamSet,
        trainable: &dyn Fn(&ParamSpec) -> bool,
        stage: u8,
        comm: &dyn Communicator,
    ) -> Self {
        let (rank, world) = (comm.rank(), comm.world());
        let layout = layout::layout(&params.specs, trainable, world);
        let kind = params.tensors[0].kind();
        let device = params.tensors[0].device();
        let mut where_is = HashMap::new();
        for (bi, b) in layout.buckets.iter().enumerate() {
            for (ei, e) in b.entries.iter().enumerate() {
                where_is.insert(e.name.clone(), (bi, ei));
            }
        }
        let mut full = Vec::new();
        let mut shard_params = Vec::new();
        let (mut master, mut exp_avg, mut exp_avg_sq, mut grad_shard, mut full_grad) = (vec![], vec![], vec![], vec![], vec![]);
        for b in &layout.buckets {
            let flat = flat_of(b, &params, kind, device);
            let mine = flat.narrow(0, (rank * b.shard) as i64, b.shard as i64);
            master.push(mine.to_kind(Kind::Float).copy());
            exp_avg.push(Tensor::zeros([b.shard as i64], (Kind::Float, device)));
            exp_avg_sq.push(Tensor::zeros([b.shard as i64], (Kind::Float, device)));
            grad_shard.push(Tensor::zeros([b.shard as i64], (Kind::Float, device)));
            full_grad.push((stage == 1).then(|| Tensor::zeros([b.padded as i64], (Kind::Float, device))));
            if stage == 3 {
                shard_params.push(Some(mine.copy()));
                full.push(None);
            } else {
                shard_params.push(None);
                full.push(Some(flat));
            }
        }
        let frozen = params
            .specs
            .iter()
            .zip(params.tensors)
            .filter(|(s, _)| !where_is.contains_key(&s.name))
            .map(|(s, t)| (s.name.clone(), t))
            .collect();
        Self {
            stage,
            layout,
            cfg: cfg.clone(),
            specs: params.specs,
            device,
            kind,
            rank,
            frozen,
            where_is,
            full,
            shard_params,
            master,
            exp_avg,
            exp_avg_sq,
            grad_shard,
            full_grad,
            adam_step: 0,
            in_flight: Default::default(),
        }
    }

    pub fn bucket(&self, role: &Role) -> Option<usize> {
        self.layout.bucket_index(role)
    }

    /// The full compute-dtype flat parameters of bucket `b`: the kept buffer (stages 1/2) or a fresh
    /// all-gather of the shards (stage 3; the caller drops it after use, which frees it).
    pub fn gather(&self, comm: &dyn Communicator, b: usize) -> Result<Tensor> {
        match &self.full[b] {
            Some(f) => Ok(f.shallow_clone()),
            None => {
                let bk = &self.layout.buckets[b];
                let out = Tensor::empty([bk.padded as i64], (self.kind, self.device));
                let bytes = (bk.padded * self.kind.elt_size_in_bytes()) as f64;
                profile::time(profile::ALL_GATHER, bytes, || {
                    comm.all_gather(self.shard_params[b].as_ref().expect("stage 3 shard"), &out)
                })?;
                Ok(out)
            }
        }
    }

    /// Bucket `b`'s parameters as views of its flat buffer (for forward passes without a graph).
    pub fn views(&self, b: usize, flat: &Tensor) -> Vec<Tensor> {
        self.layout.buckets[b]
            .entries
            .iter()
            .map(|e| flat.narrow(0, e.offset as i64, e.numel as i64).view(e.shape.as_slice()))
            .collect()
    }

    /// Bucket `b`'s parameters as separate autograd leaves that share the flat buffer's storage.
    ///
    /// Each parameter must be its own leaf: were they views of one flat leaf, autograd would expand
    /// every parameter's gradient to a zero-filled tensor of the whole bucket before accumulating it
    /// (measured: ~1.3 s of a 7.3 s W1 step on 4 x H100, and the largest memory peak).
    pub fn leaves(&self, b: usize, flat: &Tensor) -> Vec<Tensor> {
        self.views(b, flat).into_iter().map(|v| v.detach().set_requires_grad(true)).collect()
    }

    /// A name -> tensor getter over frozen parameters and the given buckets' parameters (from
    /// [`Self::views`] or [`Self::leaves`]).
    pub fn getter<'a>(&'a self, buckets: &'a [(usize, &'a [Tensor])]) -> impl Fn(&str) -> Tensor + 'a {
        move |name: &str| {
            if let Some(t) = self.frozen.get(name) {
                return t.shallow_clone();
            }
            let (b, e) = self.where_is.get(name).unwrap_or_else(|| panic!("parameter {name} is neither frozen nor trainable"));
            let ts = buckets.iter().find(|(fb, _)| fb == b).unwrap_or_else(|| panic!("bucket of {name} not gathered")).1;
            ts[*e].shallow_clone()
        }
    }

    pub fn is_trainable(&self, name: &str) -> bool {
        self.where_is.contains_key(name)
    }

    /// Hands bucket `b`'s gradients (the `.grad` of its parameter leaves, see [`Self::leaves`]) to the
    /// strategy: packed once into a flat f32 buffer, then accumulated in full (stage 1) or
    /// reduce-scattered into this rank's f32 partition right away (stages 2/3).
    pub fn accumulate_grad(&mut self, comm: &dyn Communicator, b: usize, leaves: &[Tensor]) -> Result<()> {
        let bk = &self.layout.buckets[b];
        let (padded, shard) = (bk.padded, bk.shard);
        let g32 = Tensor::empty([bk.padded as i64], (Kind::Float, self.device));
        tch::no_grad(|| {
            for (e, leaf) in bk.entries.iter().zip(leaves) {
                let mut dst = g32.narrow(0, e.offset as i64, e.numel as i64);
                let g = leaf.grad();
                // A parameter the loss did not reach (e.g. the ID-Former without test images) has no grad.
                if g.defined() {
                    dst.copy_(&g.view([-1]));
                } else {
                    let _ = dst.zero_();
                }
            }
            if bk.padded > bk.numel {
                let _ = g32.narrow(0, bk.numel as i64, (bk.padded - bk.numel) as i64).zero_();
            }
        });
        tch::no_grad(|| -> Result<()> {
            if let Some(fg) = self.full_grad[b].as_mut() {
                let _ = fg.g_add_(&g32);
            } else {
                let part = Tensor::empty([shard as i64], (Kind::Float, self.device));
                let f =
                    profile::time(profile::REDUCE_SCATTER, (padded * 4) as f64, || comm.reduce_scatter_sum_async(&g32, &part))?;
                self.in_flight.push_back((f, part, b));
                while self.in_flight.len() > MAX_IN_FLIGHT {
                    self.complete_one(comm)?;
                }
            }
            Ok(())
        })
    }

    fn complete_one(&mut self, comm: &dyn Communicator) -> Result<()> {
        if let Some((f, part, b)) = self.in_flight.pop_front() {
            comm.wait(f)?;
            let _ = tch::no_grad(|| self.grad_shard[b].g_add_(&part));
        }
        Ok(())
    }

    /// Starts gathering bucket `b` (stage 3) and returns the buffer with the collective to wait for;
    /// stages 1/2 return the kept buffer at once.
    pub fn gather_async(&self, comm: &dyn Communicator, b: usize) -> Result<(Tensor, InFlight)> {
        match &self.full[b] {
            Some(f) => Ok((f.shallow_clone(), InFlight::done())),
            None => {
                let bk = &self.layout.buckets[b];
                let out = Tensor::empty([bk.padded as i64], (self.kind, self.device));
                let bytes = (bk.padded * self.kind.elt_size_in_bytes()) as f64;
                let f = profile::time(profile::ALL_GATHER, bytes, || {
                    comm.all_gather_async(self.shard_params[b].as_ref().expect("stage 3 shard"), &out)
                })?;
                Ok((out, f))
            }
        }
    }

    /// Completes the step's gradient reduction: waits for the reduce-scatters in flight (stages 2/3)
    /// or reduce-scatters the accumulated full gradients (stage 1).
    pub fn finish_grads(&mut self, comm: &dyn Communicator) -> Result<()> {
        while !self.in_flight.is_empty() {
            self.complete_one(comm)?;
        }
        for b in 0..self.layout.buckets.len() {
            if let Some(fg) = self.full_grad[b].as_mut() {
                let part = Tensor::empty([self.layout.buckets[b].shard as i64], (Kind::Float, self.device));
                let bytes = (self.layout.buckets[b].padded * 4) as f64;
                profile::time(profile::REDUCE_SCATTER, bytes, || comm.reduce_scatter_sum(fg, &part))?;
                tch::no_grad(|| {
                    let _ = self.grad_shard[b].g_add_(&part);
                    let _ = fg.zero_();
                });
            }
        }
        Ok(())
    }

    /// Global gradient norm, clipping, AdamW on the partitions, and the parameters brought up to date.
    /// A non-finite norm skips the update (every rank sees the same norm, so every rank skips).
    pub fn step(&mut self, comm: &dyn Communicator, opt: &AdamW, lr: f64, max_norm: Option<f64>) -> Result<StepStats> {
        while !self.in_flight.is_empty() {
            self.complete_one(comm)?;
        }
        let mut sq = Tensor::zeros([1], (Kind::Float, self.device));
        tch::no_grad(|| {
            for g in &self.grad_shard {
                let _ = sq.g_add_(&g.square().sum(Kind::Float));
            }
        });
        let sq = sq.to_kind(Kind::Double).to_kind(Kind::Float);
        comm.all_reduce_sum(&sq)?;
        let norm = sq.double_value(&[0]).sqrt();
        if !norm.is_finite() {
            for g in &mut self.grad_shard {
                let _ = tch::no_grad(|| g.zero_());
            }
            return Ok(StepStats { grad_norm: norm, skipped: true });
        }
        let coef = clip_coef(norm, max_norm);
        self.adam_step += 1;
        for b in 0..self.layout.buckets.len() {
            let g = if coef < 1.0 { &self.grad_shard[b] * coef } else { self.grad_shard[b].shallow_clone() };
            opt.update(&mut self.master[b], &g, &mut self.exp_avg[b], &mut self.exp_avg_sq[b], lr, self.adam_step);
            let _ = tch::no_grad(|| self.grad_shard[b].zero_());
        }
        self.refresh_params(comm)?;
        Ok(StepStats { grad_norm: norm, skipped: false })
    }

    /// Compute-dtype parameters from the master partitions.
    pub fn refresh_params(&mut self, comm: &dyn Communicator) -> Result<()> {
        for b in 0..self.layout.buckets.len() {
            let cast = self.master[b].to_kind(self.kind);
            match self.full[b].as_ref() {
                Some(full) => comm.all_gather(&cast, full)?,
                None => {
                    let mut s = self.shard_params[b].as_ref().expect("stage 3 shard").shallow_clone();
                    tch::no_grad(|| s.copy_(&cast));
                }
            }
        }
        Ok(())
    }

    /// Visits every parameter of the model (compute dtype, on the device): frozen ones, then each
    /// trainable bucket gathered one at a time (a collective under stage 3: every rank calls this), so
    /// at most one gathered bucket exists at once.
    pub fn visit_full(&self, comm: &dyn Communicator, f: &mut dyn FnMut(&str, &Tensor) -> Result<()>) -> Result<()> {
        for s in &self.specs {
            if let Some(t) = self.frozen.get(&s.name) {
                f(&s.name, t)?;
            }
        }
        for b in 0..self.layout.buckets.len() {
            let flat = self.gather(comm, b)?;
            for (e, v) in self.layout.buckets[b].entries.iter().zip(self.views(b, &flat)) {
                f(&e.name, &v)?;
            }
        }
        Ok(())
    }

    /// This rank's optimizer state for checkpoints: per bucket, master / exp_avg / exp_avg_sq partitions.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (b, bk) in self.layout.buckets.iter().enumerate() {
            let n = bk.role.name();
            out.push((format!("{n}.master"), self.master[b].shallow_clone()));
            out.push((format!("{n}.exp_avg"), self.exp_avg[b].shallow_clone()));
            out.push((format!("{n}.exp_avg_sq"), self.exp_avg_sq[b].shallow_clone()));
        }
        out
    }

    /// Restores optimizer state from full (unpadded, world-independent) bucket vectors: `get(name)`
    /// returns the f32 CPU vector of `{bucket}.{master|exp_avg|exp_avg_sq}` of `bucket.numel` elements.
    pub fn load_state(&mut self, comm: &dyn Communicator, adam_step: u64, get: &dyn Fn(&str) -> Result<Tensor>) -> Result<()> {
        for (b, bk) in self.layout.buckets.clone().iter().enumerate() {
            let n = bk.role.name();
            for (which, dst) in [("master", 0), ("exp_avg", 1), ("exp_avg_sq", 2)] {
                let full = get(&format!("{n}.{which}"))?;
                if full.numel() != bk.numel {
                    return Err(Error::Other(format!("{n}.{which}: {} elements, the layout has {}", full.numel(), bk.numel)));
                }
                let padded = Tensor::zeros([bk.padded as i64], (Kind::Float, Device::Cpu));
                tch::no_grad(|| padded.narrow(0, 0, bk.numel as i64).copy_(&full));
                let mine = padded.narrow(0, (self.rank * bk.shard) as i64, bk.shard as i64).to_device(self.device);
                let target = match dst {
                    0 => &mut self.master[b],
                    1 => &mut self.exp_avg[b],
                    _ => &mut self.exp_avg_sq[b],
                };
                tch::no_grad(|| target.copy_(&mine));
            }
        }
        self.adam_step = adam_step;
        self.refresh_params(comm)
    }
}
