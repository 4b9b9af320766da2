//! Workload W1 of PERF.md, run through the trainer's own step code and ZeRO state: full-size
//! Qwen-VL-Chat + ID-Former (random weights), micro-batch 2 x 2048 tokens with 4 images per sample
//! (2 references "Name is <img>", 2 test images), accumulation 8, bf16 compute, f32 master and AdamW.
//! `--layers` / `--vit-layers` shrink it for smaller machines, as the peer's flags do.

use std::time::Instant;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::comm::Communicator;
use crate::error::Result;
use crate::flops;
use crate::memplan::{Checkpointing, Planner};
use crate::model::{ModelConfig, ModelInput, ParamSet};
use crate::optim::AdamW;
use crate::plan::{compute_kind, Trainable};
use crate::recipe::{Dtype, LoraSection, ZeroStage};
use crate::step::forward_backward;
use crate::zero::Sharded;
use idavlm_shards::chat::ImageRole;
use idavlm_shards::tokenizer::{IMG_END, IMG_PAD, IMG_START, IS_TOKEN};

#[derive(Clone, Debug)]
pub struct W1 {
    pub layers: i64,
    pub vit_layers: i64,
    pub micro: usize,
    pub accum: usize,
    pub seq: usize,
    pub images: usize,
    pub steps: usize,
    pub zero: ZeroStage,
    pub id_former: bool,
    /// Activation recomputation: `auto` plans from the memory in use after the first (warm-up) step.
    pub ac: Checkpointing,
    /// LoRA with the original Qwen-VL script's settings (r 64, alpha 16, dropout 0.05, c_attn,
    /// attn.c_proj, w1, w2; wte and lm_head in full) instead of full fine-tuning.
    pub lora: bool,
}

#[derive(Debug, Serialize)]
pub struct W1Result {
    pub system: String,
    /// LLM blocks recomputed in the backward of each micro-batch (after the warm-up step).
    pub recomputed_blocks: usize,
    pub gpus: usize,
    pub gpu: String,
    pub layers: i64,
    pub vit_layers: i64,
    pub id_former: bool,
    pub trainable_params: usize,
    pub micro_batch: usize,
    pub grad_accum: usize,
    pub seq: usize,
    pub images_per_sample: usize,
    pub step_s: f64,
    pub step_times: Vec<f64>,
    pub optimizer_s: f64,
    pub tokens_per_s_per_gpu: f64,
    pub mfu: f64,
    pub peak_mem_gib: f64,
    /// Seconds per phase of one extra step run with synchronisation at every phase boundary.
    pub split_s: std::collections::BTreeMap<String, f64>,
    pub split_step_s: f64,
    /// Bus bandwidth (GB/s) of the collectives inside that step, and of the same collectives alone
    /// on 1 GiB buffers (the raw figure on this machine).
    pub in_step_reduce_scatter_busbw: Option<f64>,
    pub in_step_all_gather_busbw: Option<f64>,
    pub raw_reduce_scatter_busbw: f64,
    pub raw_all_gather_busbw: f64,
    pub raw_all_reduce_busbw: f64,
}

/// Bus bandwidth in GB/s of `iters` runs of a collective over `bytes` (NCCL's convention).
fn raw_busbw(comm: &dyn Communicator, device: Device, which: &str, bytes: usize) -> Result<f64> {
    let w = comm.world();
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let (kind, elt) = if which == "all_gather" { (Kind::BFloat16, 2) } else { (Kind::Float, 4) };
    let n = (bytes / elt / w * w) as i64;
    let big = Tensor::ones([n], (kind, device));
    let small = Tensor::ones([n / w as i64], (kind, device));
    let run = || -> Result<()> {
        match which {
            "reduce_scatter" => comm.reduce_scatter_sum(&big, &small),
            "all_gather" => comm.all_gather(&small, &big),
            _ => comm.all_reduce_sum(&big),
        }
    };
    run()?;
    sync();
    let iters = 5;
    let t = Instant::now();
    for _ in 0..iters {
        run()?;
    }
    sync();
    let s = t.elapsed().as_secs_f64() / iters as f64;
    let total = (n as usize * elt) as f64;
    let factor = if which == "all_reduce" { 2.0 * (w as f64 - 1.0) / w as f64 } else { (w as f64 - 1.0) / w as f64 };
    Ok(total * factor / s / 1e9)
}

/// The synthetic micro-batch of W1 (the same for every micro-step, as the peer's).
pub fn w1_input(w: &W1, vocab: i64, image_size: i64, device: Device, rank: usize) -> ModelInput {
    tch::manual_seed(1000 + rank as i64);
    let (b, s, n) = (w.micro as i64, w.seq as i64, w.images);
    let ids = Tensor::randint(151_643, [b, s], (Kind::Int64, Device::Cpu)).clamp(0, vocab - 1);
    let mut v: Vec<i64> = Vec::<i64>::try_from(ids.view([-1])).expect("ids");
    let (mut rows, mut starts, mut roles) = (vec![], vec![], vec![]);
    let refs = if w.id_former { n / 2 } else { 0 };
    for r in 0..b as usize {
        for i in 0..n {
            let st = 20 + i * 258;
            let base = r * w.seq;
            v[base + st] = IMG_START as i64;
            for k in 1..=256 {
                v[base + st + k] = IMG_PAD as i64;
            }
            v[base + st + 257] = IMG_END as i64;
            // References read "Name is <img>": " is" two positions before <img>.
            v[base + st - 2] = if i < refs { IS_TOKEN as i64 } else { 11 };
            rows.push(r);
            starts.push(st);
            roles.push(if i < refs {
                ImageRole::Reference
            } else if refs > 0 {
                ImageRole::Test
            } else {
                ImageRole::General
            });
        }
    }
    let ids = Tensor::from_slice(&v).view([b, s]);
    let labels = ids.copy();
    let _ = labels.narrow(1, 0, s / 2).fill_(-100);
    ModelInput {
        input_ids: ids.to_device(device),
        labels: labels.to_device(device),
        pixels: Tensor::randn([b * n as i64, 3, image_size, image_size], (Kind::BFloat16, device)),
        image_rows: rows,
        image_starts: starts,
        image_roles: roles,
    }
}

pub fn run(w: &W1, comm: &dyn Communicator, device: Device, gpu_name: &str) -> Result<W1Result> {
    let mut cfg = ModelConfig::qwen_vl_chat();
    cfg.num_hidden_layers = w.layers;
    cfg.visual.layers = w.vit_layers;
    cfg.id_former = w.id_former;
    cfg.lora = w.lora.then(|| LoraSection::default().spec());
    let params = ParamSet::init(&cfg, device, compute_kind(Dtype::Auto, device), 0);
    let trainable = Trainable::of(cfg.lora.as_ref(), &Default::default());
    let mut st = Sharded::new(&cfg, params, &|s| trainable.contains(s), w.zero, comm);
    let input = w1_input(w, cfg.vocab_size, cfg.visual.image_size, device, comm.rank());
    let opt = AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let scale = 1.0 / (w.accum * comm.world()) as f64;
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let mut planner = Planner::new(w.ac, &cfg, w.zero, st.kind.elt_size_in_bytes(), st.block_numel(), None);
    let mut times = Vec::new();
    let mut opt_times = Vec::new();
    for step in 0..w.steps {
        sync();
        comm.barrier()?;
        let t0 = Instant::now();
        let mut loss = 0.0;
        let recomputed = planner.recomputed(w.micro, w.seq);
        planner.log_once(w.micro, w.seq);
        for _ in 0..w.accum {
            loss = forward_backward(&mut st, comm, &cfg, &input, scale, recomputed, 0)?;
        }
        sync();
        let t1 = Instant::now();
        st.finish_grads(comm)?;
        st.step(comm, &opt, 5e-6, Some(1.0))?;
        sync();
        let dt = t0.elapsed().as_secs_f64();
        opt_times.push(t1.elapsed().as_secs_f64());
        planner.calibrate(comm, device)?;
        times.push(dt);
        if comm.rank() == 0 {
            eprintln!("step {step} loss {loss:.4} time {dt:.2}s (optimizer + reduce {:.2}s)", t1.elapsed().as_secs_f64());
        }
    }
    // Device memory in use after the timed steps (libtorch's pool at its high-water mark, NCCL buffers).
    let peak = crate::runtime::cuda_max_memory_allocated().unwrap_or(0) as f64 / (1u64 << 30) as f64;
    // One more step with the time split (synchronised phases).
    crate::profile::take();
    crate::profile::enable(true, device);
    sync();
    let t0 = Instant::now();
    let recomputed = planner.recomputed(w.micro, w.seq);
    for _ in 0..w.accum {
        forward_backward(&mut st, comm, &cfg, &input, scale, recomputed, 0)?;
    }
    st.finish_grads(comm)?;
    crate::profile::time(crate::profile::OPTIMIZER, 0.0, || st.step(comm, &opt, 5e-6, Some(1.0)))?;
    sync();
    let split_step_s = t0.elapsed().as_secs_f64();
    crate::profile::enable(false, device);
    let split = crate::profile::take();
    let wsz = comm.world() as f64;
    let busbw = |i: usize| (split.secs[i] > 0.0).then(|| split.bytes[i] * (wsz - 1.0) / wsz / split.secs[i] / 1e9);
    let split_s = crate::profile::PHASES.iter().zip(split.secs).map(|(n, s)| (n.to_string(), s)).collect();
    let raw_rs = raw_busbw(comm, device, "reduce_scatter", 1 << 30)?;
    let raw_ag = raw_busbw(comm, device, "all_gather", 1 << 30)?;
    let raw_ar = raw_busbw(comm, device, "all_reduce", 1 << 30)?;
    let mut measured: Vec<f64> = times[1.min(times.len() - 1)..].to_vec();
    measured.sort_by(f64::total_cmp);
    let median = measured[measured.len() / 2];
    let tokens = (w.micro * w.seq * w.accum) as f64;
    let fl = flops::micro_batch_flops(&cfg, w.micro, w.seq, w.micro * w.images) * w.accum as f64;
    let pk = Tensor::from_slice(&[peak as f32]).to_device(device);
    // The job's peak: the largest over ranks (max through a sum of one-hot contributions is not
    // available; gather every rank's value instead).
    let all = Tensor::zeros([comm.world() as i64], (Kind::Float, device));
    comm.all_gather(&pk, &all)?;
    let peak_all = Vec::<f32>::try_from(all.to_device(Device::Cpu)).expect("peaks").into_iter().fold(0f32, f32::max) as f64;
    Ok(W1Result {
        system: format!("idavlm-zero{}{}-ac-{:?}", w.zero, if w.lora { "-lora" } else { "" }, w.ac).to_lowercase(),
        recomputed_blocks: planner.recomputed(w.micro, w.seq),
        gpus: comm.world(),
        gpu: gpu_name.to_string(),
        layers: w.layers,
        vit_layers: w.vit_layers,
        id_former: w.id_former,
        trainable_params: st.layout.trainable_numel(),
        micro_batch: w.micro,
        grad_accum: w.accum,
        seq: w.seq,
        images_per_sample: w.images,
        step_s: median,
        step_times: times,
        optimizer_s: opt_times[opt_times.len() - 1],
        tokens_per_s_per_gpu: tokens / median,
        // PERF.md: model FLOPs of the step over (seconds x GPUs x peak); `fl` is one rank's share.
        mfu: fl * comm.world() as f64 / median / (comm.world() as f64 * flops::H100_PEAK_BF16),
        peak_mem_gib: peak_all,
        split_s,
        split_step_s,
        in_step_reduce_scatter_busbw: busbw(crate::profile::REDUCE_SCATTER),
        in_step_all_gather_busbw: busbw(crate::profile::ALL_GATHER),
        raw_reduce_scatter_busbw: raw_rs,
        raw_all_gather_busbw: raw_ag,
        raw_all_reduce_busbw: raw_ar,
    })
}
