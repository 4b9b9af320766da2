//! ZeRO-1/2/3 data parallelism over flat buckets (see [`layout`]).
//!
//! - Stage 1: every rank keeps full compute-dtype parameters and accumulates full gradients over the
//!   step's micro-batches; at the end of the step each bucket's gradient is reduce-scattered once.
//!   f32 master weights and AdamW moments are partitioned.
//! - Stage 2: as 1, but each bucket's gradient is reduce-scattered into the rank's f32 partition as soon
//!   as the bucket's backward finishes, every micro-batch; no full gradient is kept.
//! - Stage 3: as 2, and the compute-dtype parameters are partitioned too: a bucket is all-gathered just
//!   before its forward and again before its backward (recomputed or not), and dropped after use. A
//!   block that keeps its graph frees its gathered parameters right after its forward although the graph
//!   refers to them, and the backward's gather fills the same storage again (`zero.reshard_after_forward`,
//!   FSDP's reshard after forward; [`Sharded::release`], [`Sharded::regather`]).
//!
//! Frozen parameters (the ViT, ln_post, proj) are replicated and never touch the optimizer. After the
//! optimizer step the updated master partitions are cast to the compute dtype and all-gathered back
//! into the full parameters (stages 1/2) or kept as the rank's parameter shard (stage 3).

pub mod layout;

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use crate::comm::{Communicator, InFlight};
use crate::error::{Error, Result};
use crate::model::fused;
use crate::model::{ModelConfig, ParamSet, ParamSpec};
use crate::optim::{clip_coef, AdamW, StepArgs};
use crate::profile;
pub use crate::recipe::ZeroStage;
use crate::recipe::{glob_match, OptimizerGroup};
pub use layout::{Bucket, Layout, Role};

/// Outcome of one optimizer step.
#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    pub grad_norm: f64,
    pub skipped: bool,
}

/// Where a bucket's compute-dtype parameters live between uses.
enum Weights {
    /// Stages 1/2: the full flat buffer, kept on every rank.
    Replicated(Tensor),
    /// Stage 3: only this rank's shard; the full buffer is all-gathered for each use.
    Partitioned(Tensor),
}

/// How a bucket's gradients reach this rank's f32 partition.
enum Grads {
    /// Stage 1: the full f32 gradient accumulates over the step's micro-batches and is
    /// reduce-scattered once, in [`Sharded::finish_grads`].
    FullUntilStepEnd(Tensor),
    /// Stages 2/3: each micro-batch's gradient is reduce-scattered as soon as its backward finishes.
    ScatterEachMicroBatch,
}

struct BucketState {
    weights: Weights,
    grads: Grads,
}

pub struct Sharded {
    pub stage: ZeroStage,
    pub layout: Layout,
    pub cfg: ModelConfig,
    pub specs: Vec<ParamSpec>,
    pub device: Device,
    /// Compute dtype of parameters and activations.
    pub kind: Kind,
    pub rank: usize,
    /// Frozen parameters kept whole on every rank (the vision tower; every frozen one under stages 1/2).
    frozen: HashMap<String, Tensor>,
    /// Stage 3: frozen parameters of the LLM blocks and head (LoRA's base weights), packed per role
    /// like the trained ones and partitioned: this rank's shard of each bucket. Gathered with their
    /// role's trained bucket; no gradient, no optimizer state.
    frozen_layout: Layout,
    frozen_shards: Vec<Tensor>,
    /// name -> (bucket, entry index), of trained and of partitioned frozen parameters.
    where_is: HashMap<String, (usize, usize)>,
    frozen_where: HashMap<String, (usize, usize)>,
    buckets: Vec<BucketState>,
    /// Per trained bucket, runs of this rank's shard with their own lr factor and weight decay
    /// (`optimizer.groups`); empty: the whole shard takes the top-level values.
    groups: Vec<Vec<Segment>>,
    pub master: Vec<Tensor>,
    pub exp_avg: Vec<Tensor>,
    pub exp_avg_sq: Vec<Tensor>,
    /// f32 gradient partitions, accumulated over the step.
    grad_shard: Vec<Tensor>,
    /// AdamW steps taken (bias correction counts these).
    pub adam_step: u64,
    /// Reduce-scatters in flight: (collective, partition it writes, bucket).
    in_flight: std::collections::VecDeque<(InFlight, Tensor, usize)>,
    /// The dtype gradients travel in (`zero.reduce_dtype`): f32 (default) or bf16 (half the bytes; the
    /// sums over ranks are rounded to bf16 before they join the f32 partitions).
    reduce_kind: Kind,
    /// Stage 3 (`zero.reshard_after_forward`, default on): a block that keeps its graph frees its
    /// gathered parameters after its forward and gathers them again for its backward
    /// ([`Self::release`], [`Self::regather`]); off, the graph holds them gathered until its backward.
    reshard: bool,
}

/// A started gather of one bucket's parameters (see [`Sharded::prefetch`]); empty when the role has no
/// trained bucket. Turned into parameters by [`Sharded::take`], which waits for the collective.
#[must_use = "a prefetch holds its buffer until taken"]
pub struct Prefetch {
    trained: Option<(usize, Tensor, InFlight)>,
    frozen: Option<(usize, Tensor, InFlight)>,
}

impl Prefetch {
    /// Nothing to gather.
    pub fn none() -> Self {
        Self { trained: None, frozen: None }
    }
}

/// A run of a shard optimised with its own lr factor (group lr / optimizer.lr) and weight decay.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Segment {
    start: i64,
    len: i64,
    lr_scale: f64,
    weight_decay: f64,
}

/// How gathered parameters are used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// Views of the flat buffer, for a forward without a graph.
    Views,
    /// Separate autograd leaves sharing the buffer (see [`Sharded::take`]); their gradients go back
    /// through [`Sharded::accumulate_grad`].
    Leaves,
}

/// One bucket's parameters for one use (empty when the role has no trained bucket).
#[derive(Default)]
pub struct BucketParams {
    bucket: Option<usize>,
    tensors: Vec<Tensor>,
    /// The role's partitioned frozen parameters (stage 3), as views.
    frozen: Option<(usize, Vec<Tensor>)>,
    /// Stage 3: the gathered flat buffers the parameters are views of (trained, then frozen), which
    /// [`Sharded::release`] frees and [`Sharded::regather`] fills again. Empty under stages 1/2, whose
    /// flat buffers are the kept replicas.
    gathered: Vec<Gathered>,
    /// Whether the gathered buffers are released (between a kept block's forward and its backward).
    released: bool,
}

/// A gathered flat buffer of a partitioned bucket: which layout (trained or frozen) and bucket.
struct Gathered {
    frozen: bool,
    bucket: usize,
    flat: Tensor,
}

impl BucketParams {
    /// The trained parameters, in the bucket's entry order (empty when the role has no trained bucket).
    /// Panics while the gathered buffers behind them are released ([`Sharded::release`]).
    pub fn tensors(&self) -> &[Tensor] {
        assert!(!self.released, "parameters read while their gathered storage is released (regather them first)");
        &self.tensors
    }
}

/// Gradient reduce-scatters allowed in flight at once: each overlaps the backward of the blocks after
/// it, and each holds its bucket's f32 gradient until it completes.
const MAX_IN_FLIGHT: usize = 2;

/// A bucket's parameters as views of its flat buffer.
fn views_of(b: &Bucket, flat: &Tensor) -> Vec<Tensor> {
    b.entries.iter().map(|e| flat.narrow(0, e.offset as i64, e.numel as i64).view(e.shape.as_slice())).collect()
}

/// name -> (bucket, entry index) of a layout.
fn index_of(layout: &Layout) -> HashMap<String, (usize, usize)> {
    let mut at = HashMap::new();
    for (bi, b) in layout.buckets.iter().enumerate() {
        for (ei, e) in b.entries.iter().enumerate() {
            at.insert(e.name.clone(), (bi, ei));
        }
    }
    at
}

/// `rank`'s shard of a bucket's flat buffer (a view).
fn shard_of(flat: &Tensor, b: &Bucket, rank: usize) -> Tensor {
    flat.narrow(0, (rank * b.shard) as i64, b.shard as i64)
}

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
        stage: ZeroStage,
        comm: &dyn Communicator,
    ) -> Self {
        let (rank, world) = (comm.rank(), comm.world());
        let layout = layout::layout(&params.specs, trainable, world);
        let kind = params.tensors[0].kind();
        let device = params.tensors[0].device();
        let where_is = index_of(&layout);
        let mut buckets = Vec::new();
        let (mut master, mut exp_avg, mut exp_avg_sq, mut grad_shard) = (vec![], vec![], vec![], vec![]);
        let zeros = |n: usize| Tensor::zeros([n as i64], (Kind::Float, device));
        for b in &layout.buckets {
            let flat = flat_of(b, &params, kind, device);
            let mine = shard_of(&flat, b, rank);
            master.push(mine.to_kind(Kind::Float).copy());
            exp_avg.push(zeros(b.shard));
            exp_avg_sq.push(zeros(b.shard));
            grad_shard.push(zeros(b.shard));
            let weights = match stage {
                ZeroStage::Three => Weights::Partitioned(mine.copy()),
                ZeroStage::One | ZeroStage::Two => Weights::Replicated(flat),
            };
            let grads = match stage {
                ZeroStage::One => Grads::FullUntilStepEnd(zeros(b.padded)),
                ZeroStage::Two | ZeroStage::Three => Grads::ScatterEachMicroBatch,
            };
            buckets.push(BucketState { weights, grads });
        }
        // Stage 3 also partitions the frozen parameters of the blocks and the head.
        let partition_frozen = |s: &ParamSpec| stage == ZeroStage::Three && !trainable(s) && layout::role_of(s) != Role::Stem;
        let frozen_layout = layout::layout(&params.specs, &partition_frozen, world);
        let frozen_where = index_of(&frozen_layout);
        let frozen_shards: Vec<Tensor> =
            frozen_layout.buckets.iter().map(|b| shard_of(&flat_of(b, &params, kind, device), b, rank).copy()).collect();
        let frozen = params
            .specs
            .iter()
            .zip(params.tensors)
            .filter(|(s, _)| !where_is.contains_key(&s.name) && !frozen_where.contains_key(&s.name))
            .map(|(s, t)| (s.name.clone(), t))
            .collect();
        let n_buckets = layout.buckets.len();
        Self {
            stage,
            layout,
            cfg: cfg.clone(),
            specs: params.specs,
            device,
            kind,
            rank,
            frozen,
            frozen_layout,
            frozen_shards,
            where_is,
            frozen_where,
            groups: vec![Vec::new(); n_buckets],
            buckets,
            master,
            exp_avg,
            exp_avg_sq,
            grad_shard,
            adam_step: 0,
            in_flight: Default::default(),
            reduce_kind: Kind::Float,
            reshard: true,
        }
    }

    /// The dtype gradients are reduced in: `Kind::Float` (the default) or `Kind::BFloat16`.
    pub fn set_reduce_kind(&mut self, kind: Kind) {
        assert!(matches!(kind, Kind::Float | Kind::BFloat16), "gradients are reduced in f32 or bf16");
        self.reduce_kind = kind;
    }

    /// Parameters of LLM block 0 (trained and partitioned frozen ones) that a kept graph holds gathered
    /// until its backward: all of them under ZeRO-3 without reshard after forward, none otherwise
    /// (stages 1/2 hold nothing gathered; stage 3 with reshard frees them after the forward).
    pub fn kept_block_numel(&self) -> usize {
        if self.stage != ZeroStage::Three || self.reshard {
            return 0;
        }
        let r = Role::Block(0);
        [&self.layout, &self.frozen_layout].iter().filter_map(|l| l.bucket_index(&r).map(|b| l.buckets[b].numel)).sum()
    }

    /// Per-module learning rates and weight decay (`optimizer.groups`): the first group whose glob
    /// matches a parameter sets its values; the rest keep `base_lr` and `base_wd`. Padding follows the
    /// top-level values (its gradient is zero).
    pub fn set_groups(&mut self, groups: &[OptimizerGroup], base_lr: f64, base_wd: f64) {
        if groups.is_empty() {
            return;
        }
        let of = |name: &str| -> (f64, f64) {
            match groups.iter().find(|g| glob_match(&g.pattern, name)) {
                Some(g) => (g.lr.map_or(1.0, |lr| lr / base_lr), g.weight_decay.unwrap_or(base_wd)),
                None => (1.0, base_wd),
            }
        };
        for (b, bk) in self.layout.buckets.iter().enumerate() {
            let (r0, r1) = (self.rank * bk.shard, (self.rank + 1) * bk.shard);
            let mut runs: Vec<Segment> = Vec::new();
            let mut push = |start: usize, end: usize, (lr_scale, weight_decay): (f64, f64)| {
                if end <= start {
                    return;
                }
                match runs.last_mut() {
                    Some(l)
                        if l.lr_scale == lr_scale && l.weight_decay == weight_decay && (l.start + l.len) as usize == start =>
                    {
                        l.len += (end - start) as i64
                    }
                    _ => runs.push(Segment { start: start as i64, len: (end - start) as i64, lr_scale, weight_decay }),
                }
            };
            let mut at = r0;
            for e in &bk.entries {
                let (s, t) = (e.offset.max(r0), (e.offset + e.numel).min(r1));
                if s >= t {
                    continue;
                }
                push(at - r0, s - r0, (1.0, base_wd));
                push(s - r0, t - r0, of(&e.name));
                at = t;
            }
            push(at - r0, r1 - r0, (1.0, base_wd));
            self.groups[b] = runs;
        }
    }

    /// Starts gathering the parameters of `role`'s bucket: an asynchronous all-gather under stage 3
    /// (overlapping whatever the caller computes until [`Self::take`]); the kept buffer under stages
    /// 1/2; nothing when `role` has no trained bucket.
    pub fn prefetch(&self, comm: &dyn Communicator, role: Role) -> Result<Prefetch> {
        let trained = match self.layout.bucket_index(&role) {
            Some(b) => {
                let (flat, f) = self.gather_async(comm, b)?;
                Some((b, flat, f))
            }
            None => None,
        };
        let frozen = match self.frozen_layout.bucket_index(&role) {
            Some(b) => {
                let (out, f) = self.all_gather_shard(comm, &self.frozen_layout.buckets[b], &self.frozen_shards[b])?;
                Some((b, out, f))
            }
            None => None,
        };
        Ok(Prefetch { trained, frozen })
    }

    /// Waits for a prefetch and returns its parameters for `usage`.
    ///
    /// Leaves: each parameter is its own leaf. Were they views of one flat leaf, autograd would expand
    /// every parameter's gradient to a zero-filled tensor of the whole bucket before accumulating it
    /// (measured: ~1.3 s of a 7.3 s W1 step on 4 x H100, and the largest memory peak).
    pub fn take(&self, comm: &dyn Communicator, p: Prefetch, usage: Use) -> Result<BucketParams> {
        let mut gathered = Vec::new();
        let frozen = match p.frozen {
            Some((b, flat, f)) => {
                comm.wait(f)?;
                let views = views_of(&self.frozen_layout.buckets[b], &flat);
                gathered.push(Gathered { frozen: true, bucket: b, flat });
                Some((b, views))
            }
            None => None,
        };
        let Some((b, flat, f)) = p.trained else { return Ok(BucketParams { frozen, gathered, ..Default::default() }) };
        comm.wait(f)?;
        let views = views_of(&self.layout.buckets[b], &flat);
        if matches!(self.buckets[b].weights, Weights::Partitioned(_)) {
            gathered.push(Gathered { frozen: false, bucket: b, flat });
        }
        let tensors = match usage {
            Use::Views => views,
            Use::Leaves => views.into_iter().map(|v| v.detach().set_requires_grad(true)).collect(),
        };
        Ok(BucketParams { bucket: Some(b), tensors, frozen, gathered, released: false })
    }

    /// Whether a block that keeps its graph frees its gathered parameters after its forward
    /// ([`Self::release`]): stage 3 with `zero.reshard_after_forward` on.
    pub fn reshards_kept(&self) -> bool {
        self.stage == ZeroStage::Three && self.reshard
    }

    /// `zero.reshard_after_forward` (stage 3; on by default).
    pub fn set_reshard_after_forward(&mut self, on: bool) {
        self.reshard = on;
    }

    /// Frees the gathered (stage 3) buffers behind `p` while an autograd graph still holds views of
    /// them: what a kept block holds between its forward and its backward drops from its whole
    /// parameters to nothing. [`Self::regather`] fills the same storage again before the backward. A
    /// no-op under stages 1/2 (nothing is gathered).
    ///
    /// # Safety
    /// Until [`Self::regather`] of `p` has been waited ([`Self::finish`]), nothing may read the views
    /// of `p`'s gathered buffers: neither the parameters `p` hands out (its accessors panic meanwhile)
    /// nor the views an autograd graph saved of them (run that graph's backward only after the wait).
    pub unsafe fn release(&self, p: &mut BucketParams) {
        if p.released {
            return;
        }
        for g in &p.gathered {
            // SAFETY: the caller's contract above; `p.released` makes `p`'s own accessors refuse.
            unsafe { fused::storage_release(&g.flat) };
        }
        p.released = !p.gathered.is_empty();
    }

    /// Starts gathering `p`'s released buffers again, into their own storage (so every view an autograd
    /// graph saved sees the parameters again); [`Self::finish`] waits for it. Nothing to do for
    /// parameters that were not released.
    pub fn regather(&self, comm: &dyn Communicator, p: &mut BucketParams) -> Result<Prefetch> {
        let mut out = Prefetch::none();
        if !p.released {
            return Ok(out);
        }
        for g in &p.gathered {
            let (layout, shard) = if g.frozen {
                (&self.frozen_layout, &self.frozen_shards[g.bucket])
            } else {
                let Weights::Partitioned(shard) = &self.buckets[g.bucket].weights else {
                    unreachable!("only partitioned buckets are gathered")
                };
                (&self.layout, shard)
            };
            let bk = &layout.buckets[g.bucket];
            let alias = fused::storage_restore(&g.flat, bk.padded * self.kind.elt_size_in_bytes());
            let f = self.all_gather_into(comm, bk, shard, &alias)?;
            let slot = if g.frozen { &mut out.frozen } else { &mut out.trained };
            *slot = Some((g.bucket, alias, f));
        }
        p.released = false;
        Ok(out)
    }

    /// Waits for the gathers of a prefetch or a [`Self::regather`] without making parameters of them.
    pub fn finish(&self, comm: &dyn Communicator, p: Prefetch) -> Result<()> {
        for (_, _, f) in [p.trained, p.frozen].into_iter().flatten() {
            comm.wait(f)?;
        }
        Ok(())
    }

    /// [`Self::prefetch`] and [`Self::take`] at once.
    pub fn gather_now(&self, comm: &dyn Communicator, role: Role, usage: Use) -> Result<BucketParams> {
        let p = self.prefetch(comm, role)?;
        self.take(comm, p, usage)
    }

    /// A name -> tensor getter over frozen parameters and the given buckets' parameters.
    pub fn getter<'a>(&'a self, buckets: &'a [&'a BucketParams]) -> impl Fn(&str) -> Tensor + 'a {
        move |name: &str| {
            if let Some(t) = self.frozen.get(name) {
                return t.shallow_clone();
            }
            if let Some((b, e)) = self.frozen_where.get(name) {
                let p = buckets
                    .iter()
                    .find_map(|p| p.frozen.as_ref().filter(|(fb, _)| fb == b))
                    .unwrap_or_else(|| panic!("frozen bucket of {name} not gathered"));
                return p.1[*e].shallow_clone();
            }
            let (b, e) = self.where_is.get(name).unwrap_or_else(|| panic!("parameter {name} is neither frozen nor trainable"));
            let p = buckets.iter().find(|p| p.bucket == Some(*b)).unwrap_or_else(|| panic!("bucket of {name} not gathered"));
            p.tensors[*e].shallow_clone()
        }
    }

    /// Hands a bucket's gradients (the `.grad` of leaves from [`Self::take`] with [`Use::Leaves`]) to
    /// the strategy: packed once into a flat f32 buffer, then accumulated in full (stage 1) or
    /// reduce-scattered into this rank's f32 partition right away (stages 2/3). Empty parameters (no
    /// trained bucket) are a no-op.
    pub fn accumulate_grad(&mut self, comm: &dyn Communicator, p: &BucketParams) -> Result<()> {
        let Some(b) = p.bucket else { return Ok(()) };
        let bk = &self.layout.buckets[b];
        let (padded, shard, rk) = (bk.padded, bk.shard, self.reduce_kind);
        // Where the gradient is summed locally (stage 1 until the step's end; any stage on one rank, whose
        // partition is the whole bucket) each parameter's gradient is added straight into the f32 buffer:
        // one pass instead of a cast into a packed buffer, a copy through the communicator and an add
        // (the same f32 sums). A reduce dtype below f32 rounds each gradient to it first, as a reduction
        // in that dtype would.
        let local = match &self.buckets[b].grads {
            Grads::FullUntilStepEnd(fg) => Some(fg.shallow_clone()),
            Grads::ScatterEachMicroBatch if comm.world() == 1 => Some(self.grad_shard[b].shallow_clone()),
            Grads::ScatterEachMicroBatch => None,
        };
        if let Some(acc) = local {
            tch::no_grad(|| {
                for (e, leaf) in bk.entries.iter().zip(&p.tensors) {
                    let g = leaf.grad();
                    // A parameter the loss did not reach (e.g. the ID-Former without test images) has no grad.
                    if g.defined() {
                        let g = g.view([-1]);
                        let g = if comm.world() == 1 && rk != Kind::Float && g.kind() != rk { g.to_kind(rk) } else { g };
                        fused::accumulate(&acc.narrow(0, e.offset as i64, e.numel as i64), &g, true);
                    }
                }
            });
            return Ok(());
        }
        // Stage 1 accumulates in f32 until the step's end; stages 2/3 send each micro-batch's gradient
        // in the reduce dtype.
        let pack_kind = if matches!(self.buckets[b].grads, Grads::FullUntilStepEnd(_)) { Kind::Float } else { rk };
        let g32 = Tensor::empty([bk.padded as i64], (pack_kind, self.device));
        tch::no_grad(|| {
            for (e, leaf) in bk.entries.iter().zip(&p.tensors) {
                let mut dst = g32.narrow(0, e.offset as i64, e.numel as i64);
                let g = leaf.grad();
                // A parameter the loss did not reach (e.g. the ID-Former without test images) has no grad.
                if g.defined() {
                    fused::accumulate(&dst, &g.view([-1]), false);
                } else {
                    let _ = dst.zero_();
                }
            }
            if bk.padded > bk.numel {
                let _ = g32.narrow(0, bk.numel as i64, (bk.padded - bk.numel) as i64).zero_();
            }
        });
        tch::no_grad(|| -> Result<()> {
            match &mut self.buckets[b].grads {
                Grads::FullUntilStepEnd(fg) => {
                    let _ = fg.g_add_(&g32);
                }
                Grads::ScatterEachMicroBatch => {
                    let part = Tensor::empty([shard as i64], (rk, self.device));
                    let f = profile::time(profile::REDUCE_SCATTER, (padded * rk.elt_size_in_bytes()) as f64, || {
                        comm.reduce_scatter_sum_async(&g32, &part)
                    })?;
                    self.in_flight.push_back((f, part, b));
                    while self.in_flight.len() > MAX_IN_FLIGHT {
                        self.complete_one(comm)?;
                    }
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
    fn gather_async(&self, comm: &dyn Communicator, b: usize) -> Result<(Tensor, InFlight)> {
        match &self.buckets[b].weights {
            Weights::Replicated(f) => Ok((f.shallow_clone(), InFlight::done())),
            Weights::Partitioned(shard) => self.all_gather_shard(comm, &self.layout.buckets[b], shard),
        }
    }

    /// Starts the all-gather of a partitioned bucket's shards into a fresh full buffer.
    fn all_gather_shard(&self, comm: &dyn Communicator, bk: &Bucket, shard: &Tensor) -> Result<(Tensor, InFlight)> {
        let out = Tensor::empty([bk.padded as i64], (self.kind, self.device));
        let f = self.all_gather_into(comm, bk, shard, &out)?;
        Ok((out, f))
    }

    /// Starts the all-gather of a partitioned bucket's shards into `out` (the bucket's padded length).
    fn all_gather_into(&self, comm: &dyn Communicator, bk: &Bucket, shard: &Tensor, out: &Tensor) -> Result<InFlight> {
        let bytes = (bk.padded * self.kind.elt_size_in_bytes()) as f64;
        profile::time(profile::ALL_GATHER, bytes, || comm.all_gather_async(shard, out))
    }

    /// Completes the step's gradient reduction: waits for the reduce-scatters in flight (stages 2/3)
    /// or reduce-scatters the accumulated full gradients (stage 1).
    pub fn finish_grads(&mut self, comm: &dyn Communicator) -> Result<()> {
        while !self.in_flight.is_empty() {
            self.complete_one(comm)?;
        }
        for (b, bs) in self.buckets.iter_mut().enumerate() {
            if let Grads::FullUntilStepEnd(fg) = &mut bs.grads {
                let bk = &self.layout.buckets[b];
                let rk = self.reduce_kind;
                let part = Tensor::empty([bk.shard as i64], (rk, self.device));
                let send = if rk == Kind::Float { fg.shallow_clone() } else { tch::no_grad(|| fg.to_kind(rk)) };
                profile::time(profile::REDUCE_SCATTER, (bk.padded * rk.elt_size_in_bytes()) as f64, || {
                    comm.reduce_scatter_sum(&send, &part)
                })?;
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
            // The clipping factor is applied inside the update (one pass on GPUs).
            let g = &self.grad_shard[b];
            let k = StepArgs { lr, weight_decay: opt.weight_decay, grad_scale: coef, t: self.adam_step };
            if self.groups[b].is_empty() {
                opt.update_scaled(&mut self.master[b], g, &mut self.exp_avg[b], &mut self.exp_avg_sq[b], &k);
            } else {
                for s in &self.groups[b] {
                    let part = |t: &Tensor| t.narrow(0, s.start, s.len);
                    let g = part(g);
                    let (mut p, mut m, mut v) = (part(&self.master[b]), part(&self.exp_avg[b]), part(&self.exp_avg_sq[b]));
                    let k = StepArgs { lr: lr * s.lr_scale, weight_decay: s.weight_decay, ..k };
                    opt.update_scaled(&mut p, &g, &mut m, &mut v, &k);
                }
            }
            let _ = tch::no_grad(|| self.grad_shard[b].zero_());
        }
        self.refresh_params(comm)?;
        Ok(StepStats { grad_norm: norm, skipped: false })
    }

    /// Compute-dtype parameters from the master partitions.
    pub fn refresh_params(&mut self, comm: &dyn Communicator) -> Result<()> {
        for (b, bs) in self.buckets.iter_mut().enumerate() {
            let cast = self.master[b].to_kind(self.kind);
            match &mut bs.weights {
                Weights::Replicated(full) => comm.all_gather(&cast, full)?,
                Weights::Partitioned(shard) => tch::no_grad(|| {
                    shard.copy_(&cast);
                }),
            }
        }
        Ok(())
    }

    /// Visits every parameter of the model (compute dtype, on the device): frozen replicated ones, then
    /// role by role the trained and partitioned frozen ones, gathered one role at a time (a collective
    /// under stage 3: every rank calls this), so at most one role's buckets exist at once.
    pub fn visit_full(&self, comm: &dyn Communicator, f: &mut dyn FnMut(&str, &Tensor) -> Result<()>) -> Result<()> {
        for s in &self.specs {
            if let Some(t) = self.frozen.get(&s.name) {
                f(&s.name, t)?;
            }
        }
        let roles: std::collections::BTreeSet<Role> =
            self.layout.buckets.iter().chain(&self.frozen_layout.buckets).map(|b| b.role.clone()).collect();
        for role in roles {
            let p = self.gather_now(comm, role, Use::Views)?;
            if let Some(b) = p.bucket {
                for (e, v) in self.layout.buckets[b].entries.iter().zip(&p.tensors) {
                    f(&e.name, v)?;
                }
            }
            if let Some((b, views)) = &p.frozen {
                for (e, v) in self.frozen_layout.buckets[*b].entries.iter().zip(views) {
                    f(&e.name, v)?;
                }
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
