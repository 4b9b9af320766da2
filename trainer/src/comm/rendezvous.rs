//! TCP rendezvous on rank 0: every rank reports where it listens; rank 0 answers with the table of all
//! ranks and a 128-byte blob (the NCCL unique id, when there is one). Retries until the deadline, then
//! fails with an error that says which address could not be reached.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

pub const BLOB: usize = 128;

/// What every rank learns: each rank's data address, and rank 0's blob.
pub struct Table {
    pub addrs: Vec<SocketAddr>,
    pub blob: [u8; BLOB],
}

fn io(what: &str, e: std::io::Error) -> Error {
    Error::Comm(format!("rendezvous: {what}: {e}"))
}

fn read_exact_deadline(s: &mut TcpStream, buf: &mut [u8], what: &str) -> Result<()> {
    s.read_exact(buf).map_err(|e| io(what, e))
}

/// Runs the rendezvous. `my_data` is the address this rank's data listener accepts on (its host as
/// the others should dial it). Rank 0 binds `master`.
pub fn rendezvous(
    rank: usize,
    world: usize,
    master: &str,
    my_data: SocketAddr,
    blob: Option<[u8; BLOB]>,
    timeout: Duration,
) -> Result<Table> {
    let deadline = Instant::now() + timeout;
    if rank == 0 {
        let listener = TcpListener::bind(master).map_err(|e| io(&format!("rank 0 cannot listen on {master}"), e))?;
        listener.set_nonblocking(true).map_err(|e| io("listener", e))?;
        let mut peers: Vec<Option<(TcpStream, SocketAddr)>> = (0..world).map(|_| None).collect();
        let mut joined = 1;
        while joined < world {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).map_err(|e| io("accept", e))?;
                    s.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10))))
                        .ok();
                    let mut hdr = [0u8; 4];
                    read_exact_deadline(&mut s, &mut hdr, "reading a peer's rank")?;
                    let r = u32::from_le_bytes(hdr) as usize;
                    let mut len = [0u8; 2];
                    read_exact_deadline(&mut s, &mut len, "reading a peer's address")?;
                    let mut a = vec![0u8; u16::from_le_bytes(len) as usize];
                    read_exact_deadline(&mut s, &mut a, "reading a peer's address")?;
                    let addr: SocketAddr = String::from_utf8_lossy(&a)
                        .parse()
                        .map_err(|_| Error::Comm(format!("rendezvous: rank {r} sent a bad address")))?;
                    if r == 0 || r >= world || peers[r].is_some() {
                        return Err(Error::Comm(format!(
                            "rendezvous: unexpected rank {r} joined (world {world}); is another job using {master}?"
                        )));
                    }
                    peers[r] = Some((s, addr));
                    joined += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let missing: Vec<String> = (1..world).filter(|&r| peers[r].is_none()).map(|r| r.to_string()).collect();
                        return Err(Error::Comm(format!(
                            "rendezvous on {master}: ranks {} did not join within {}s",
                            missing.join(","),
                            timeout.as_secs()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(io("accept", e)),
            }
        }
        let mut addrs = vec![my_data];
        addrs.extend(peers.iter().skip(1).map(|p| p.as_ref().expect("all joined").1));
        let blob = blob.unwrap_or([0; BLOB]);
        let mut msg = Vec::new();
        for a in &addrs {
            let s = a.to_string();
            msg.extend((s.len() as u16).to_le_bytes());
            msg.extend(s.as_bytes());
        }
        msg.extend(blob);
        for p in peers.iter_mut().skip(1) {
            let (s, _) = p.as_mut().expect("all joined");
            s.write_all(&(msg.len() as u32).to_le_bytes())
                .and_then(|_| s.write_all(&msg))
                .map_err(|e| io("sending the table", e))?;
        }
        Ok(Table { addrs, blob })
    } else {
        let target = master
            .to_socket_addrs()
            .map_err(|e| io(&format!("resolving {master}"), e))?
            .next()
            .ok_or_else(|| Error::Comm(format!("rendezvous: {master} resolves to nothing")))?;
        let mut s = loop {
            match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
                Ok(s) => break s,
                Err(e) => {
                    if Instant::now() > deadline {
                        return Err(Error::Comm(format!(
                            "rank {rank}: cannot reach rank 0 at {master} within {}s: {e}",
                            timeout.as_secs()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        s.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10)))).ok();
        let a = my_data.to_string();
        let mut msg = (rank as u32).to_le_bytes().to_vec();
        msg.extend((a.len() as u16).to_le_bytes());
        msg.extend(a.as_bytes());
        s.write_all(&msg).map_err(|e| io("sending my address", e))?;
        let mut len = [0u8; 4];
        read_exact_deadline(&mut s, &mut len, "waiting for the table from rank 0")?;
        let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
        read_exact_deadline(&mut s, &mut buf, "reading the table")?;
        let mut addrs = Vec::with_capacity(world);
        let mut off = 0;
        for _ in 0..world {
            let l = u16::from_le_bytes([buf[off], buf[off + 1]]) as usize;
            off += 2;
            addrs.push(
                String::from_utf8_lossy(&buf[off..off + l]).parse().map_err(|_| Error::Comm("rendezvous: bad table".into()))?,
            );
            off += l;
        }
        let mut blob = [0u8; BLOB];
        blob.copy_from_slice(&buf[off..off + BLOB]);
        Ok(Table { addrs, blob })
    }
}

/// The IP address others should use to reach this host for data: the local address of a UDP socket
/// "connected" towards the master (no packet is sent), or loopback when the master is local.
pub fn local_ip_towards(master_host: &str) -> std::net::IpAddr {
    let probe = || -> Option<std::net::IpAddr> {
        let target = (master_host, 9).to_socket_addrs().ok()?.next()?;
        let u = std::net::UdpSocket::bind(("0.0.0.0", 0)).ok()?;
        u.connect(target).ok()?;
        Some(u.local_addr().ok()?.ip())
    };
    probe().unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
}
