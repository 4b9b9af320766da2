//! Workload W1 of PERF.md, run through the trainer's own step code and ZeRO state: full-size
//! Qwen-VL-Chat + ID-Former (random weights), micro-batch 2 x 2048 tokens with 4 images per sample
//! (2 references "Name is <img>", 2 test images), accumulation 8, bf16 compute, f32 master and AdamW.
//! `--layers` / `--vit-layers` shrink it for smaller machines, as the peer's flags do.
//!
//! Workload W2 (`--lengths w2_lengths.json`): the same model and step, but samples shaped like the 585
//! MM-ID items (images, prompt and answer tokens each; answers supervised), in the order of Python's
//! `random.Random(0).shuffle`, packed into micro-batches of `--pack-tokens` by the trainer's packer; the
//! figure is real (non-padding) tokens/s/GPU.

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
use crate::recipe::{Dtype, LoraSection, ReduceDtype, ZeroStage};
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
    /// W2: the sample shapes (PERF.md's w2_lengths.json), packed into micro-batches of `pack_tokens`
    /// over windows of `pack_window` samples.
    pub lengths: Option<W2Lengths>,
    pub pack_tokens: usize,
    pub pack_window: usize,
    /// The dtype gradients are reduced in (`zero.reduce_dtype`).
    pub reduce_dtype: ReduceDtype,
    /// ZeRO-3: kept blocks free their gathered parameters after the forward (`zero.reshard_after_forward`).
    pub reshard_after_forward: bool,
    /// Bracket the last timed step with the CUDA profiler's start and stop (for `ncu
    /// --profile-from-start off`).
    pub cuda_profiler_step: bool,
    /// `memory.limit_gib` for `ac: auto` (None: the card's memory less a margin).
    pub memory_limit_gib: Option<f64>,
    /// Record the last timed step as a timeline into `FILE.rR.json` (rank R; [`crate::profile::trace_start`]).
    pub trace_step: Option<std::path::PathBuf>,
    /// The formulations the GPU paths run (a recipe's `kernels:`).
    pub kernels: crate::model::choice::Kernels,
}

/// PERF.md's w2_lengths.json: per sample (images, prompt text tokens, answer tokens).
#[derive(Clone, Debug, serde::Deserialize)]
pub struct W2Lengths {
    pub image_tokens: usize,
    pub samples: Vec<(usize, usize, usize)>,
}

impl W2Lengths {
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| crate::error::Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| crate::error::Error::Config(format!("{}: {e}", path.display())))
    }

    /// The samples in PERF.md's order (`random.Random(0).shuffle` of the indices).
    pub fn ordered(&self) -> Vec<(usize, usize, usize)> {
        python_shuffle(self.samples.len(), 0).into_iter().map(|i| self.samples[i]).collect()
    }

    pub fn len_of(&self, s: (usize, usize, usize)) -> usize {
        s.0 * self.image_tokens + s.1 + s.2
    }
}

/// The permutation Python's `random.Random(seed).shuffle(list(range(n)))` leaves (MT19937 seeded by
/// init_by_array, `_randbelow` by rejection over getrandbits) for seeds below 2^32.
pub fn python_shuffle(n: usize, seed: u32) -> Vec<usize> {
    let mut mt = [0u32; 624];
    mt[0] = 19_650_218;
    for i in 1..624 {
        mt[i] = 1_812_433_253u32.wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_add(i as u32);
    }
    // init_by_array with the key [seed].
    let key = [seed];
    let (mut i, mut j) = (1usize, 0usize);
    for _ in 0..624.max(key.len()) {
        mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_664_525)).wrapping_add(key[j]).wrapping_add(j as u32);
        i += 1;
        j += 1;
        if i >= 624 {
            mt[0] = mt[623];
            i = 1;
        }
        if j >= key.len() {
            j = 0;
        }
    }
    for _ in 0..623 {
        mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_566_083_941)).wrapping_sub(i as u32);
        i += 1;
        if i >= 624 {
            mt[0] = mt[623];
            i = 1;
        }
    }
    mt[0] = 0x8000_0000;
    let mut idx = 624;
    let mut next = move || {
        if idx >= 624 {
            for k in 0..624 {
                let y = (mt[k] & 0x8000_0000) | (mt[(k + 1) % 624] & 0x7fff_ffff);
                mt[k] = mt[(k + 397) % 624] ^ (y >> 1) ^ if y & 1 == 1 { 0x9908_b0df } else { 0 };
            }
            idx = 0;
        }
        let mut y = mt[idx];
        idx += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    };
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let bound = (i + 1) as u32;
        let k = 32 - bound.leading_zeros();
        let j = loop {
            let r = next() >> (32 - k);
            if r < bound {
                break r;
            }
        };
        v.swap(i, j as usize);
    }
    v
}

/// One packed micro-batch of W2-shaped samples: random ids, answers supervised, each sample's images
/// after the first half of its prompt (the first half of them references when the ID-Former runs).
fn w2_input(
    shapes: &[(usize, usize, usize)],
    image_tokens: usize,
    id_former: bool,
    vocab: i64,
    image_size: i64,
    device: Device,
) -> ModelInput {
    let (mut ids, mut labels, mut rows, mut starts, mut roles, mut groups, mut lens) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for (g, &(n, p, a)) in shapes.iter().enumerate() {
        let offset = ids.len();
        let text = |k: usize| {
            Vec::<i64>::try_from(Tensor::randint(151_643.min(vocab), [k as i64], (Kind::Int64, Device::Cpu))).expect("ids")
        };
        let p1 = p / 2;
        ids.extend(text(p1));
        let refs = if id_former { n / 2 } else { 0 };
        for i in 0..n {
            starts.push(ids.len());
            ids.push(IMG_START as i64);
            ids.extend(std::iter::repeat_n(IMG_PAD as i64, image_tokens - 2));
            ids.push(IMG_END as i64);
            rows.push(0);
            groups.push(g);
            roles.push(role(i, refs));
        }
        ids.extend(text(p - p1));
        let answer = text(a);
        labels.extend(std::iter::repeat_n(-100i64, ids.len() - offset));
        labels.extend(&answer);
        ids.extend(answer);
        labels[offset] = -100;
        lens.push(ids.len() - offset);
    }
    let s = ids.len() as i64;
    ModelInput {
        supervised: Some(ModelInput::supervised_positions(&labels, 1, s as usize, device)),
        input_ids: Tensor::from_slice(&ids).view([1, s]).to_device(device),
        labels: Tensor::from_slice(&labels).view([1, s]).to_device(device),
        pixels: Tensor::randn([rows.len() as i64, 3, image_size, image_size], (Kind::BFloat16, device)),
        image_rows: rows,
        image_starts: starts,
        image_roles: roles,
        image_groups: groups,
        seq_lens: lens,
    }
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
    /// W1: tokens/s/GPU; W2: real (non-padding) tokens/s/GPU.
    pub tokens_per_s_per_gpu: f64,
    pub mfu: f64,
    /// W2 only: tokens over micro-batch capacity, micro-batches of one pass over the samples, and samples
    /// longer than the budget (left out).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packing_efficiency: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packed_micro_batches: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples_over_budget: Option<usize>,
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

/// Image `i` of a synthetic sample whose first `refs` images are references: the rest are test images
/// (general ones when there are no references).
fn role(i: usize, refs: usize) -> ImageRole {
    if i < refs {
        ImageRole::Reference
    } else if refs > 0 {
        ImageRole::Test
    } else {
        ImageRole::General
    }
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
            roles.push(role(i, refs));
        }
    }
    let ids = Tensor::from_slice(&v).view([b, s]);
    let labels = ids.copy();
    let _ = labels.narrow(1, 0, s / 2).fill_(-100);
    let host_labels = Vec::<i64>::try_from(labels.view([-1])).expect("labels");
    ModelInput {
        supervised: Some(ModelInput::supervised_positions(&host_labels, b as usize, s as usize, device)),
        input_ids: ids.to_device(device),
        labels: labels.to_device(device),
        pixels: Tensor::randn([b * n as i64, 3, image_size, image_size], (Kind::BFloat16, device)),
        image_groups: rows.clone(),
        image_rows: rows,
        image_starts: starts,
        image_roles: roles,
        seq_lens: vec![],
    }
}

/// Starts or stops the CUDA profiler's range (what `ncu --profile-from-start off` records); a failure
/// is reported, not fatal.
fn cuda_profiler(start: bool) {
    use cudarc::driver::sys::{cuProfilerStart, cuProfilerStop, CUresult};
    // SAFETY: plain driver calls on the context libtorch made current.
    let r = unsafe {
        if start {
            cuProfilerStart()
        } else {
            cuProfilerStop()
        }
    };
    if r != CUresult::CUDA_SUCCESS {
        eprintln!("cuProfiler{}: {r:?}", if start { "Start" } else { "Stop" });
    }
}

pub fn run(w: &W1, comm: &dyn Communicator, device: Device, gpu_name: &str) -> Result<W1Result> {
    crate::model::choice::apply(&w.kernels);
    let mut cfg = ModelConfig::qwen_vl_chat();
    cfg.num_hidden_layers = w.layers;
    cfg.visual.layers = w.vit_layers;
    cfg.id_former = w.id_former;
    cfg.lora = w.lora.then(|| LoraSection::default().spec());
    let params = ParamSet::init(&cfg, device, compute_kind(Dtype::Auto, device), 0);
    let trainable = Trainable::of(cfg.lora.as_ref(), &Default::default());
    let mut st = Sharded::new(&cfg, params, &|s| trainable.contains(s), w.zero, comm);
    st.set_reduce_kind(w.reduce_dtype.kind());
    st.set_reshard_after_forward(w.reshard_after_forward);
    let (rank, world) = (comm.rank(), comm.world());
    // W1: one micro-batch for every micro-step. W2: the packed micro-batches in order, micro-batch m of
    // step k being global micro-batch (k * accum + j) * world + rank, cycling over the packing.
    let w1 = w.lengths.is_none().then(|| w1_input(w, cfg.vocab_size, cfg.visual.image_size, device, rank));
    let w2 = w.lengths.as_ref().map(|l| {
        let shapes = l.ordered();
        let lens: Vec<usize> = shapes.iter().map(|&s| l.len_of(s)).collect();
        let packing = idavlm_shards::pack::pack(&lens, w.pack_tokens, w.pack_window);
        let bins: Vec<Vec<(usize, usize, usize)>> = packing.bins.iter().map(|b| b.iter().map(|&i| shapes[i]).collect()).collect();
        (bins, packing.efficiency(&lens, w.pack_tokens), packing.too_long.len(), l.image_tokens)
    });
    // W2's micro-batches of every timed step and of the split step, built on the device before the
    // clock starts (as the peer builds its inputs): the timed steps measure training, not input making.
    let w2_inputs: Vec<(ModelInput, f64, f64)> = match &w2 {
        None => Vec::new(),
        Some((bins, _, _, image_tokens)) => (0..(w.steps + 1) * w.accum)
            .map(|m| {
                let bin = &bins[(m * world + rank) % bins.len()];
                tch::manual_seed((1000 + m * world + rank) as i64);
                let input = w2_input(bin, *image_tokens, w.id_former, cfg.vocab_size, cfg.visual.image_size, device);
                let real = input.seq_lens.iter().sum::<usize>() as f64;
                let fl = flops::packed_flops(&cfg, &input.seq_lens, input.image_rows.len());
                (input, real, fl)
            })
            .collect(),
    };
    let micro_input = |step: usize, j: usize| -> (ModelInput, f64, f64) {
        match &w1 {
            Some(input) => (
                input.shallow_clone(),
                (w.micro * w.seq) as f64,
                flops::micro_batch_flops(&cfg, w.micro, w.seq, w.micro * w.images),
            ),
            None => {
                let (input, real, fl) = &w2_inputs[step * w.accum + j];
                (input.shallow_clone(), *real, *fl)
            }
        }
    };
    let (plan_b, plan_s) = if w.lengths.is_some() { (1, w.pack_tokens) } else { (w.micro, w.seq) };
    let opt = AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let scale = 1.0 / (w.accum * comm.world()) as f64;
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let mut planner = Planner::new(w.ac, &cfg, st.kind.elt_size_in_bytes(), st.kept_block_numel(), w.memory_limit_gib)
        .with_explicit_blocks(crate::model::llm::explicit_runs(&cfg, st.device, st.kind));
    let mut times = Vec::new();
    let mut opt_times = Vec::new();
    // Real tokens and model FLOPs of this rank per step.
    let mut step_tokens = Vec::new();
    let mut step_flops = Vec::new();
    for step in 0..w.steps {
        sync();
        comm.barrier()?;
        let profiled = w.cuda_profiler_step && step + 1 == w.steps && device.is_cuda();
        if profiled {
            cuda_profiler(true);
        }
        let traced = w.trace_step.as_ref().filter(|_| step + 1 == w.steps);
        if traced.is_some() {
            crate::profile::trace_start(device).map_err(crate::error::Error::Config)?;
        }
        let t0 = Instant::now();
        let mut loss = None;
        let recomputed = planner.recomputed(plan_b, plan_s);
        planner.log_once(plan_b, plan_s);
        let (mut tok, mut fl) = (0.0, 0.0);
        for j in 0..w.accum {
            let (input, t, f) = micro_input(step, j);
            loss = Some(forward_backward(&mut st, comm, &cfg, &input, scale, recomputed, 0)?);
            tok += t;
            fl += f;
        }
        step_tokens.push(tok);
        step_flops.push(fl);
        sync();
        let t1 = Instant::now();
        st.finish_grads(comm)?;
        st.step(comm, &opt, 5e-6, Some(1.0))?;
        sync();
        let dt = t0.elapsed().as_secs_f64();
        let opt_s = t1.elapsed().as_secs_f64();
        if profiled {
            cuda_profiler(false);
        }
        if let Some(path) = traced {
            let path = std::path::PathBuf::from(format!("{}.r{}.json", path.display(), comm.rank()));
            crate::profile::trace_stop(&path).map_err(crate::error::Error::Config)?;
        }
        opt_times.push(opt_s);
        planner.calibrate(comm, device)?;
        times.push(dt);
        if comm.rank() == 0 {
            let loss = loss.map_or(f64::NAN, |l| l.double_value(&[]));
            eprintln!("step {step} loss {loss:.4} time {dt:.2}s (optimizer + reduce {opt_s:.2}s)");
        }
    }
    // Device memory in use after the timed steps (libtorch's pool at its high-water mark, NCCL buffers).
    let peak = crate::runtime::cuda_max_memory_allocated().unwrap_or(0) as f64 / (1u64 << 30) as f64;
    // One more step with the time split (synchronised phases).
    crate::profile::take();
    crate::profile::enable(true, device);
    sync();
    let t0 = Instant::now();
    let recomputed = planner.recomputed(plan_b, plan_s);
    for j in 0..w.accum {
        let _ = forward_backward(&mut st, comm, &cfg, &micro_input(w.steps, j).0, scale, recomputed, 0)?;
    }
    st.finish_grads(comm)?;
    crate::profile::time(crate::profile::OPTIMIZER, 0.0, || st.step(comm, &opt, 5e-6, Some(1.0)))?;
    sync();
    let split_step_s = t0.elapsed().as_secs_f64();
    crate::profile::enable(false, device);
    let split = crate::profile::take();
    let wsz = comm.world() as f64;
    let busbw = |i: usize| (split.secs[i] > 0.0).then(|| split.bytes[i] * (wsz - 1.0) / wsz / split.secs[i] / 1e9);
    let split_s = split.named();
    let raw_rs = raw_busbw(comm, device, "reduce_scatter", 1 << 30)?;
    let raw_ag = raw_busbw(comm, device, "all_gather", 1 << 30)?;
    let raw_ar = raw_busbw(comm, device, "all_reduce", 1 << 30)?;
    let first = 1.min(times.len() - 1);
    let mut measured: Vec<f64> = times[first..].to_vec();
    measured.sort_by(f64::total_cmp);
    let median = measured[measured.len() / 2];
    // Tokens and FLOPs: W1's are the same every step; W2's vary, so its rates are totals over the timed
    // steps (every rank's, summed by an all-reduce) over their total time.
    let timed_s: f64 = times[first..].iter().sum();
    let totals =
        comm.sum_over_ranks(&[step_tokens[first..].iter().sum::<f64>(), step_flops[first..].iter().sum::<f64>()], device)?;
    let (tokens_per_s, flops_per_s) = if w.lengths.is_some() {
        (totals[0] / world as f64 / timed_s, totals[1] / timed_s)
    } else {
        (step_tokens[0] / median, step_flops[0] * world as f64 / median)
    };
    let pk = Tensor::from_slice(&[peak as f32]).to_device(device);
    // The job's peak: the largest over ranks (max through a sum of one-hot contributions is not
    // available; gather every rank's value instead).
    let all = Tensor::zeros([comm.world() as i64], (Kind::Float, device));
    comm.all_gather(&pk, &all)?;
    let peak_all = Vec::<f32>::try_from(all.to_device(Device::Cpu)).expect("peaks").into_iter().fold(0f32, f32::max) as f64;
    Ok(W1Result {
        system: format!(
            "idavlm-zero{}{}{}{}{}-ac-{:?}",
            w.zero,
            if w.zero == ZeroStage::Three && !w.reshard_after_forward { "-no-reshard" } else { "" },
            if w.reduce_dtype == ReduceDtype::Bf16 { "-reduce-bf16" } else { "" },
            if w.lora { "-lora" } else { "" },
            if w.lengths.is_some() { format!("-w2-packed{}", w.pack_tokens) } else { String::new() },
            w.ac
        )
        .to_lowercase(),
        recomputed_blocks: planner.recomputed(plan_b, plan_s),
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
        tokens_per_s_per_gpu: tokens_per_s,
        // PERF.md: model FLOPs of the step over (seconds x GPUs x peak).
        mfu: flops_per_s / (world as f64 * flops::H100_PEAK_BF16),
        packing_efficiency: w2.as_ref().map(|x| x.1),
        packed_micro_batches: w2.as_ref().map(|x| x.0.len()),
        samples_over_budget: w2.as_ref().map(|x| x.2),
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

#[cfg(test)]
mod tests {
    /// The permutations Python 3 prints for `random.Random(0).shuffle(list(range(n)))`.
    #[test]
    fn python_shuffle_matches_python() {
        assert_eq!(super::python_shuffle(10, 0), vec![7, 8, 1, 5, 3, 4, 2, 0, 9, 6]);
        let v = super::python_shuffle(585, 0);
        assert_eq!(&v[..8], &[83, 507, 17, 289, 581, 172, 3, 299]);
        assert_eq!(&v[582..], &[41, 430, 394]);
    }
}
