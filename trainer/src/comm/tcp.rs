//! CPU ranks over TCP: a ring of connections (each rank dials the next, accepts the previous), ring
//! reduce-scatter and all-gather, all-reduce as the two in sequence. Sends run on a scoped thread so
//! that two ranks sending large chunks to each other never block on full socket buffers.
//!
//! Tensors of any float dtype and device travel as f32 host copies (CPU training runs in f32 anyway).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tch::Tensor;

use super::rendezvous::{local_ip_towards, rendezvous, BLOB};
use super::{host_f32, store_f32, Communicator, RankInfo};
use crate::error::{Error, Result};

pub struct TcpComm {
    rank: usize,
    world: usize,
    /// To rank+1 and from rank-1.
    links: Mutex<Option<(TcpStream, TcpStream)>>,
    timeout: Duration,
}

fn bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern of it is readable as u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

impl TcpComm {
    /// Joins the job described by `info` within `timeout`.
    pub fn connect(info: &RankInfo, timeout: Duration) -> Result<Self> {
        let (rank, world) = (info.rank, info.world);
        let ip = local_ip_towards(&info.master_addr);
        let listener = TcpListener::bind((ip, 0)).map_err(|e| Error::Comm(format!("rank {rank}: cannot listen on {ip}: {e}")))?;
        let my: SocketAddr = listener.local_addr().map_err(|e| Error::Comm(e.to_string()))?;
        let master = format!("{}:{}", info.master_addr, info.master_port);
        let master = if rank == 0 { format!("0.0.0.0:{}", info.master_port) } else { master };
        let table = rendezvous(rank, world, &master, my, None, timeout)?;
        let next = table.addrs[(rank + 1) % world];
        let deadline = Instant::now() + timeout;
        // Dial the next rank on a thread while accepting the previous one here.
        let dial = std::thread::spawn(move || -> Result<TcpStream> {
            loop {
                match TcpStream::connect_timeout(&next, Duration::from_secs(2)) {
                    Ok(mut s) => {
                        s.write_all(&(rank as u32).to_le_bytes())
                            .map_err(|e| Error::Comm(format!("rank {rank}: to {next}: {e}")))?;
                        return Ok(s);
                    }
                    Err(e) if Instant::now() > deadline => {
                        return Err(Error::Comm(format!("rank {rank}: cannot reach rank {} at {next}: {e}", (rank + 1) % world)))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        listener.set_nonblocking(true).map_err(|e| Error::Comm(e.to_string()))?;
        let prev_rank = (rank + world - 1) % world;
        let prev = loop {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).map_err(|e| Error::Comm(e.to_string()))?;
                    s.set_read_timeout(Some(timeout)).ok();
                    let mut h = [0u8; 4];
                    s.read_exact(&mut h).map_err(|e| Error::Comm(format!("rank {rank}: handshake: {e}")))?;
                    if u32::from_le_bytes(h) as usize != prev_rank {
                        return Err(Error::Comm(format!(
                            "rank {rank}: expected rank {prev_rank}, rank {} connected",
                            u32::from_le_bytes(h)
                        )));
                    }
                    break s;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(Error::Comm(format!(
                            "rank {rank}: rank {prev_rank} did not connect within {}s",
                            timeout.as_secs()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(Error::Comm(e.to_string())),
            }
        };
        let next = dial.join().map_err(|_| Error::Comm("dial thread panicked".into()))??;
        for s in [&next, &prev] {
            s.set_nodelay(true).ok();
            s.set_read_timeout(Some(timeout)).ok();
            s.set_write_timeout(Some(timeout)).ok();
        }
        let _ = BLOB;
        Ok(Self { rank, world, links: Mutex::new(Some((next, prev))), timeout })
    }

    /// One ring step: send `out` to the next rank while receiving `inp.len()` floats from the previous.
    fn exchange(&self, what: &str, out: &[f32], inp: &mut [f32]) -> Result<()> {
        let mut guard = self.links.lock().expect("links lock");
        let (next, prev) =
            guard.as_mut().ok_or_else(|| Error::Comm(format!("rank {}: {what} after an earlier failure", self.rank)))?;
        let (rank, world) = (self.rank, self.world);
        let res = std::thread::scope(|sc| {
            let sender = sc.spawn(|| next.write_all(bytes(out)));
            // SAFETY: inp is a valid f32 slice; reading bytes into it keeps it valid (any bits are an f32).
            let buf = unsafe { std::slice::from_raw_parts_mut(inp.as_mut_ptr() as *mut u8, std::mem::size_of_val(inp)) };
            let r = prev.read_exact(buf);
            let s = sender.join().expect("sender thread");
            (s, r)
        });
        let fail = |dir: &str, peer: usize, e: std::io::Error| {
            let why = if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
                format!("no progress for {}s", self.timeout.as_secs())
            } else {
                e.to_string()
            };
            Error::Comm(format!("rank {rank}: {what}: {dir} rank {peer} failed ({why}); a peer probably died"))
        };
        if let Err(e) = res.0 {
            *guard = None;
            return Err(fail("sending to", (rank + 1) % world, e));
        }
        if let Err(e) = res.1 {
            *guard = None;
            return Err(fail("receiving from", (rank + world - 1) % world, e));
        }
        Ok(())
    }

    /// Ring reduce-scatter over `buf` split in `world` equal chunks; afterwards chunk `rank` holds the sum.
    fn ring_reduce_scatter(&self, what: &str, buf: &mut [f32]) -> Result<()> {
        let (r, w) = (self.rank, self.world);
        let n = buf.len() / w;
        let mut tmp = vec![0f32; n];
        for s in 0..w - 1 {
            let send = (r + 2 * w - 1 - s) % w;
            let recv = (r + 2 * w - 2 - s) % w;
            let out = buf[send * n..(send + 1) * n].to_vec();
            self.exchange(what, &out, &mut tmp)?;
            for (a, b) in buf[recv * n..(recv + 1) * n].iter_mut().zip(&tmp) {
                *a += b;
            }
        }
        Ok(())
    }

    /// Ring all-gather: chunk `rank` of `buf` is this rank's; afterwards every chunk is filled.
    fn ring_all_gather(&self, what: &str, buf: &mut [f32]) -> Result<()> {
        let (r, w) = (self.rank, self.world);
        let n = buf.len() / w;
        let mut tmp = vec![0f32; n];
        for s in 0..w - 1 {
            let send = (r + w - s) % w;
            let recv = (r + 2 * w - s - 1) % w;
            let out = buf[send * n..(send + 1) * n].to_vec();
            self.exchange(what, &out, &mut tmp)?;
            buf[recv * n..(recv + 1) * n].copy_from_slice(&tmp);
        }
        Ok(())
    }
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let data = host_f32(t);
        // Pad to a multiple of world so the ring's chunks are equal.
        let mut buf = data.clone();
        buf.resize(data.len().div_ceil(self.world) * self.world, 0.0);
        self.ring_reduce_scatter("all_reduce", &mut buf)?;
        self.ring_all_gather("all_reduce", &mut buf)?;
        store_f32(t, &buf[..data.len()]);
        Ok(())
    }

    fn reduce_scatter_sum(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        let n = output.numel();
        assert_eq!(input.numel(), n * self.world, "reduce_scatter: input must be world x output");
        let mut buf = host_f32(input);
        self.ring_reduce_scatter("reduce_scatter", &mut buf)?;
        store_f32(output, &buf[self.rank * n..(self.rank + 1) * n]);
        Ok(())
    }

    fn all_gather(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        let n = input.numel();
        assert_eq!(output.numel(), n * self.world, "all_gather: output must be world x input");
        let mut buf = vec![0f32; n * self.world];
        buf[self.rank * n..(self.rank + 1) * n].copy_from_slice(&host_f32(input));
        self.ring_all_gather("all_gather", &mut buf)?;
        store_f32(output, &buf);
        Ok(())
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        // An all-reduce in which every rank but the root contributes zeros: the sum is the root's values
        // exactly (x + 0 = x).
        if self.rank != root {
            let _ = tch::no_grad(|| t.shallow_clone().zero_());
        }
        self.all_reduce_sum(t)
    }
}
