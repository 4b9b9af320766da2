//! TCP rendezvous on rank 0 (tokio): every rank reports where it listens; rank 0 answers with the table
//! of all ranks and a 128-byte blob (the NCCL unique id, when there is one). One deadline covers the
//! whole exchange; past it the error names the ranks that did not join, or the address a rank could
//! not reach.
//!
//! Rank 0 reads every joining connection concurrently, so a connection that says nothing (a port
//! scanner, a half-open socket) cannot hold up the others: it is dropped with a warning once it has
//! been silent for a few seconds. A second claim to a rank already taken means two jobs share the port,
//! and fails at once.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::error::{Error, Result};

pub const BLOB: usize = 128;

/// How long rank 0 waits for a connected peer to say which rank it is.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// What every rank learns: each rank's data address, and rank 0's blob.
pub struct Table {
    pub addrs: Vec<SocketAddr>,
    pub blob: [u8; BLOB],
}

fn io(what: &str, e: std::io::Error) -> Error {
    Error::Comm(format!("rendezvous: {what}: {e}"))
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
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| io("starting tokio", e))?;
    let deadline = Instant::now() + timeout;
    rt.block_on(async {
        if rank == 0 {
            serve(world, master, my_data, blob.unwrap_or([0; BLOB]), deadline, timeout).await
        } else {
            join(rank, world, master, my_data, deadline, timeout).await
        }
    })
}

/// A peer's hello: its rank and its data address.
async fn hello(s: &mut TcpStream) -> std::io::Result<(usize, SocketAddr)> {
    let r = s.read_u32_le().await? as usize;
    let len = s.read_u16_le().await? as usize;
    let mut a = vec![0u8; len];
    s.read_exact(&mut a).await?;
    let addr = String::from_utf8_lossy(&a)
        .parse()
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("rank {r} sent a bad address")))?;
    Ok((r, addr))
}

async fn serve(
    world: usize,
    master: &str,
    my_data: SocketAddr,
    blob: [u8; BLOB],
    deadline: Instant,
    timeout: Duration,
) -> Result<Table> {
    let listener = TcpListener::bind(master).await.map_err(|e| io(&format!("rank 0 cannot listen on {master}"), e))?;
    let mut peers: Vec<Option<(TcpStream, SocketAddr)>> = (0..world).map(|_| None).collect();
    let mut joined = 1;
    let mut hellos = tokio::task::JoinSet::new();
    while joined < world {
        tokio::select! {
            acc = listener.accept() => {
                let (mut s, from) = acc.map_err(|e| io("accept", e))?;
                hellos.spawn(async move {
                    let r = tokio::time::timeout(HELLO_TIMEOUT, hello(&mut s)).await;
                    (from, r.map_err(|_| "said nothing".to_string()).and_then(|r| r.map_err(|e| e.to_string())), s)
                });
            }
            Some(done) = hellos.join_next() => {
                let (from, said, s) = done.map_err(|e| Error::Comm(format!("rendezvous: {e}")))?;
                match said {
                    Ok((r, addr)) if r > 0 && r < world && peers[r].is_none() => {
                        peers[r] = Some((s, addr));
                        joined += 1;
                    }
                    Ok((r, _)) => {
                        return Err(Error::Comm(format!(
                            "rendezvous: unexpected rank {r} joined from {from} (world {world}); is another job using {master}?"
                        )))
                    }
                    Err(e) => tracing::warn!("rendezvous on {master}: ignored a connection from {from}: {e}"),
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let missing: Vec<String> = (1..world).filter(|&r| peers[r].is_none()).map(|r| r.to_string()).collect();
                return Err(Error::Comm(format!(
                    "rendezvous on {master}: ranks {} did not join within {}s",
                    missing.join(","),
                    timeout.as_secs()
                )));
            }
        }
    }
    let mut addrs = vec![my_data];
    addrs.extend(peers.iter().skip(1).map(|p| p.as_ref().expect("all joined").1));
    let mut msg = Vec::new();
    for a in &addrs {
        let s = a.to_string();
        msg.extend((s.len() as u16).to_le_bytes());
        msg.extend(s.as_bytes());
    }
    msg.extend(blob);
    let mut framed = (msg.len() as u32).to_le_bytes().to_vec();
    framed.extend(&msg);
    let sends = peers.iter_mut().enumerate().skip(1).map(|(r, p)| {
        let (s, _) = p.as_mut().expect("all joined");
        let framed = &framed;
        async move { s.write_all(framed).await.map_err(|e| io(&format!("sending the table to rank {r}"), e)) }
    });
    tokio::time::timeout_at(deadline, futures::future::try_join_all(sends))
        .await
        .map_err(|_| Error::Comm(format!("rendezvous on {master}: sending the table took past {}s", timeout.as_secs())))??;
    Ok(Table { addrs, blob })
}

async fn join(
    rank: usize,
    world: usize,
    master: &str,
    my_data: SocketAddr,
    deadline: Instant,
    timeout: Duration,
) -> Result<Table> {
    let target = master
        .to_socket_addrs()
        .map_err(|e| io(&format!("resolving {master}"), e))?
        .next()
        .ok_or_else(|| Error::Comm(format!("rendezvous: {master} resolves to nothing")))?;
    let late = |what: &str| Error::Comm(format!("rank {rank}: {what} {master} within {}s", timeout.as_secs()));
    let mut s = loop {
        match tokio::time::timeout_at(deadline, TcpStream::connect(target)).await {
            Ok(Ok(s)) => break s,
            Ok(Err(e)) if Instant::now() + Duration::from_millis(100) > deadline => {
                return Err(Error::Comm(format!(
                    "rank {rank}: cannot reach rank 0 at {master} within {}s: {e}",
                    timeout.as_secs()
                )))
            }
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(_) => return Err(late("cannot reach rank 0 at")),
        }
    };
    let a = my_data.to_string();
    let mut msg = (rank as u32).to_le_bytes().to_vec();
    msg.extend((a.len() as u16).to_le_bytes());
    msg.extend(a.as_bytes());
    let table = async {
        s.write_all(&msg).await?;
        let len = s.read_u32_le().await? as usize;
        let mut buf = vec![0u8; len];
        s.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout_at(deadline, table)
        .await
        .map_err(|_| late("no table from rank 0 at"))?
        .map_err(|e| io("waiting for the table from rank 0", e))?;
    let bad = || Error::Comm("rendezvous: bad table".into());
    let mut addrs = Vec::with_capacity(world);
    let mut off = 0;
    for _ in 0..world {
        let l = u16::from_le_bytes(buf.get(off..off + 2).ok_or_else(bad)?.try_into().expect("2 bytes")) as usize;
        off += 2;
        addrs.push(String::from_utf8_lossy(buf.get(off..off + l).ok_or_else(bad)?).parse().map_err(|_| bad())?);
        off += l;
    }
    let mut blob = [0u8; BLOB];
    blob.copy_from_slice(buf.get(off..off + BLOB).ok_or_else(bad)?);
    Ok(Table { addrs, blob })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    fn data(r: usize) -> SocketAddr {
        format!("127.0.0.1:{}", 40000 + r).parse().unwrap()
    }

    #[test]
    fn every_rank_gets_the_table_and_rank_0s_blob_despite_a_silent_stray_connection() {
        let p = port();
        let master = format!("127.0.0.1:{p}");
        let t = Duration::from_secs(20);
        let zero = {
            let m = master.clone();
            std::thread::spawn(move || rendezvous(0, 3, &m.replace("127.0.0.1", "0.0.0.0"), data(0), Some([7u8; BLOB]), t))
        };
        // A connection that never says which rank it is: dropped, not waited for.
        let _stray = (0..100)
            .find_map(|_| {
                std::thread::sleep(Duration::from_millis(50));
                std::net::TcpStream::connect(&master).ok()
            })
            .expect("rank 0 listens");
        let others: Vec<_> = (1..3)
            .map(|r| {
                let m = master.clone();
                std::thread::spawn(move || rendezvous(r, 3, &m, data(r), None, t))
            })
            .collect();
        let tables: Vec<Table> = std::iter::once(zero).chain(others).map(|h| h.join().unwrap().expect("rendezvous")).collect();
        for tb in &tables {
            assert_eq!(tb.addrs, (0..3).map(data).collect::<Vec<_>>());
            assert_eq!(tb.blob, [7u8; BLOB]);
        }
    }

    #[test]
    fn a_missing_rank_is_named_at_the_deadline() {
        let p = port();
        let t0 = std::time::Instant::now();
        let e = rendezvous(0, 3, &format!("127.0.0.1:{p}"), data(0), None, Duration::from_secs(1)).err().unwrap().to_string();
        assert!(e.contains("ranks 1,2 did not join within 1s"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5));
        let e = rendezvous(1, 3, &format!("127.0.0.1:{p}"), data(1), None, Duration::from_secs(1)).err().unwrap().to_string();
        assert!(e.contains("rank 1") && e.contains(&p.to_string()), "{e}");
    }
}
