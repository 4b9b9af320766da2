//! idavlm-worker: one rank of a training job (normally started by `idavlm-launch`), plus tools that
//! need libtorch: device report, parameter counts, checkpoint export.
//!
//! Exit codes: 0 done; 1 error; 3 a collective timed out (a peer died or hangs); 4 stopped after too
//! many non-finite steps; 75 stopped by SIGTERM/SIGUSR1 after writing a checkpoint (requeue).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use idavlm::comm::{tcp::TcpComm, Communicator, Local, RankInfo};
use idavlm::model::{count_params, ModelConfig};
use idavlm::recipe::ZeroStage;
use idavlm::train::{self, Resume, EXIT_NONFINITE, EXIT_PREEMPTED};
use idavlm::{recipe, runtime};

#[derive(Parser)]
#[command(name = "idavlm-worker", version, about = "One rank of an idavlm training job, and libtorch-side tools")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train this rank (rank, world and rendezvous from RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
    Train {
        recipe: PathBuf,
        /// Override a recipe key: --set optimizer.lr=1e-5 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// `auto` (newest complete checkpoint in checkpoint.dir), `none`, or a checkpoint folder.
        #[arg(long, default_value = "auto", value_parser = parse_resume)]
        resume: Resume,
        /// Communicator (auto: nccl on GPUs, mpi under mpirun when built with it, else tcp).
        #[arg(long, value_enum, default_value_t = CommKind::Auto)]
        comm: CommKind,
    },
    /// Print every key the recipe schema accepts, one per line (the keys docs/recipes.md documents).
    RecipeKeys,
    /// Report libtorch, the CUDA devices, and time a bf16 matmul on each.
    Info {
        #[arg(long, default_value_t = 8192)]
        size: i64,
    },
    /// Check the GPU formulations (fused RMS norm, RoPE forms, and the NVRTC kernels: RoPE, SwiGLU,
    /// cross-entropy, AdamW, gradient casts/adds; the explicit LLM block against autograd) against their
    /// references on every CUDA device (else the CPU: norm and RoPE forms) in f32 and bf16 at a W1
    /// block's shape, forward and gradient, and time both; exits 1 when one is off by more than its
    /// dtype's rounding.
    Kernels {
        /// Tokens per micro-batch row, rows, heads, head dim.
        #[arg(long, default_value_t = 2048)]
        seq: i64,
        #[arg(long, default_value_t = 2)]
        rows: i64,
        #[arg(long, default_value_t = 32)]
        heads: i64,
        #[arg(long, default_value_t = 128)]
        head_dim: i64,
        #[arg(long, default_value_t = 20)]
        reps: usize,
    },
    /// Parameter counts of a model preset or HF config.json.
    Params {
        #[arg(long, default_value = "qwen-vl-chat")]
        preset: String,
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        id_former: bool,
    },
    /// Workload W1 of PERF.md through the trainer's step code (ranks from the launcher's environment).
    Bench {
        #[arg(long, default_value_t = 32)]
        layers: i64,
        #[arg(long, default_value_t = 48)]
        vit_layers: i64,
        #[arg(long, default_value_t = 2)]
        micro_batch: usize,
        #[arg(long, default_value_t = 8)]
        grad_accum: usize,
        #[arg(long, default_value_t = 2048)]
        seq: usize,
        #[arg(long, default_value_t = 4)]
        images: usize,
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// ZeRO stage: 1, 2 or 3.
        #[arg(long, default_value = "3")]
        zero: ZeroStage,
        #[arg(long)]
        no_id_former: bool,
        /// Activation recomputation: auto (keep what fits after the warm-up step), full, none, or a number
        /// of blocks to keep.
        #[arg(long, default_value = "full")]
        ac: idavlm::memplan::Checkpointing,
        /// LoRA with the original Qwen-VL script's settings (r 64, alpha 16, dropout 0.05 on c_attn,
        /// attn.c_proj, w1, w2; wte and lm_head trained in full) instead of full fine-tuning.
        #[arg(long)]
        lora: bool,
        /// Workload W2: PERF.md's w2_lengths.json; its samples are packed into micro-batches of
        /// --pack-tokens and the result is real tokens/s/GPU (--micro-batch, --seq and --images unused).
        #[arg(long)]
        lengths: Option<PathBuf>,
        #[arg(long, default_value_t = 4096)]
        pack_tokens: usize,
        #[arg(long, default_value_t = 512)]
        pack_window: usize,
        /// The dtype gradients are reduced in (zero.reduce_dtype).
        #[arg(long, value_enum, default_value = "f32")]
        reduce_dtype: idavlm::recipe::ReduceDtype,
        /// ZeRO-3: kept blocks keep their gathered parameters until the backward instead of freeing
        /// them after the forward (zero.reshard_after_forward: false).
        #[arg(long)]
        no_reshard_after_forward: bool,
        /// The libtorch ops instead of the NVRTC kernels (kernels.fused: false).
        #[arg(long)]
        no_fused: bool,
        /// The autograd LLM block instead of the explicit one (kernels.explicit_block: false).
        #[arg(long)]
        autograd_block: bool,
        /// The explicit block recomputes its norms and SwiGLU product (kernels.block_recompute).
        #[arg(long)]
        block_recompute: bool,
        /// The resampler's and ID-Former's attention (kernels.mha_attention).
        #[arg(long, value_enum, default_value_t = idavlm::model::choice::MhaAttention::Flash)]
        mha_attention: idavlm::model::choice::MhaAttention,
        /// Bracket the last timed step with cuProfilerStart/Stop, so that `ncu --profile-from-start off`
        /// records that one step's kernels (scripts/gpu-experiment.sh opclass).
        #[arg(long)]
        cuda_profiler_step: bool,
        /// Record the last timed step as a timeline (libtorch's profiler: CPU ops, CUDA runtime calls,
        /// kernels; the phases as named ranges) into this Chrome trace, rank R's as FILE.rR.json
        /// (read it with scripts/trace-gaps.py).
        #[arg(long)]
        trace_step: Option<PathBuf>,
        /// The memory limit `--ac auto` plans under (memory.limit_gib; default the card's memory less 4 GiB).
        #[arg(long)]
        memory_limit_gib: Option<f64>,
    },
    /// Verify a checkpoint folder and write its model in the Hugging Face layout (bf16). A LoRA
    /// checkpoint's adapter goes to OUT/adapter in PEFT's layout, or into the weights with --merge.
    Export {
        checkpoint: PathBuf,
        out: PathBuf,
        /// Merge LoRA adapters into the weights (W + alpha/r B A).
        #[arg(long)]
        merge: bool,
    },
}

/// The communicator a worker uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum CommKind {
    Auto,
    /// World size 1 only.
    Local,
    Tcp,
    Mpi,
    Nccl,
}

fn parse_resume(s: &str) -> std::result::Result<Resume, String> {
    s.parse().map_err(|e: idavlm::Error| e.to_string())
}

fn main() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    match run(Cli::parse()) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let rank = std::env::var("RANK").unwrap_or_else(|_| "0".into());
            eprintln!("rank {rank}: error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn make_comm(kind: CommKind, info: &RankInfo, device: tch::Device, timeout: Duration) -> Result<Box<dyn Communicator>> {
    let under_mpirun = std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some() || std::env::var_os("PMIX_RANK").is_some();
    let kind = match kind {
        CommKind::Auto if info.world == 1 && !under_mpirun => CommKind::Local,
        CommKind::Auto if device.is_cuda() => CommKind::Nccl,
        CommKind::Auto if under_mpirun && cfg!(feature = "mpi") => CommKind::Mpi,
        CommKind::Auto => CommKind::Tcp,
        k => k,
    };
    Ok(match kind {
        CommKind::Local if info.world > 1 => anyhow::bail!("--comm local is for world size 1 (WORLD_SIZE={})", info.world),
        CommKind::Local | CommKind::Auto => Box::new(Local),
        CommKind::Tcp => Box::new(TcpComm::connect(info, timeout)?),
        CommKind::Nccl => {
            let tch::Device::Cuda(i) = device else { anyhow::bail!("--comm nccl needs a GPU") };
            // Under mpirun with MPI built in, MPI carries the NCCL id; otherwise the TCP rendezvous.
            #[cfg(feature = "mpi")]
            if under_mpirun {
                let mut universe = None;
                let c = idavlm::comm::nccl::NcclComm::connect_with(info, i, timeout, &mut |blob| {
                    let (b, u) = idavlm::comm::mpi_comm::broadcast_blob(blob, info.rank, info.world)?;
                    universe = Some(u);
                    Ok(b)
                })?;
                tracing::info!(rank = info.rank, "NCCL id broadcast with MPI");
                // MPI stays initialised as long as the communicator (finalised when it is dropped).
                let universe = universe.expect("the exchange ran");
                return Ok(Box::new(c.keep_alive(Box::new(universe))));
            }
            Box::new(idavlm::comm::nccl::NcclComm::connect(info, i, timeout)?)
        }
        #[cfg(feature = "mpi")]
        CommKind::Mpi => {
            let c = idavlm::comm::mpi_comm::MpiComm::init(timeout)?;
            anyhow::ensure!(
                c.world() == info.world && c.rank() == info.rank,
                "MPI says rank {} of {}, the environment says {} of {}",
                c.rank(),
                c.world(),
                info.rank,
                info.world
            );
            Box::new(c)
        }
        #[cfg(not(feature = "mpi"))]
        CommKind::Mpi => anyhow::bail!("this build has no MPI support (build with --features mpi)"),
    })
}

fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Train { recipe: path, sets, resume, comm } => {
            // First: a SIGTERM from here on ends in exit 75 (or a checkpoint at the next step boundary).
            let stop = train::stop_flag()?;
            let nccl = runtime::prepare_nccl();
            let r = recipe::load(&path, &sets)?;
            let info = RankInfo::from_env()?;
            let device = runtime::device_for(info.local_rank);
            if device == tch::Device::Cpu {
                let local_world = std::env::var("LOCAL_WORLD_SIZE").ok().and_then(|v| v.parse().ok()).unwrap_or(info.world);
                runtime::tune_cpu(local_world);
            }
            if let (Some(lib), tch::Device::Cuda(_)) = (&nccl, device) {
                tracing::debug!("NCCL: {}", lib.display());
            }
            let comm = make_comm(comm, &info, device, Duration::from_secs(r.comm.timeout_s))?;
            let s = train::run(&r, resume, comm.as_ref(), device, stop)?;
            Ok(if s.preempted {
                EXIT_PREEMPTED
            } else if s.stopped_nonfinite {
                EXIT_NONFINITE
            } else {
                0
            })
        }
        Cmd::RecipeKeys => {
            for k in recipe::keys::schema_keys() {
                println!("{k}");
            }
            Ok(0)
        }
        Cmd::Info { size } => {
            let cuda = runtime::init();
            println!("libtorch: {}", runtime::torch_lib_dirs().first().map(|p| p.display().to_string()).unwrap_or_default());
            println!(
                "libtorch_cuda: {}",
                cuda.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "not found (CPU only)".into())
            );
            let n = tch::Cuda::device_count();
            println!("CUDA devices: {n}");
            for i in 0..n as usize {
                let d = tch::Device::Cuda(i);
                let a = tch::Tensor::randn([size, size], (tch::Kind::BFloat16, d));
                let b = tch::Tensor::randn([size, size], (tch::Kind::BFloat16, d));
                let _ = a.matmul(&b);
                tch::Cuda::synchronize(i as i64);
                let reps = 20;
                let t = Instant::now();
                for _ in 0..reps {
                    let _ = a.matmul(&b);
                }
                tch::Cuda::synchronize(i as i64);
                let s = t.elapsed().as_secs_f64() / reps as f64;
                // Check against an f32 product on a slice, so the number is of a correct result.
                let c = a.narrow(0, 0, 64).matmul(&b).to_kind(tch::Kind::Float);
                let r = a.narrow(0, 0, 64).to_kind(tch::Kind::Float).matmul(&b.to_kind(tch::Kind::Float));
                let rel = ((&c - &r).norm().double_value(&[]) / r.norm().double_value(&[])).abs();
                println!(
                    "cuda:{i}: bf16 {size}^3 matmul {:.3} ms, {:.0} TFLOP/s, rel. error vs f32 {rel:.1e}",
                    s * 1e3,
                    2.0 * (size as f64).powi(3) / s / 1e12
                );
            }
            let a = tch::Tensor::randn([256, 256], (tch::Kind::Float, tch::Device::Cpu));
            let _ = a.matmul(&a);
            println!("cpu: f32 matmul ok");
            Ok(0)
        }
        Cmd::Kernels { seq, rows, heads, head_dim, reps } => {
            runtime::init();
            let n = tch::Cuda::device_count() as usize;
            let devices: Vec<tch::Device> = if n > 0 { (0..n).map(tch::Device::Cuda).collect() } else { vec![tch::Device::Cpu] };
            let mut failed = 0;
            println!(
                "{:<10} {:<20} {:<5} {:>12} {:>12} {:>9} {:>9}  (fwd+bwd ms, shape {rows}x{seq}x{heads}x{head_dim})",
                "device", "op", "dtype", "forward rel", "grad rel", "ref ms", "fast ms"
            );
            for d in devices {
                for kind in [tch::Kind::Float, tch::Kind::BFloat16] {
                    tch::manual_seed(7);
                    let mut checks = idavlm::model::layers::check_fast_paths(d, kind, (rows, seq, heads, head_dim), reps);
                    // The whole LLM block, explicit backward against autograd, at the given shape (on GPUs:
                    // at full width the CPU would take minutes).
                    if d.is_cuda() {
                        checks.extend(idavlm::model::llm::check_explicit_block(d, kind, rows, seq, reps));
                    }
                    if kind == tch::Kind::Float {
                        // AdamW over a partition the size of one W1 block's parameters.
                        checks.extend(idavlm::optim::check_fused_adamw(d, 202_395_648, reps));
                    }
                    for c in checks {
                        let ok = c.passed();
                        failed += usize::from(!ok);
                        println!(
                            "{:<10} {:<20} {:<5} {:>12.2e} {:>12.2e} {:>9.3} {:>9.3}  {}",
                            format!("{d:?}"),
                            c.name,
                            if kind == tch::Kind::Float { "f32" } else { "bf16" },
                            c.forward_rel,
                            c.grad_rel,
                            c.reference_ms,
                            c.fast_ms,
                            if ok { "ok" } else { "FAILED" }
                        );
                    }
                }
            }
            Ok(i32::from(failed > 0))
        }
        Cmd::Params { preset, config, id_former } => {
            let mut cfg = match config {
                Some(p) => ModelConfig::from_file(&p)?,
                None => ModelConfig::preset(&preset)?,
            };
            cfg.id_former = id_former;
            println!("{}", serde_json::to_string_pretty(&count_params(&cfg))?);
            Ok(0)
        }
        Cmd::Bench {
            layers,
            vit_layers,
            micro_batch,
            grad_accum,
            seq,
            images,
            steps,
            zero,
            no_id_former,
            ac,
            lora,
            lengths,
            pack_tokens,
            pack_window,
            reduce_dtype,
            no_reshard_after_forward,
            no_fused,
            autograd_block,
            block_recompute,
            mha_attention,
            cuda_profiler_step,
            trace_step,
            memory_limit_gib,
        } => {
            runtime::prepare_nccl();
            let info = RankInfo::from_env()?;
            let device = runtime::device_for(info.local_rank);
            let comm = make_comm(CommKind::Auto, &info, device, Duration::from_secs(600))?;
            let name = match device {
                tch::Device::Cuda(i) => train::cuda_name(i),
                _ => "cpu".into(),
            };
            let w = idavlm::bench::W1 {
                layers,
                vit_layers,
                micro: micro_batch,
                accum: grad_accum,
                seq,
                images,
                steps,
                zero,
                id_former: !no_id_former,
                lora,
                ac,
                lengths: lengths.as_deref().map(idavlm::bench::W2Lengths::load).transpose()?,
                pack_tokens,
                pack_window,
                reduce_dtype,
                reshard_after_forward: !no_reshard_after_forward,
                cuda_profiler_step,
                trace_step,
                memory_limit_gib,
                kernels: idavlm::model::choice::Kernels {
                    fused: !no_fused,
                    explicit_block: !autograd_block,
                    block_recompute,
                    mha_attention,
                },
            };
            let r = idavlm::bench::run(&w, comm.as_ref(), device, &name)?;
            if info.rank == 0 {
                println!("{}", serde_json::to_string(&r)?);
            }
            Ok(0)
        }
        Cmd::Export { checkpoint, out, merge } => {
            idavlm::checkpoint::verify(&checkpoint)?;
            let model = checkpoint.join("model");
            anyhow::ensure!(model.is_dir(), "{}: no model/ folder (checkpoint.save_model was off)", checkpoint.display());
            let cfg: ModelConfig =
                serde_json::from_slice(&std::fs::read(model.join("config.json")).context("model/config.json")?)?;
            // Merging happens in f32; the export is bf16.
            let (params, _) = idavlm::model::weights::load_hf(&model, &cfg, tch::Device::Cpu, tch::Kind::Float)?;
            let adapter = idavlm::model::lora::adapter_dir(&checkpoint);
            let mut note = String::new();
            match (&adapter, merge) {
                (Some(a), true) => {
                    let (_, n) = idavlm::model::weights::apply_adapter(&params, a)?;
                    note = format!(", {n} LoRA adapters merged");
                }
                (Some(a), false) => {
                    let dst = out.join("adapter");
                    std::fs::create_dir_all(&dst)?;
                    for f in [idavlm::model::lora::ADAPTER_CONFIG, idavlm::model::lora::ADAPTER_WEIGHTS] {
                        std::fs::copy(a.join(f), dst.join(f)).with_context(|| format!("copying {}", a.join(f).display()))?;
                    }
                    note = format!(", the LoRA adapter (PEFT layout) in {}", dst.display());
                }
                (None, true) => note = " (no LoRA adapter to merge)".into(),
                (None, false) => {}
            }
            idavlm::model::weights::save_params(&params, &out, tch::Kind::BFloat16, 4 << 30)?;
            std::fs::write(out.join("config.json"), serde_json::to_vec_pretty(&cfg)?)?;
            println!("wrote {} in the Hugging Face layout (bf16){note}", out.display());
            Ok(0)
        }
    }
}
