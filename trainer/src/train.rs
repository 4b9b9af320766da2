//! The training run of one rank, top to bottom: recipe -> model -> sharding -> data -> steps ->
//! checkpoints. Every rank runs this same code; world size 1 is not a special case.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tch::{Device, Kind};

use crate::checkpoint::{self, TrainerState};
use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::flops;
use crate::model::weights::load_hf;
use crate::model::{ModelConfig, ParamSet, ParamSpec};
use crate::optim::{AdamW, Schedule};
use crate::recipe::{glob_match, Dtype, LossMean, Recipe};
use crate::report::{Reporter, StepRecord};
use crate::step::{forward_backward, model_input};
use crate::zero::Sharded;
use idavlm_shards::reader::{BatchKind, LoadOptions, Reader, ReaderState, Source, StepShape};
use idavlm_shards::tokenizer::Tokenizer;

/// Exit code of a run stopped by SIGTERM / SIGUSR1 after saving a checkpoint (requeue me).
pub const EXIT_PREEMPTED: i32 = 75;
/// Exit code of a run stopped by too many non-finite steps in a row.
pub const EXIT_NONFINITE: i32 = 4;

#[derive(Clone, Debug)]
pub enum Resume {
    None,
    /// The newest complete checkpoint in the recipe's folder, if any.
    Auto,
    Path(PathBuf),
}

#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub steps_run: u64,
    pub final_step: u64,
    pub losses: Vec<f64>,
    pub last_checkpoint: Option<PathBuf>,
    pub preempted: bool,
    pub stopped_nonfinite: bool,
}

/// The model config a recipe asks for.
pub fn model_config(r: &Recipe) -> Result<ModelConfig> {
    let mut cfg = match (&r.model.preset, &r.model.config) {
        (Some(p), _) => ModelConfig::preset(p)?,
        (None, Some(c)) => ModelConfig::from_file(c)?,
        (None, None) => unreachable!("validated recipe"),
    };
    cfg.id_former = r.model.id_former;
    Ok(cfg)
}

/// Initial weights: from `model.init` (an HF checkpoint, or an idavlm checkpoint folder's `model/`)
/// or fresh from the seed.
pub fn initial_params(r: &Recipe, cfg: &ModelConfig, device: Device, kind: Kind) -> Result<ParamSet> {
    match &r.model.init {
        Some(p) => {
            let p = if p.join("model").is_dir() { p.join("model") } else { p.clone() };
            let (params, report) = load_hf(&p, cfg, device, kind)?;
            if !report.created_id_former.is_empty() {
                tracing::info!(
                    "ID-Former not in {}: created zero-initialised ({} tensors)",
                    p.display(),
                    report.created_id_former.len()
                );
            }
            Ok(params)
        }
        None => Ok(ParamSet::init(cfg, device, kind, r.seed as i64)),
    }
}

fn compute_kind(d: Dtype, device: Device) -> Kind {
    match (d, device) {
        (Dtype::F32, _) | (Dtype::Auto, Device::Cpu) => Kind::Float,
        _ => Kind::BFloat16,
    }
}

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
    let (rank, world) = (comm.rank(), comm.world());
    let recipe_yaml = recipe.to_yaml();
    let cfg = model_config(recipe)?;
    let kind = compute_kind(recipe.model.dtype, device);
    tracing::info!(rank, world, ?device, ?kind, backend = comm.name(), "starting");

    // Model and sharding.
    let params = initial_params(recipe, &cfg, device, kind)?;
    let include = recipe.trainable.include.clone();
    let exclude = recipe.trainable.exclude.clone();
    let trainable =
        move |s: &ParamSpec| include.iter().any(|p| glob_match(p, &s.name)) && !exclude.iter().any(|p| glob_match(p, &s.name));
    let mut st = Sharded::new(&cfg, params, &trainable, recipe.zero.stage, comm);
    let n_trainable = st.layout.trainable_numel();
    if n_trainable == 0 {
        return Err(Error::Recipe("recipe key `trainable.include`: no parameter matches".into()));
    }

    // Data.
    let tok = Arc::new(Tokenizer::load_default()?);
    let mut sources = Vec::new();
    let mut main = Vec::new();
    for s in &recipe.data.sources {
        let src = Source::open_with(&s.name, &s.path, recipe.data.verify_checksums)?;
        let count = s.count.unwrap_or_else(|| src.layout.len());
        main.push((sources.len(), count));
        sources.push(src);
    }
    let general = match &recipe.data.general {
        Some(g) => {
            sources.push(Source::open_with(&g.name, &g.path, recipe.data.verify_checksums)?);
            Some(sources.len() - 1)
        }
        None => None,
    };
    let shape = StepShape {
        micro_batch: recipe.batch.micro,
        accum: recipe.batch.accum,
        world,
        rank,
        inject_probability: recipe.data.inject_probability,
    };
    let image_size = cfg.visual.image_size;
    let load = LoadOptions {
        image_size: image_size as usize,
        max_len: recipe.data.max_len,
        bad_image: recipe.data.bad_image,
        workers: recipe.data.workers,
        resize: recipe.data.resize,
    };
    let reader = Reader::new(sources, tok, load, recipe.seed, &main, general, shape)?;
    let global_batch = (recipe.batch.micro * recipe.batch.accum * world) as u64;
    let total_steps = match (recipe.length.steps, recipe.length.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => ((e * reader.main_epoch_len() as f64) / global_batch as f64).ceil() as u64,
        _ => unreachable!("validated recipe"),
    };
    let schedule = Schedule::new(&recipe.schedule, recipe.optimizer.lr, total_steps);
    let opt = AdamW::new(&recipe.optimizer);

    // Resume.
    let mut ts = TrainerState {
        step: 0,
        adam_step: 0,
        reader: ReaderState { seed: recipe.seed, main_position: 0, general_position: 0 },
        seed: recipe.seed,
        nonfinite_in_row: 0,
        nonfinite_total: 0,
        samples_dropped: 0,
        last_save: None,
    };
    let ckpt_root = recipe.checkpoint.dir.clone();
    // One run per checkpoint folder: rank 0 holds the lock until the run ends; every rank learns if it
    // could not be taken.
    let lock = if rank == 0 {
        checkpoint::FolderLock::acquire(&ckpt_root).map(|(l, took_over)| {
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
            Error::checkpoint(&ckpt_root, "rank 0 could not take the checkpoint folder's lock (its log says why)")
        }));
    }
    let _lock = lock.expect("checked above");
    let resume_dir = match resume {
        Resume::None => {
            // A fresh run into a folder that holds another run's checkpoints would mix with them at the
            // next `--resume auto` (a requeue would continue the other run). Rank 0 looks; all agree.
            let stale = if rank == 0 { checkpoint::find_latest(&ckpt_root).0 } else { None };
            if comm.any(stale.is_some(), device)? {
                let what = stale.map(|d| format!("{} already holds {}", ckpt_root.display(), d.display()));
                return Err(Error::checkpoint(
                    &ckpt_root,
                    format!(
                        "--resume none, but {}: continue it with --resume auto, or set checkpoint.dir to a new folder",
                        what.unwrap_or_else(|| "rank 0 found checkpoints of an earlier run there".into())
                    ),
                ));
            }
            None
        }
        Resume::Path(p) => {
            checkpoint::verify(&p)?;
            Some(p)
        }
        Resume::Auto => {
            let (found, skipped) = checkpoint::find_latest(&ckpt_root);
            if found.is_none() && !skipped.is_empty() {
                // Starting over would silently throw away a (requeued) run's progress.
                return Err(Error::checkpoint(
                    &ckpt_root,
                    format!(
                        "--resume auto: {} checkpoint(s) here and none verifies, so the run would restart from step 0:\n  {}\n\
                         Repair or remove them, resume from one with --resume PATH, or pass --resume none to start over",
                        skipped.len(),
                        skipped.join("\n  ")
                    ),
                ));
            }
            if rank == 0 {
                for s in skipped {
                    tracing::warn!("{s}");
                }
            }
            found
        }
    };
    if let Some(dir) = &resume_dir {
        let m = checkpoint::verify(dir)?;
        let saved = checkpoint::read_trainer_state(dir)?;
        if saved.seed != recipe.seed {
            return Err(Error::checkpoint(dir, format!("written with seed {}, the recipe says {}", saved.seed, recipe.seed)));
        }
        checkpoint::load_optimizer(dir, &m, comm, &mut st, saved.adam_step)?;
        if rank == 0 {
            tracing::info!("resumed from {} (step {}, written by {} ranks)", dir.display(), saved.step, m.world);
        }
        ts = saved;
    }

    // A stop signal during start-up: nothing new to save (the checkpoint resumed from, if any, stays the
    // newest), so every rank exits as preempted now.
    if comm.any(stop.load(Ordering::Relaxed), device)? {
        if rank == 0 {
            tracing::warn!("stop signal during start-up: exiting before the first step (nothing new to checkpoint)");
        }
        return Ok(Summary { final_step: ts.step, last_checkpoint: resume_dir, preempted: true, ..Default::default() });
    }

    let mut saver = checkpoint::Saver::new(&ckpt_root);
    saver.prepare(&st, rank, recipe.checkpoint.save_model);
    let budget = recipe.checkpoint.preempt_budget_s;
    let part_bytes = 12 * st.layout.shard_numel() as u64;
    match ts.last_save {
        Some(s) => {
            let expect = preemption_save_s(&s, part_bytes, budget);
            tracing::info!(
                "checkpoint part of this rank: {:.2} GB; a preemption save takes ~{expect:.1} s at the last measured {:.0} MB/s",
                part_bytes as f64 / 1e9,
                s.bytes as f64 / 1e6 / s.write_s.max(1e-9)
            );
        }
        None => tracing::info!("checkpoint part of this rank: {:.2} GB (save speed not measured yet)", part_bytes as f64 / 1e9),
    }
    let save_opts = |model: bool, background: bool| checkpoint::SaveOptions {
        model,
        keep: recipe.checkpoint.keep,
        background,
        timeout: std::time::Duration::from_secs(recipe.comm.timeout_s),
    };

    let peak = if let Device::Cuda(i) = device { flops::device_peak(&cuda_name(i)) } else { None };
    let mut reporter = Reporter::new(recipe, rank, total_steps, ts.step, n_trainable, st.layout.shard_numel())?;
    let mut rx = reader.stream(ts.step, ts.reader, recipe.data.prefetch_steps);
    let mut summary = Summary::default();
    let scale = 1.0 / (recipe.batch.accum * world) as f64;
    while ts.step < total_steps {
        let t0 = Instant::now();
        let data = rx.next_step()?;
        debug_assert_eq!(data.step, ts.step);
        let mut sums = [0f64; 6]; // id loss, id weight, general loss, general weight, tokens, flops
        let mut dropped = 0u64;
        // Token-mean loss: every rank needs the step's supervised-token count before its first backward.
        let global_tokens = match recipe.batch.loss_mean {
            LossMean::MicroBatch => None,
            LossMean::Tokens => {
                let local: usize = data.micro_batches.iter().map(|mb| mb.supervised_tokens()).sum();
                let t = tch::Tensor::from_slice(&[local as f32]).to_device(if device.is_cuda() { device } else { Device::Cpu });
                comm.all_reduce_sum(&t)?;
                Some(t.double_value(&[0]).max(1.0))
            }
        };
        for mb in &data.micro_batches {
            let input = model_input(mb, image_size, device);
            let (mb_scale, weight) = match global_tokens {
                None => (scale, 1.0),
                Some(n) => (mb.supervised_tokens() as f64 / n, mb.supervised_tokens() as f64),
            };
            let loss = forward_backward(&mut st, comm, &cfg, &input, mb_scale, recipe.activation_checkpointing)?;
            let slot = if mb.kind == BatchKind::Id { 0 } else { 2 };
            if mb.batch > 0 && weight > 0.0 {
                sums[slot] += loss * weight;
                sums[slot + 1] += weight;
            }
            sums[4] += (mb.batch * mb.seq) as f64;
            sums[5] += flops::micro_batch_flops(&cfg, mb.batch, mb.seq, mb.num_images());
            dropped += (mb.dropped_bad_image + mb.dropped_overlong) as u64;
        }
        st.finish_grads(comm)?;
        let k = ts.step + 1;
        let lr = schedule.lr_at(k);
        let stats = st.step(comm, &opt, lr, recipe.optimizer.clip_grad_norm)?;
        // One small all-reduce: losses, counts, tokens, FLOPs and the stop flag agreed across ranks.
        let agg = tch::Tensor::from_slice(&[
            sums[0],
            sums[1],
            sums[2],
            sums[3],
            sums[4],
            sums[5],
            dropped as f64,
            stop.load(Ordering::Relaxed) as i32 as f64,
        ])
        .to_kind(Kind::Double);
        let agg = agg.to_device(if device.is_cuda() { device } else { Device::Cpu });
        let agg32 = agg.to_kind(Kind::Float);
        // Reduce in f64 where the backend can (CPU backends stage through f32; counts stay exact).
        comm.all_reduce_sum(&agg32)?;
        let a: Vec<f64> =
            Vec::<f32>::try_from(&agg32.to_device(Device::Cpu)).expect("vec").into_iter().map(|v| v as f64).collect();
        if a[1] + a[3] == 0.0 {
            return Err(Error::Other(format!(
                "step {}: every sample of the global batch was dropped ({} dropped in this step: over data.max_len ({}), \
                 no answer token left after truncation, or an undecodable image; the warnings above name them)",
                ts.step + 1,
                a[6],
                recipe.data.max_len
            )));
        }
        let loss_id = if a[1] > 0.0 { a[0] / a[1] } else { f64::NAN };
        let loss_general = if a[3] > 0.0 { a[2] / a[3] } else { f64::NAN };
        let loss_all = if a[1] + a[3] > 0.0 { (a[0] + a[2]) / (a[1] + a[3]) } else { f64::NAN };
        ts.samples_dropped += a[6] as u64;
        ts.step = k;
        ts.adam_step = st.adam_step;
        ts.reader = data.state_after;
        if stats.skipped || !loss_all.is_finite() {
            ts.nonfinite_in_row += 1;
            ts.nonfinite_total += 1;
            metrics::counter!("idavlm_nonfinite_steps_total").increment(1);
            tracing::warn!(
                step = k,
                grad_norm = stats.grad_norm,
                loss = loss_all,
                "non-finite loss or gradient norm: step skipped"
            );
        } else {
            ts.nonfinite_in_row = 0;
        }
        let step_s = t0.elapsed().as_secs_f64();
        let rec = StepRecord {
            step: k,
            loss: loss_all,
            loss_id,
            loss_general,
            lr,
            grad_norm: stats.grad_norm,
            skipped: stats.skipped,
            step_s,
            tokens_per_s: a[4] / step_s,
            tokens_per_s_per_rank: a[4] / step_s / world as f64,
            mfu: peak.map(|p| a[5] / step_s / (world as f64 * p)),
            mem_gib: memory_gib(device),
            samples_dropped: ts.samples_dropped,
        };
        summary.losses.push(loss_all);
        reporter.record(&rec)?;
        summary.steps_run += 1;
        summary.final_step = k;

        if let Some(saved) = saver.poll()? {
            note_saved(&mut reporter, &mut ts, &saved, part_bytes, budget, rank)?;
        }
        let stop_now = a[7] > 0.0;
        let too_many = ts.nonfinite_in_row >= recipe.max_nonfinite_in_row;
        let due = recipe.checkpoint.every_steps.is_some_and(|n| n > 0 && k % n == 0);
        let last = k == total_steps && recipe.checkpoint.at_end;
        if due || last || stop_now {
            // On a stop signal: exactly what resume needs (no model export), written before exiting.
            let o = if stop_now { save_opts(false, false) } else { save_opts(recipe.checkpoint.save_model, recipe.checkpoint.background) };
            let stall = saver.save(comm, &st, &ts, &recipe_yaml, &o)?;
            let dir = checkpoint::step_dir(&ckpt_root, ts.step);
            for saved in stall.previous.iter().chain(&stall.done) {
                note_saved(&mut reporter, &mut ts, saved, part_bytes, budget, rank)?;
            }
            reporter.note(&format!(
                "checkpoint {}: training stalled {:.2}s (staging {:.2}s, waiting for the previous save {:.2}s){}",
                dir.display(),
                stall.stage_s + stall.waited_s,
                stall.stage_s,
                stall.waited_s,
                if o.background { ", written in the background" } else { "" }
            ));
            summary.last_checkpoint = Some(dir);
        }
        if stop_now {
            reporter.note("stop signal: checkpoint written, exiting");
            summary.preempted = true;
            break;
        }
        if too_many {
            reporter.note(&format!("{} non-finite steps in a row: stopping", ts.nonfinite_in_row));
            summary.stopped_nonfinite = true;
            break;
        }
    }
    if let Some(saved) = saver.wait()? {
        note_saved(&mut reporter, &mut ts, &saved, part_bytes, budget, rank)?;
    }
    reporter.finish(&summary)?;
    Ok(summary)
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

/// A finished checkpoint: its speed goes into the next checkpoint's trainer state and the log.
fn note_saved(
    reporter: &mut Reporter,
    ts: &mut TrainerState,
    s: &checkpoint::Saved,
    part_bytes: u64,
    budget: f64,
    rank: usize,
) -> Result<()> {
    let sp = s.speed;
    ts.last_save = Some(sp);
    let mb_s = sp.bytes as f64 / 1e6 / sp.write_s.max(1e-9);
    if rank == 0 {
        reporter.note(&format!(
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
        preemption_save_s(&sp, part_bytes, budget);
    }
    Ok(())
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

pub fn resolve_resume(s: &str) -> Resume {
    match s {
        "none" | "" => Resume::None,
        "auto" => Resume::Auto,
        p => Resume::Path(Path::new(p).to_path_buf()),
    }
}
