//! Where this process sits in a job: explicit flags > torchrun variables > OpenMPI/PMIx > Slurm.

use anyhow::{bail, Context, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// Which environment said so.
    pub source: &'static str,
}

pub const DEFAULT_PORT: u16 = 29500;

fn num(get: &dyn Fn(&str) -> Option<String>, k: &str) -> Result<Option<usize>> {
    match get(k) {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).with_context(|| format!("{k}={v:?} is not a number")),
    }
}

/// First host of a Slurm node list such as `gpu[03-05,09],cpu1`.
pub fn first_slurm_host(list: &str) -> Option<String> {
    let list = list.trim();
    if list.is_empty() {
        return None;
    }
    let end = list.find(',').unwrap_or(list.len());
    let br = list.find('[');
    match br {
        Some(b) if b < end => {
            let close = list[b..].find(']')? + b;
            let inner = &list[b + 1..close];
            let first = inner.split(',').next()?.split('-').next()?;
            Some(format!("{}{}{}", &list[..b], first, &list[close + 1..].split(',').next().unwrap_or("")))
        }
        _ => Some(list[..end].to_string()),
    }
}

/// Reads the placement from an environment (`get` is `std::env::var` in production; tests pass maps).
pub fn detect(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<Placement>> {
    let port = |fallback: u16| -> Result<u16> {
        Ok(match get("MASTER_PORT") {
            Some(p) => p.trim().parse().with_context(|| format!("MASTER_PORT={p:?} is not a port"))?,
            None => fallback,
        })
    };
    if let (Some(rank), Some(world)) = (num(get, "RANK")?, num(get, "WORLD_SIZE")?) {
        return Ok(Some(Placement {
            rank,
            world,
            local_rank: num(get, "LOCAL_RANK")?.unwrap_or(rank),
            master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port: port(DEFAULT_PORT)?,
            source: "torchrun variables",
        }));
    }
    let ompi = (num(get, "OMPI_COMM_WORLD_RANK")?.or(num(get, "PMIX_RANK")?), num(get, "OMPI_COMM_WORLD_SIZE")?);
    if let (Some(rank), Some(world)) = ompi {
        let local_size = num(get, "OMPI_COMM_WORLD_LOCAL_SIZE")?.unwrap_or(world);
        let master_addr = match get("MASTER_ADDR") {
            Some(a) => a,
            None if local_size == world => "127.0.0.1".into(),
            None => bail!("mpirun across nodes: set MASTER_ADDR to rank 0's host (mpirun -x MASTER_ADDR=<host> ...)"),
        };
        return Ok(Some(Placement {
            rank,
            world,
            local_rank: num(get, "OMPI_COMM_WORLD_LOCAL_RANK")?.unwrap_or(rank),
            master_addr,
            master_port: port(DEFAULT_PORT)?,
            source: "OpenMPI",
        }));
    }
    if let (Some(rank), Some(world)) = (num(get, "SLURM_PROCID")?, num(get, "SLURM_NTASKS")?) {
        let nodes = get("SLURM_STEP_NODELIST").or_else(|| get("SLURM_JOB_NODELIST")).unwrap_or_default();
        let master_addr = match get("MASTER_ADDR") {
            Some(a) => a,
            None => {
                first_slurm_host(&nodes).context("SLURM_JOB_NODELIST is empty: cannot find rank 0's host (set MASTER_ADDR)")?
            }
        };
        // A port derived from the job id, so two jobs sharing a node do not collide.
        let job_port = num(get, "SLURM_JOB_ID")?.map(|j| 20000 + (j % 20000) as u16).unwrap_or(DEFAULT_PORT);
        return Ok(Some(Placement {
            rank,
            world,
            local_rank: num(get, "SLURM_LOCALID")?.unwrap_or(0),
            master_addr,
            master_port: port(job_port)?,
            source: "Slurm",
        }));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn slurm_hosts() {
        assert_eq!(first_slurm_host("gpu[03-05,09],cpu1").as_deref(), Some("gpu03"));
        assert_eq!(first_slurm_host("node7,node8").as_deref(), Some("node7"));
        assert_eq!(first_slurm_host("a[1-2]-ib").as_deref(), Some("a1-ib"));
        assert_eq!(first_slurm_host(""), None);
    }

    #[test]
    fn precedence_and_sources() {
        let p = detect(&env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((p.rank, p.world, p.local_rank, p.source), (3, 8, 1, "torchrun variables"));
        let p =
            detect(&env(&[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "4"), ("OMPI_COMM_WORLD_LOCAL_RANK", "1")]))
                .unwrap()
                .unwrap();
        assert_eq!((p.rank, p.world, p.local_rank, p.master_addr.as_str()), (1, 4, 1, "127.0.0.1"));
        assert!(detect(&env(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "16"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "8")
        ]))
        .is_err());
        let p = detect(&env(&[
            ("SLURM_PROCID", "9"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[10-11]"),
            ("SLURM_JOB_ID", "123"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((p.rank, p.world, p.local_rank, p.master_addr.as_str(), p.master_port), (9, 16, 1, "gpu10", 20123));
        assert_eq!(detect(&env(&[])).unwrap(), None);
    }
}
