//! Slurm for real: a live single-node slurmctld + slurmd (scripts/slurm-local.sh) runs the shipped
//! template `recipes/slurm/stage2.sbatch`, submitted unchanged; only resources, the log file and the
//! template's documented variables (IDAVLM_RECIPE, IDAVLM_ARGS, IDAVLM_ENV) are given on the sbatch
//! command line. CPU ranks, the micro test model.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use idavlm_tests::{bin, free_port, losses, read_f32, recipe, root, wait_for_first_step};

struct Slurm {
    dir: tempfile::TempDir,
    conf: PathBuf,
}

impl Slurm {
    /// Starts Slurm, or None when it is not installed (then the test is skipped, unless
    /// IDAVLM_EXPECT_SLURM=1 as under `make test`, where that is a failure).
    fn start() -> Option<Self> {
        // The daemons live in /usr/sbin, which not every PATH has.
        let have = Command::new("bash")
            .args(["-c", "PATH=/usr/sbin:/sbin:$PATH slurmctld -V"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !have {
            assert!(
                std::env::var("IDAVLM_EXPECT_SLURM").is_err(),
                "Slurm is not installed but IDAVLM_EXPECT_SLURM is set: run `bash scripts/setup.sh --slurm`"
            );
            eprintln!("skipped: no Slurm here (bash scripts/setup.sh --slurm installs it)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("bash")
            .arg(root().join("scripts/slurm-local.sh"))
            .arg("start")
            .arg(dir.path())
            .arg(free_port().to_string())
            .arg(free_port().to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "starting Slurm: {}", String::from_utf8_lossy(&out.stderr));
        Some(Self { conf: dir.path().join("slurm.conf"), dir })
    }

    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.env("SLURM_CONF", &self.conf).current_dir(root());
        c
    }

    /// Submits the template as shipped, 2 tasks on this node, with the recipe and launcher arguments.
    fn submit(&self, recipe: &Path, args: &str, log: &Path) -> u64 {
        let template = root().join("recipes/slurm/stage2.sbatch");
        let bindir = bin("idavlm-launch").parent().unwrap().to_path_buf();
        let path = format!("{}:{}", bindir.display(), std::env::var("PATH").unwrap_or_default());
        let out = self
            .cmd("sbatch")
            .args(["--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=10"])
            .arg(format!("--output={}", log.display()))
            .arg(template)
            .env("PATH", path)
            .env("IDAVLM_RECIPE", recipe)
            .env("IDAVLM_ARGS", args)
            .env("IDAVLM_ENV", "scripts/env.sh")
            .env("IDAVLM_TORCH_THREADS", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "sbatch: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().split(';').next().unwrap().parse().unwrap()
    }

    /// `scontrol show job` as key=value pairs.
    fn job(&self, id: u64) -> std::collections::HashMap<String, String> {
        let out = self.cmd("scontrol").args(["show", "job", "-o", &id.to_string()]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
            .collect()
    }

    /// Waits for the job to end; returns its final state and exit code.
    fn wait(&self, id: u64, secs: u64, log: &Path) -> (String, String) {
        let t = Instant::now();
        loop {
            let j = self.job(id);
            let state = j.get("JobState").cloned().unwrap_or_default();
            if ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"].contains(&state.as_str()) {
                return (state, j.get("ExitCode").cloned().unwrap_or_default());
            }
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "job {id} still {state} after {secs} s; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(root().join("scripts/slurm-local.sh")).arg("stop").arg(self.dir.path()).status();
    }
}

/// The pid of the job's task `rank` (an idavlm-worker whose environment has that job and rank).
fn task_pid(job: u64, rank: usize) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let exe = std::fs::read_link(e.path().join("exe")).unwrap_or_default();
        if !exe.to_string_lossy().contains("idavlm-worker") {
            continue;
        }
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let vars: Vec<String> = env.split(|&b| b == 0).map(|v| String::from_utf8_lossy(v).into_owned()).collect();
        if vars.contains(&format!("SLURM_JOB_ID={job}")) && vars.contains(&format!("SLURM_PROCID={rank}")) {
            return Some(pid);
        }
    }
    None
}

fn final_state(ckpt: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let (latest, skipped) = idavlm::checkpoint::find_latest(ckpt);
    assert!(skipped.is_empty(), "{skipped:?}");
    let latest = latest.expect("a checkpoint");
    let mut all = read_f32(&latest.join("rank-00000-of-00002.safetensors"));
    all.extend(read_f32(&latest.join("rank-00001-of-00002.safetensors")).into_iter().map(|(k, v)| (format!("r1.{k}"), v)));
    all
}

#[test]
fn the_slurm_template_runs_requeues_on_preemption_and_fails_fast() {
    let Some(slurm) = Slurm::start() else { return };
    let d = tempfile::tempdir().unwrap();
    let data = crate::train::data(d.path());
    let case = |name: &str| {
        let dir = d.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        (recipe(&dir, &data, ""), dir)
    };
    let steps = 30;

    // 1. A whole run, ranks from Slurm.
    let (r1, d1) = case("straight");
    let log1 = d1.join("slurm.out");
    let j1 = slurm.submit(&r1, &format!("--set length.steps={steps}"), &log1);
    let (state, code) = slurm.wait(j1, 240, &log1);
    let text1 = std::fs::read_to_string(&log1).unwrap();
    assert_eq!((state.as_str(), code.as_str()), ("COMPLETED", "0:0"), "{text1}");
    assert!(text1.contains("2 ranks from Slurm"), "{text1}");
    assert_eq!(losses(&d1.join("metrics.jsonl")).len(), steps);

    // 2. Preemption: SIGUSR1 to the batch script mid-run; every rank checkpoints, exit 75, the job
    // requeues itself, resumes and ends equal to the uninterrupted run.
    let (r2, d2) = case("preempted");
    let log2 = d2.join("slurm.out");
    let j2 = slurm.submit(&r2, &format!("--set length.steps={steps}"), &log2);
    wait_for_first_step(&d2.join("metrics.jsonl"), 120);
    let s = slurm.cmd("scancel").args(["--signal=USR1", "--batch", &j2.to_string()]).status().unwrap();
    assert!(s.success());
    let (state, code) = slurm.wait(j2, 300, &log2);
    let text2 = std::fs::read_to_string(&log2).unwrap();
    assert_eq!((state.as_str(), code.as_str()), ("COMPLETED", "0:0"), "{text2}");
    assert!(text2.contains("forwarding to the ranks") && text2.contains("exited 75; requeueing"), "{text2}");
    assert!(text2.contains("restart 1") && text2.contains("resumed from"), "{text2}");
    assert_eq!(slurm.job(j2).get("Restarts").map(String::as_str), Some("1"));
    let (l1, l2) = (losses(&d1.join("metrics.jsonl")), losses(&d2.join("metrics.jsonl")));
    assert!(l2.len() >= steps && l2.len() < 2 * steps, "{} lines", l2.len());
    assert_eq!(l1.last(), l2.last(), "final loss of the preempted run");
    // Each step's loss, whichever run wrote it, equals the uninterrupted run's.
    for (s, l) in &l2 {
        assert_eq!(l1[*s as usize - 1].1.to_bits(), l.to_bits(), "step {s}");
    }
    assert!(final_state(&d1.join("ckpt")) == final_state(&d2.join("ckpt")), "optimizer state differs after the requeue");

    // 3. srun --mpi=pmix with the MPI build: the ranks talk over MPI.
    let (r3, d3) = case("pmix");
    let out = slurm
        .cmd("srun")
        .args(["-n", "2", "--mpi=pmix", "--kill-on-bad-exit=1"])
        .arg(bin("idavlm-launch"))
        .arg(&r3)
        .args(["--set", "length.steps=3", "--set", "checkpoint.at_end=false"])
        .env("IDAVLM_TORCH_THREADS", "1")
        .output()
        .unwrap();
    let err3 = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err3}");
    assert!(err3.contains("backend=\"mpi\""), "{err3}");
    let l3 = losses(&d3.join("metrics.jsonl"));
    assert_eq!(l3.len(), 3);
    for ((_, a), (_, b)) in l3.iter().zip(&l1) {
        assert!((a - b).abs() <= 1e-5 * b.abs(), "MPI {a} vs TCP {b}");
    }

    // 4. A task killed with SIGKILL: the job fails within 30 s and the log names the rank.
    let (r4, d4) = case("killed");
    let log4 = d4.join("slurm.out");
    let j4 = slurm.submit(&r4, "--set length.steps=100000", &log4);
    wait_for_first_step(&d4.join("metrics.jsonl"), 120);
    let pid = task_pid(j4, 1).expect("rank 1's worker");
    idavlm_tests::send_signal(pid, 9);
    let t = Instant::now();
    let (state, _) = slurm.wait(j4, 60, &log4);
    let took = t.elapsed();
    let text4 = std::fs::read_to_string(&log4).unwrap();
    assert_eq!(state, "FAILED", "{text4}");
    assert!(took < Duration::from_secs(30), "the job took {took:?} to fail:\n{text4}");
    assert!(text4.contains("task 1"), "{text4}");
    assert_eq!(slurm.job(j4).get("Restarts").map(String::as_str), Some("0"), "a failed job is not requeued");
}
