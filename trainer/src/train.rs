//! The training run of one rank: [`Trainer::new`] builds it (recipe -> plan -> model -> sharding ->
//! data -> resume), [`Trainer::train_step`] runs one optimizer step with its bookkeeping and
//! checkpoints, [`run`] loops. Every rank runs this same code; world size 1 is not a special case.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tch::{Device, Tensor};

use crate::checkpoint::{self, FolderLock, Saver, TrainerState};
use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::eval::{EvalScores, Evaluator};
use crate::flops;
use crate::memplan::{Checkpointing, Planner};
use crate::optim::{AdamW, Schedule};
use crate::plan::Plan;
use crate::recipe::{LossMean, Recipe};
use crate::report::{Reporter, StepRecord};
use crate::step::{forward_backward, mix, model_input};
use crate::zero::{Sharded, StepStats};
use idavlm_shards::reader::{BatchKind, LoadOptions, PackShape, Reader, ReaderState, Source, StepBatches, StepShape, StepStream};
use idavlm_shards::tokenizer::Tokenizer;

pub use crate::plan::Resume;
pub use crate::report::Summary;

/// Exit code of a run stopped by SIGTERM / SIGUSR1 after saving a checkpoint (requeue me).
pub const EXIT_PREEMPTED: i32 = 75;
/// Exit code of a run stopped by too many non-finite steps in a row.
pub const EXIT_NONFINITE: i32 = 4;

/// The stop flag of SIGTERM, SIGUSR1 and SIGINT: install it first thing in a worker, so that a signal
/// during start-up (loading weights, opening data) also ends in an orderly exit 75, not the default
/// death by signal.
pub fn stop_flag() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGUSR1, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| Error::Other(format!("signal handler: {e}")))?;
    }
    Ok(stop)
}

/// Runs a recipe on this rank to its end (or to a stop signal, see [`stop_flag`]).
pub fn run(recipe: &Recipe, resume: Resume, comm: &dyn Communicator, device: Device, stop: Arc<AtomicBool>) -> Result<Summary> {
    // The recipe's choice of formulations, before anything runs the model.
    crate::model::choice::apply(&recipe.kernels);
    let mut t = Trainer::new(recipe, resume, comm, device, stop)?;
    if t.stop_requested()? {
        return Ok(t.stopped_at_start());
    }
    while t.train_step()? == StepOutcome::Continue {}
    t.finish()
}

/// How a step left the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepOutcome {
    Continue,
    /// The last step of the run is done.
    Finished,
    /// A stop signal: a checkpoint was written, the process should exit with [`EXIT_PREEMPTED`].
    Preempted,
    /// Too many non-finite steps in a row ([`EXIT_NONFINITE`]).
    NonFinite,
}

/// A step's sums over micro-batches (one rank's, or every rank's after [`Trainer::agree`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepSums {
    /// Loss times weight of the ID micro-batches, and their weight (micro-batches, or supervised tokens
    /// with `batch.loss_mean: tokens`).
    pub id_loss: f64,
    pub id_weight: f64,
    /// The same for injected general-data micro-batches.
    pub general_loss: f64,
    pub general_weight: f64,
    /// Tokens computed (padding included) and model FLOPs.
    pub tokens: f64,
    pub flops: f64,
    /// Samples dropped by the reader (over-long, undecodable image).
    pub dropped: f64,
}

impl StepSums {
    fn to_array(self, stop: bool) -> [f64; 8] {
        let s = self;
        [s.id_loss, s.id_weight, s.general_loss, s.general_weight, s.tokens, s.flops, s.dropped, stop as i32 as f64]
    }
    fn from_array(a: &[f64]) -> (Self, bool) {
        let s = Self {
            id_loss: a[0],
            id_weight: a[1],
            general_loss: a[2],
            general_weight: a[3],
            tokens: a[4],
            flops: a[5],
            dropped: a[6],
        };
        (s, a[7] > 0.0)
    }
    fn mean(loss: f64, weight: f64) -> f64 {
        if weight > 0.0 {
            loss / weight
        } else {
            f64::NAN
        }
    }
    pub fn loss(&self) -> f64 {
        Self::mean(self.id_loss + self.general_loss, self.id_weight + self.general_weight)
    }
    pub fn loss_id(&self) -> f64 {
        Self::mean(self.id_loss, self.id_weight)
    }
    pub fn loss_general(&self) -> f64 {
        Self::mean(self.general_loss, self.general_weight)
    }
}

/// One rank's training run, built and ready to step.
pub struct Trainer<'a> {
    recipe: &'a Recipe,
    plan: Plan,
    comm: &'a dyn Communicator,
    stop: Arc<AtomicBool>,
    st: Sharded,
    stream: StepStream,
    ts: TrainerState,
    total_steps: u64,
    schedule: Schedule,
    opt: AdamW,
    saver: Saver,
    reporter: Reporter,
    recipe_yaml: String,
    /// Bytes of this rank's part of a checkpoint (optimizer state).
    part_bytes: u64,
    /// The device's peak FLOP/s, for MFU.
    peak: Option<f64>,
    /// Which blocks each micro-batch recomputes.
    planner: Planner,
    resumed_from: Option<PathBuf>,
    summary: Summary,
    /// `eval:` of the recipe.
    evaluator: Option<Evaluator>,
    /// Rank 0 holds the checkpoint folder's lock for the whole run.
    _lock: Option<FolderLock>,
}

impl<'a> Trainer<'a> {
    /// Builds this rank's run: the model and its sharding, the data stream, and the state of the
    /// checkpoint resumed from (see [`Resume`]).
    pub fn new(
        recipe: &'a Recipe,
        resume: Resume,
        comm: &'a dyn Communicator,
        device: Device,
        stop: Arc<AtomicBool>,
    ) -> Result<Self> {
        let (rank, world) = (comm.rank(), comm.world());
        let plan = recipe.resolve(device)?;
        tracing::info!(rank, world, ?device, kind = ?plan.kind, backend = comm.name(), "starting");
        let params = plan.initial_params(recipe.model.init.as_deref(), recipe.seed)?;
        let trainable = plan.trainable.clone();
        let mut st = Sharded::new(&plan.cfg, params, &|s| trainable.contains(s), plan.stage, comm);
        st.set_groups(&recipe.optimizer.groups, recipe.optimizer.lr, recipe.optimizer.weight_decay);
        st.set_reduce_kind(recipe.zero.reduce_dtype.kind());
        st.set_reshard_after_forward(recipe.zero.reshard_after_forward);
        if st.layout.trainable_numel() == 0 {
            return Err(Error::Recipe("recipe key `trainable.include`: no parameter matches".into()));
        }
        // One tokenizer for the data stream and the evaluation.
        let tok = Arc::new(Tokenizer::load_default()?);
        let mut reader = open_data(recipe, &plan, rank, world, tok.clone())?;
        let epoch_len = reader.main_epoch_len() as usize;
        let total_steps = plan.total_steps(epoch_len, || Ok(reader.samples_per_step()?))?;

        let ckpt_root = recipe.checkpoint.dir.clone();
        let lock = take_folder_lock(comm, &ckpt_root, device)?;
        let resumed_from = resume_dir(comm, &ckpt_root, resume, device)?;
        let mut ts = TrainerState {
            step: 0,
            adam_step: 0,
            reader: ReaderState { seed: recipe.seed, ..Default::default() },
            seed: recipe.seed,
            nonfinite_in_row: 0,
            nonfinite_total: 0,
            samples_dropped: 0,
            last_save: None,
        };
        if let Some(dir) = &resumed_from {
            let m = checkpoint::verify(dir)?;
            let saved = checkpoint::read_trainer_state(dir)?;
            if saved.seed != recipe.seed {
                return Err(Error::checkpoint(dir, format!("written with seed {}, the recipe says {}", saved.seed, recipe.seed)));
            }
            reader.check_resume(&saved.reader).map_err(|e| Error::checkpoint(dir, e.to_string()))?;
            checkpoint::load_optimizer(dir, &m, comm, &mut st, saved.adam_step)?;
            if rank == 0 {
                tracing::info!("resumed from {} (step {}, written by {} ranks)", dir.display(), saved.step, m.world);
            }
            ts = saved;
        }

        let mut saver = Saver::new(&ckpt_root);
        saver.prepare(&st, rank, recipe.checkpoint.save_model);
        let part_bytes = 12 * st.layout.shard_numel() as u64;
        match ts.last_save {
            Some(s) => {
                let expect = preemption_save_s(&s, part_bytes, recipe.checkpoint.preempt_budget_s);
                tracing::info!(
                    "checkpoint part of this rank: {:.2} GB; a preemption save takes ~{expect:.1} s at the last measured {:.0} MB/s",
                    part_bytes as f64 / 1e9,
                    s.bytes as f64 / 1e6 / s.write_s.max(1e-9)
                );
            }
            None => {
                tracing::info!("checkpoint part of this rank: {:.2} GB (save speed not measured yet)", part_bytes as f64 / 1e9)
            }
        }
        let peak = if let Device::Cuda(i) = device { flops::device_peak(&cuda_name(i)) } else { None };
        let mode = match (plan.checkpointing, device) {
            (Checkpointing::Auto, Device::Cpu) => Checkpointing::Full,
            (m, _) => m,
        };
        let planner =
            Planner::new(mode, &plan.cfg, plan.kind.elt_size_in_bytes(), st.kept_block_numel(), recipe.memory.limit_gib)
                .with_explicit_blocks(crate::model::llm::explicit_runs(&plan.cfg, st.device, plan.kind));
        let evaluator = match &recipe.eval {
            Some(e) => Some(Evaluator::new(e, &recipe.data, &plan.cfg, tok, &recipe.checkpoint.dir)?),
            None => None,
        };
        let reporter = Reporter::new(recipe, rank, total_steps, ts.step, st.layout.trainable_numel(), st.layout.shard_numel())?;
        // logging.phase_split: phases are timed from here on (on this, the training thread).
        crate::profile::enable(recipe.logging.phase_split, device);
        let stream = reader.stream(ts.step, ts.reader, recipe.data.prefetch_steps);
        Ok(Self {
            recipe,
            comm,
            stop,
            st,
            stream,
            ts,
            total_steps,
            schedule: Schedule::new(&recipe.schedule, recipe.optimizer.lr, total_steps),
            opt: AdamW::new(&recipe.optimizer),
            saver,
            reporter,
            recipe_yaml: recipe.to_yaml(),
            part_bytes,
            peak,
            planner,
            resumed_from,
            summary: Summary::default(),
            evaluator,
            _lock: lock,
            plan,
        })
    }

    /// Whether any rank has received a stop signal (a collective: every rank calls it).
    pub fn stop_requested(&self) -> Result<bool> {
        self.comm.any(self.stop.load(Ordering::Relaxed), self.plan.device)
    }

    /// A stop signal during start-up: nothing new to save (the checkpoint resumed from, if any, stays
    /// the newest), so every rank exits as preempted now.
    pub fn stopped_at_start(self) -> Summary {
        if self.comm.rank() == 0 {
            tracing::warn!("stop signal during start-up: exiting before the first step (nothing new to checkpoint)");
        }
        Summary { final_step: self.ts.step, last_checkpoint: self.resumed_from, preempted: true, ..Default::default() }
    }

    /// One optimizer step: the step's micro-batches forward and backward, the gradient reduction and
    /// AdamW, agreement on losses and the stop flag, the step's record, and a checkpoint when due.
    pub fn train_step(&mut self) -> Result<StepOutcome> {
        if self.ts.step >= self.total_steps {
            return Ok(StepOutcome::Finished);
        }
        let t0 = Instant::now();
        if self.recipe.logging.phase_split {
            crate::profile::take(); // what the evaluation after the last step timed is not this step's
        }
        let traced = self.recipe.logging.trace.as_ref().filter(|t| t.step == self.ts.step + 1);
        if let Some(t) = traced {
            std::fs::create_dir_all(&t.dir).map_err(|e| Error::io(&t.dir, e))?;
            crate::profile::trace_start(self.plan.device).map_err(|e| Error::Other(format!("logging.trace: {e}")))?;
        }
        let data = self.stream.next_step()?;
        let t_data = t0.elapsed().as_secs_f64();
        debug_assert_eq!(data.step, self.ts.step);
        let local = self.micro_batches(&data)?;
        self.st.finish_grads(self.comm)?;
        self.planner.calibrate(self.comm, self.plan.device)?;
        let k = self.ts.step + 1;
        let lr = self.schedule.lr_at(k);
        let stats = crate::profile::time(crate::profile::OPTIMIZER, 0.0, || {
            self.st.step(self.comm, &self.opt, lr, self.recipe.optimizer.clip_grad_norm)
        })?;
        if let Some(t) = traced {
            let path = t.dir.join(format!("step-{k:08}.r{}.json", self.comm.rank()));
            crate::profile::trace_stop(&path).map_err(|e| Error::Other(format!("logging.trace: {e}")))?;
            self.reporter.note(&format!("step {k} recorded as a timeline: {} (scripts/trace-gaps.py reads it)", path.display()));
        }
        let phase_s = self.recipe.logging.phase_split.then(|| {
            let mut m = crate::profile::take().named();
            m.insert("data".into(), t_data);
            m
        });
        let (sums, stop_now) = self.agree(&local)?;
        if sums.id_weight + sums.general_weight == 0.0 {
            return Err(Error::Other(format!(
                "step {k}: every sample of the global batch was dropped ({} dropped in this step: over data.max_len ({}), \
                 no answer token left after truncation, or an undecodable image; the warnings above name them)",
                sums.dropped, self.recipe.data.max_len
            )));
        }
        self.ts.samples_dropped += sums.dropped as u64;
        self.ts.step = k;
        self.ts.adam_step = self.st.adam_step;
        self.ts.reader = data.state_after;
        self.count_nonfinite(&stats, sums.loss());
        let step_s = t0.elapsed().as_secs_f64();
        let eval = match &self.evaluator {
            Some(e) if e.due(k, self.total_steps) => {
                let t = Instant::now();
                let r = e.run(&self.st, self.comm, &self.plan.cfg, k, self.total_steps)?;
                self.reporter.note(&format!("evaluation after step {k}: {:.1} s", t.elapsed().as_secs_f64()));
                Some(r)
            }
            _ => None,
        };
        self.record(lr, &stats, &sums, step_s, eval, phase_s)?;
        if let Some(saved) = self.saver.poll()? {
            self.note_saved(&saved)?;
        }
        let due = self.recipe.checkpoint.every_steps.is_some_and(|n| n > 0 && k.is_multiple_of(n));
        let last = k == self.total_steps && self.recipe.checkpoint.at_end;
        if due || last || stop_now {
            self.checkpoint(stop_now)?;
        }
        if stop_now {
            self.reporter.note("stop signal: checkpoint written, exiting");
            self.summary.preempted = true;
            return Ok(StepOutcome::Preempted);
        }
        if self.ts.nonfinite_in_row >= self.recipe.max_nonfinite_in_row {
            self.reporter.note(&format!("{} non-finite steps in a row: stopping", self.ts.nonfinite_in_row));
            self.summary.stopped_nonfinite = true;
            return Ok(StepOutcome::NonFinite);
        }
        Ok(if k == self.total_steps { StepOutcome::Finished } else { StepOutcome::Continue })
    }

    /// Waits for a background checkpoint still being written, and closes the run's reports.
    pub fn finish(mut self) -> Result<Summary> {
        if let Some(saved) = self.saver.wait()? {
            self.note_saved(&saved)?;
        }
        self.reporter.finish(&self.summary)?;
        Ok(self.summary)
    }

    /// Forward and backward of this rank's micro-batches of a step; returns this rank's sums.
    fn micro_batches(&mut self, data: &StepBatches) -> Result<StepSums> {
        let (device, world) = (self.plan.device, self.comm.world());
        // Token-mean loss: every rank needs the step's supervised-token count before its first backward.
        let global_tokens = match self.recipe.batch.loss_mean() {
            LossMean::MicroBatch => None,
            LossMean::Tokens => {
                let local: usize = data.micro_batches.iter().map(|mb| mb.supervised_tokens()).sum();
                Some(self.comm.sum_over_ranks(&[local as f64], device)?[0].max(1.0))
            }
        };
        let mut sums = StepSums::default();
        // Each micro-batch's loss stays on the device until the last one is queued (reading one would
        // make the host wait for the GPU between micro-batches).
        let mut losses: Vec<(Tensor, bool, f64)> = Vec::new();
        for (j, mb) in data.micro_batches.iter().enumerate() {
            let input = model_input(mb, self.plan.cfg.visual.image_size, device);
            self.planner.log_once(mb.batch.max(1), mb.seq);
            let recomputed = self.planner.recomputed(mb.batch.max(1), mb.seq);
            let (scale, weight) = match global_tokens {
                None => (1.0 / (self.recipe.batch.accum * world) as f64, 1.0),
                Some(n) => (mb.supervised_tokens() as f64 / n, mb.supervised_tokens() as f64),
            };
            // LoRA dropout: a different mask per step, micro-batch and rank, the same in a block's recompute.
            let dropout_seed = mix(mix(mix(self.recipe.seed) ^ data.step) ^ ((j as u64) << 32 | self.comm.rank() as u64));
            let loss = forward_backward(&mut self.st, self.comm, &self.plan.cfg, &input, scale, recomputed, dropout_seed)?;
            if mb.batch > 0 && weight > 0.0 {
                losses.push((loss, mb.kind == BatchKind::Id, weight));
            }
            sums.tokens += (mb.batch * mb.seq) as f64;
            sums.flops += if mb.seq_lens.is_empty() {
                flops::micro_batch_flops(&self.plan.cfg, mb.batch, mb.seq, mb.num_images())
            } else {
                flops::packed_flops(&self.plan.cfg, &mb.seq_lens, mb.num_images())
            };
            sums.dropped += (mb.dropped_bad_image + mb.dropped_overlong) as f64;
        }
        for (loss, id, weight) in losses {
            let (l, w) =
                if id { (&mut sums.id_loss, &mut sums.id_weight) } else { (&mut sums.general_loss, &mut sums.general_weight) };
            *l += loss.double_value(&[]) * weight;
            *w += weight;
        }
        Ok(sums)
    }

    /// One small all-reduce: losses, counts, tokens, FLOPs and the stop flag agreed across ranks.
    fn agree(&self, local: &StepSums) -> Result<(StepSums, bool)> {
        let v = self.comm.sum_over_ranks(&local.to_array(self.stop.load(Ordering::Relaxed)), self.plan.device)?;
        Ok(StepSums::from_array(&v))
    }

    fn count_nonfinite(&mut self, stats: &StepStats, loss: f64) {
        if stats.skipped || !loss.is_finite() {
            self.ts.nonfinite_in_row += 1;
            self.ts.nonfinite_total += 1;
            metrics::counter!("idavlm_nonfinite_steps_total").increment(1);
            tracing::warn!(
                step = self.ts.step,
                grad_norm = stats.grad_norm,
                loss,
                "non-finite loss or gradient norm: step skipped"
            );
        } else {
            self.ts.nonfinite_in_row = 0;
        }
    }

    fn record(
        &mut self,
        lr: f64,
        stats: &StepStats,
        sums: &StepSums,
        step_s: f64,
        eval: Option<EvalScores>,
        phase_s: Option<std::collections::BTreeMap<String, f64>>,
    ) -> Result<()> {
        let world = self.comm.world() as f64;
        let rec = StepRecord {
            step: self.ts.step,
            loss: sums.loss(),
            loss_id: sums.loss_id(),
            loss_general: sums.loss_general(),
            lr,
            grad_norm: stats.grad_norm,
            skipped: stats.skipped,
            step_s,
            tokens_per_s: sums.tokens / step_s,
            tokens_per_s_per_rank: sums.tokens / step_s / world,
            mfu: self.peak.map(|p| sums.flops / step_s / (world * p)),
            mem_gib: memory_gib(self.plan.device),
            samples_dropped: self.ts.samples_dropped,
            phase_s,
            eval: eval.unwrap_or_default().into(),
        };
        self.summary.losses.push(rec.loss);
        self.summary.steps_run += 1;
        self.summary.final_step = self.ts.step;
        self.reporter.record(&rec)
    }

    /// Writes the checkpoint of the step just taken. On a stop signal: exactly what resume needs (no
    /// model export), written before returning.
    fn checkpoint(&mut self, stop_now: bool) -> Result<()> {
        let c = &self.recipe.checkpoint;
        let o = checkpoint::SaveOptions {
            model: c.save_model && !stop_now,
            keep: c.keep,
            background: c.background && !stop_now,
            timeout: std::time::Duration::from_secs(self.recipe.comm.timeout_s),
        };
        let stall = self.saver.save(self.comm, &self.st, &self.ts, &self.recipe_yaml, &o)?;
        let dir = checkpoint::step_dir(&c.dir, self.ts.step);
        for saved in stall.previous.iter().chain(&stall.done) {
            self.note_saved(saved)?;
        }
        self.reporter.note(&format!(
            "checkpoint {}: training stalled {:.2}s (staging {:.2}s, waiting for the previous save {:.2}s){}",
            dir.display(),
            stall.stage_s + stall.waited_s,
            stall.stage_s,
            stall.waited_s,
            if o.background { ", written in the background" } else { "" }
        ));
        self.summary.last_checkpoint = Some(dir);
        Ok(())
    }

    /// A finished checkpoint: its speed goes into the next checkpoint's trainer state and the log.
    fn note_saved(&mut self, s: &checkpoint::Saved) -> Result<()> {
        let sp = s.speed;
        self.ts.last_save = Some(sp);
        if self.comm.rank() == 0 {
            let mb_s = sp.bytes as f64 / 1e6 / sp.write_s.max(1e-9);
            self.reporter.note(&format!(
                "checkpoint {} complete: {:.2} GB from rank 0 written in {:.1}s ({mb_s:.0} MB/s; own part {:.1}s, model export {:.1}s, \
                 waiting for the other ranks {:.1}s, manifest+rename {:.2}s), stall {:.2}s",
                s.dir.display(),
                sp.bytes as f64 / 1e9,
                sp.write_s,
                sp.part_s,
                sp.model_s,
                sp.wait_s,
                sp.finish_s,
                sp.stall_s
            ));
            preemption_save_s(&sp, self.part_bytes, self.recipe.checkpoint.preempt_budget_s);
        }
        Ok(())
    }
}

/// The streaming reader of the recipe's sources for this rank.
fn open_data(recipe: &Recipe, plan: &Plan, rank: usize, world: usize, tok: Arc<Tokenizer>) -> Result<Reader> {
    let d = &recipe.data;
    let mut sources = Vec::new();
    let mut main = Vec::new();
    for s in &d.sources {
        let src = Source::open_with(&s.name, &s.path, d.verify_checksums)?;
        src.require_template(plan.cfg.template())?;
        main.push((sources.len(), s.count.unwrap_or_else(|| src.layout.len())));
        sources.push(src);
    }
    let general = match &d.general {
        Some(g) => {
            let src = Source::open_with(&g.name, &g.path, d.verify_checksums)?;
            src.require_template(plan.cfg.template())?;
            sources.push(src);
            Some(sources.len() - 1)
        }
        None => None,
    };
    let shape = StepShape {
        micro_batch: recipe.batch.micro,
        accum: recipe.batch.accum,
        world,
        rank,
        inject_probability: d.inject_probability,
        packing: recipe.batch.packing.as_ref().map(|p| PackShape { tokens: p.tokens, window: d.pack_window }),
    };
    let load = LoadOptions {
        image_size: plan.cfg.visual.image_size as usize,
        max_len: d.max_len,
        bad_image: d.bad_image,
        workers: d.workers,
        resize: d.resize,
    };
    Ok(Reader::new(sources, tok, load, recipe.seed, &main, general, shape)?)
}

/// One run per checkpoint folder: rank 0 takes the lock and holds it until the run ends; every rank
/// learns if it could not be taken.
fn take_folder_lock(comm: &dyn Communicator, root: &std::path::Path, device: Device) -> Result<Option<FolderLock>> {
    let lock = if comm.rank() == 0 {
        FolderLock::acquire(root).map(|(l, took_over)| {
            if let Some(m) = took_over {
                tracing::warn!("{m}");
            }
            Some(l)
        })
    } else {
        Ok(None)
    };
    if comm.any(lock.is_err(), device)? {
        return Err(lock.err().unwrap_or_else(|| {
            Error::checkpoint(root, "rank 0 could not take the checkpoint folder's lock (its log says why)")
        }));
    }
    lock
}

/// The checkpoint to resume from under the `resume` policy.
fn resume_dir(comm: &dyn Communicator, root: &std::path::Path, resume: Resume, device: Device) -> Result<Option<PathBuf>> {
    match resume {
        Resume::None => {
            // A fresh run into a folder that holds another run's checkpoints would mix with them at the
            // next `--resume auto` (a requeue would continue the other run). Rank 0 looks; all agree.
            let stale = if comm.rank() == 0 { checkpoint::find_latest(root).0 } else { None };
            if comm.any(stale.is_some(), device)? {
                let what = stale.map(|d| format!("{} already holds {}", root.display(), d.display()));
                return Err(Error::checkpoint(
                    root,
                    format!(
                        "--resume none, but {}: continue it with --resume auto, or set checkpoint.dir to a new folder",
                        what.unwrap_or_else(|| "rank 0 found checkpoints of an earlier run there".into())
                    ),
                ));
            }
            Ok(None)
        }
        Resume::Path(p) => {
            checkpoint::verify(&p)?;
            Ok(Some(p))
        }
        Resume::Auto => {
            let (found, skipped) = checkpoint::find_latest(root);
            if found.is_none() && !skipped.is_empty() {
                // Starting over would silently throw away a (requeued) run's progress.
                return Err(Error::checkpoint(
                    root,
                    format!(
                        "--resume auto: {} checkpoint(s) here and none verifies, so the run would restart from step 0:\n  {}\n\
                         Repair or remove them, resume from one with --resume PATH, or pass --resume none to start over",
                        skipped.len(),
                        skipped.join("\n  ")
                    ),
                ));
            }
            if comm.rank() == 0 {
                for s in skipped {
                    tracing::warn!("{s}");
                }
            }
            Ok(found)
        }
    }
}

/// The expected time of a preemption save (this rank's part, no model export) at a measured speed;
/// warns when it would not fit the scheduler's warning time.
fn preemption_save_s(s: &checkpoint::SaveSpeed, part_bytes: u64, budget: f64) -> f64 {
    let expect = s.stall_s + part_bytes as f64 * s.write_s / s.bytes.max(1) as f64;
    if expect > budget {
        tracing::warn!(
            "a preemption save (~{expect:.0} s) would not fit checkpoint.preempt_budget_s = {budget} s: give the scheduler's \
             signal more lead time (sbatch --signal=B:USR1@N)"
        );
    }
    expect
}

pub fn cuda_name(i: usize) -> String {
    // libtorch has no name query in tch; nvidia-smi style names come from the driver through cudarc.
    (|| -> Option<String> {
        cudarc::driver::result::init().ok()?;
        let d = cudarc::driver::result::device::get(i as i32).ok()?;
        cudarc::driver::result::device::get_name(d).ok()
    })()
    .unwrap_or_default()
}

fn memory_gib(device: Device) -> f64 {
    match device {
        Device::Cuda(_) => {
            // Peak device memory in use (driver: total - free), sampled at each step.
            crate::runtime::cuda_max_memory_allocated().unwrap_or(0) as f64 / (1u64 << 30) as f64
        }
        _ => crate::runtime::rss_bytes() as f64 / (1u64 << 30) as f64,
    }
}
