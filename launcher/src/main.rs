//! idavlm-launch: starts one ranked `idavlm-worker` per GPU.
//!
//! - Under `mpirun`, `srun` or torchrun-style variables it becomes the worker of that rank (exec).
//! - With `--nproc-per-node N [--nnodes M --node-rank k --master-addr A --master-port P]` it starts N
//!   local workers itself, forwards signals to them, and when any worker dies or exits non-zero it stops
//!   the others within seconds and exits non-zero, naming the rank and its last log lines.
//!
//! It needs no libtorch: it finds it (for the workers' library path) from `$IDAVLM_TORCH_LIB` or the
//! `python3` that has torch.
//!
//! Exit codes: 0 all workers succeeded; 75 workers stopped by a signal after checkpointing; otherwise
//! the failing worker's code (128 + the signal's number when it was killed by one, as a shell reports
//! it: 137 for SIGKILL).

mod env;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "idavlm-launch",
    version,
    about = "Launch idavlm training: one worker per GPU, under mpirun/srun/torchrun or on its own"
)]
struct Cli {
    /// The recipe YAML.
    recipe: PathBuf,
    /// Override a recipe key: --set optimizer.lr=1e-5 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// `auto` (the newest complete checkpoint in the recipe's checkpoint.dir), `none`, or a checkpoint
    /// folder.
    #[arg(long, default_value = "auto", value_parser = parse_resume)]
    resume: String,
    /// Start this many workers on this node (otherwise: be the worker that mpirun/srun/torchrun placed).
    #[arg(long)]
    nproc_per_node: Option<usize>,
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    #[arg(long, default_value_t = 0)]
    node_rank: usize,
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    /// Rendezvous port on rank 0 (default: MASTER_PORT, or 29500).
    #[arg(long)]
    master_port: Option<u16>,
    /// Communicator for the workers (auto: nccl on GPUs, mpi under mpirun when built with it, else tcp).
    #[arg(long, value_enum, default_value_t = Comm::Auto)]
    comm: Comm,
    /// The worker binary (default: idavlm-worker beside this program, or $IDAVLM_WORKER).
    #[arg(long)]
    worker: Option<PathBuf>,
    /// Seconds to wait for workers to exit after a stop before killing them.
    #[arg(long, default_value_t = 10)]
    grace_s: u64,
}

/// The workers' communicator (passed on as `--comm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Comm {
    Auto,
    Local,
    Tcp,
    Mpi,
    Nccl,
}

/// `auto`, `none`, or a folder that exists (checked here, before any worker starts).
fn parse_resume(s: &str) -> std::result::Result<String, String> {
    match s {
        "auto" | "none" => Ok(s.to_string()),
        p if std::path::Path::new(p).is_dir() => Ok(p.to_string()),
        p => Err(format!("{p:?}: no such checkpoint folder (or give auto or none)")),
    }
}

fn main() {
    match run(Cli::parse()) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("idavlm-launch: error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn worker_path(cli: &Cli) -> Result<PathBuf> {
    if let Some(w) = cli.worker.clone().or_else(|| std::env::var_os("IDAVLM_WORKER").map(PathBuf::from)) {
        return Ok(w);
    }
    let me = std::env::current_exe().context("locating idavlm-launch")?;
    let w = me.with_file_name("idavlm-worker");
    if !w.is_file() {
        bail!("{} not found (pass --worker or set IDAVLM_WORKER)", w.display());
    }
    Ok(w)
}

/// LD_LIBRARY_PATH for the workers: torch/lib and nvidia/*/lib of the torch install, then the current one.
fn library_path() -> Option<String> {
    let torch_lib = std::env::var("IDAVLM_TORCH_LIB").ok().map(PathBuf::from).or_else(|| {
        let py = std::env::var("IDAVLM_PYTHON").unwrap_or_else(|_| "python3".into());
        let out = Command::new(py)
            .args(["-c", "import torch,os;print(os.path.dirname(torch.__file__))"])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("lib"))
    })?;
    let mut dirs = vec![torch_lib.clone()];
    if let Some(site) = torch_lib.parent().and_then(|t| t.parent()) {
        if let Ok(rd) = std::fs::read_dir(site.join("nvidia")) {
            let mut nv: Vec<PathBuf> = rd.flatten().map(|e| e.path().join("lib")).filter(|p| p.is_dir()).collect();
            nv.sort();
            dirs.extend(nv);
        }
    }
    let mut s = dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(":");
    if let Ok(old) = std::env::var("LD_LIBRARY_PATH") {
        if !old.is_empty() {
            s = format!("{s}:{old}");
        }
    }
    std::env::set_var("IDAVLM_TORCH_LIB", &torch_lib);
    Some(s)
}

fn worker_command(cli: &Cli, worker: &PathBuf) -> Command {
    let mut c = Command::new(worker);
    c.arg("train")
        .arg(&cli.recipe)
        .arg("--resume")
        .arg(&cli.resume)
        .arg("--comm")
        .arg(cli.comm.to_possible_value().expect("no skipped variants").get_name());
    for s in &cli.sets {
        c.arg("--set").arg(s);
    }
    if let Some(ld) = library_path() {
        c.env("LD_LIBRARY_PATH", ld);
    }
    c
}

fn run(cli: Cli) -> Result<i32> {
    let worker = worker_path(&cli)?;
    if !cli.recipe.is_file() {
        bail!("recipe {} not found", cli.recipe.display());
    }
    match cli.nproc_per_node {
        None => {
            let get = |k: &str| std::env::var(k).ok();
            let Some(p) = env::detect(&get)? else {
                bail!("no rank in the environment (not under mpirun, srun or torchrun): pass --nproc-per-node N to start workers here");
            };
            let port = cli.master_port.unwrap_or(p.master_port);
            let mut c = worker_command(&cli, &worker);
            c.env("RANK", p.rank.to_string())
                .env("WORLD_SIZE", p.world.to_string())
                .env("LOCAL_RANK", p.local_rank.to_string())
                .env("MASTER_ADDR", &p.master_addr)
                .env("MASTER_PORT", port.to_string());
            if p.rank == 0 {
                eprintln!("idavlm-launch: {} ranks from {} (rendezvous {}:{port})", p.world, p.source, p.master_addr);
            }
            // Become the worker: signals from mpirun/srun reach it directly.
            let err = c.exec();
            bail!("cannot start {}: {err}", worker.display())
        }
        Some(n) => spawn_local(&cli, &worker, n),
    }
}

struct Worker {
    rank: usize,
    child: Child,
    tail: Arc<Mutex<VecDeque<String>>>,
}

const TAIL_LINES: usize = 20;

fn spawn_local(cli: &Cli, worker: &PathBuf, n: usize) -> Result<i32> {
    if n == 0 || cli.nnodes == 0 || cli.node_rank >= cli.nnodes {
        bail!("bad topology: --nproc-per-node {n} --nnodes {} --node-rank {}", cli.nnodes, cli.node_rank);
    }
    let world = n * cli.nnodes;
    let port =
        cli.master_port.or_else(|| std::env::var("MASTER_PORT").ok().and_then(|p| p.parse().ok())).unwrap_or(env::DEFAULT_PORT);
    // Signals to the launcher are counted here and forwarded to every worker.
    let signals = Arc::new(AtomicUsize::new(0));
    let last_signal = Arc::new(AtomicUsize::new(0));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT, signal_hook::consts::SIGUSR1] {
        let (s, l) = (signals.clone(), last_signal.clone());
        // SAFETY: the handler only touches atomics.
        unsafe {
            signal_hook::low_level::register(sig, move || {
                s.fetch_add(1, Ordering::SeqCst);
                l.store(sig as usize, Ordering::SeqCst);
            })
        }
        .context("installing signal handlers")?;
    }
    let mut workers = Vec::new();
    for local in 0..n {
        let rank = cli.node_rank * n + local;
        let mut c = worker_command(cli, worker);
        c.env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", &cli.master_addr)
            .env("MASTER_PORT", port.to_string());
        // Rank 0 of the job keeps the terminal (its progress bar); the others' output is prefixed and kept.
        let captured = rank != 0;
        if captured {
            c.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        // Own process group: a Ctrl-C at the terminal reaches the launcher, which decides what workers get.
        c.process_group(0);
        let mut child = c.spawn().with_context(|| format!("starting {}", worker.display()))?;
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        if captured {
            for stream in [
                child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
                child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            ]
            .into_iter()
            .flatten()
            {
                let tail = tail.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(stream).lines().map_while(|l| l.ok()) {
                        eprintln!("[rank {rank}] {line}");
                        let mut t = tail.lock().expect("tail lock");
                        t.push_back(line);
                        if t.len() > TAIL_LINES {
                            t.pop_front();
                        }
                    }
                });
            }
        }
        workers.push(Worker { rank, child, tail });
    }
    eprintln!(
        "idavlm-launch: started ranks {}..{} of {world} (rendezvous {}:{port})",
        cli.node_rank * n,
        cli.node_rank * n + n - 1,
        cli.master_addr
    );
    supervise(workers, &signals, &last_signal, Duration::from_secs(cli.grace_s))
}

fn send(w: &Worker, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(w.child.id() as i32, sig);
    }
}

fn supervise(mut workers: Vec<Worker>, signals: &AtomicUsize, last_signal: &AtomicUsize, grace: Duration) -> Result<i32> {
    let mut seen_signals = 0;
    let mut codes: Vec<Option<i32>> = vec![None; workers.len()];
    let mut failure: Option<(usize, i32)> = None;
    let mut stopping_since: Option<Instant> = None;
    let mut killed = false;
    loop {
        let s = signals.load(Ordering::SeqCst);
        if s > seen_signals {
            seen_signals = s;
            let sig = last_signal.load(Ordering::SeqCst) as i32;
            eprintln!("idavlm-launch: forwarding signal {sig} to the workers");
            for (w, c) in workers.iter().zip(&codes) {
                if c.is_none() {
                    send(w, sig);
                }
            }
            stopping_since.get_or_insert(Instant::now());
        }
        let mut stop_now = false;
        for (i, w) in workers.iter_mut().enumerate() {
            if codes[i].is_some() {
                continue;
            }
            if let Some(status) = w.child.try_wait()? {
                use std::os::unix::process::ExitStatusExt;
                let code = status.code().unwrap_or(128 + status.signal().unwrap_or(0));
                codes[i] = Some(code);
                if code != 0 && failure.is_none() && stopping_since.is_none() {
                    failure = Some((w.rank, code));
                    let how = match status.signal() {
                        Some(sig) => format!("was killed by signal {sig}"),
                        None => format!("exited with code {code}"),
                    };
                    eprintln!("idavlm-launch: rank {} {how}; stopping the other ranks", w.rank);
                    let tail = w.tail.lock().expect("tail lock");
                    if !tail.is_empty() {
                        eprintln!("idavlm-launch: last lines of rank {}:", w.rank);
                        for l in tail.iter() {
                            eprintln!("  {l}");
                        }
                    }
                    stopping_since = Some(Instant::now());
                    stop_now = true;
                }
            }
        }
        if stop_now {
            // Fail fast: the surviving ranks would block in their next collective.
            for (w, c) in workers.iter().zip(&codes) {
                if c.is_none() {
                    send(w, libc::SIGTERM);
                }
            }
        }
        if codes.iter().all(Option::is_some) {
            break;
        }
        if let Some(t) = stopping_since {
            if t.elapsed() > grace && !killed {
                killed = true;
                for (w, c) in workers.iter().zip(&codes) {
                    if c.is_none() {
                        eprintln!("idavlm-launch: rank {} did not exit within {}s; killing it", w.rank, grace.as_secs());
                        send(w, libc::SIGKILL);
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(match failure {
        Some((rank, code)) => {
            eprintln!("idavlm-launch: job failed: rank {rank} exited with code {code}");
            if code == 0 {
                1
            } else {
                code
            }
        }
        None => codes.iter().map(|c| c.unwrap_or(1)).find(|&c| c != 0).unwrap_or(0),
    })
}
