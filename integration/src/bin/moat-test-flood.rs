//! An attacker for the abuse tests: holds `--connections` idle TCP connections to `--target`
//! from `--source` addresses (one address, or `--sources N` consecutive ones from it), never
//! sending a byte, and reopens those the server closes after `--reopen-ms`. Prints `open N`
//! once all were attempted, then a line each second; stops by itself after `--seconds`.
//! Loopback only: the target must be a loopback address.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clap::Parser;
use tokio::io::AsyncReadExt;
use tokio::net::TcpSocket;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    target: SocketAddr,
    #[arg(long)]
    source: Ipv4Addr,
    /// Spread the connections over this many consecutive source addresses.
    #[arg(long, default_value_t = 1)]
    sources: u32,
    #[arg(long)]
    connections: usize,
    #[arg(long, default_value_t = 500)]
    reopen_ms: u64,
    #[arg(long, default_value_t = 60)]
    seconds: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a = Args::parse();
    assert!(
        a.target.ip().is_loopback() && a.source.is_loopback(),
        "loopback only"
    );
    raise_nofile();
    let open = Arc::new(AtomicUsize::new(0));
    let attempts = Arc::new(AtomicUsize::new(0));
    for i in 0..a.connections {
        let src = Ipv4Addr::from(u32::from(a.source) + (i as u32 % a.sources.max(1)));
        let (open, attempts) = (open.clone(), attempts.clone());
        let (target, reopen) = (a.target, Duration::from_millis(a.reopen_ms));
        tokio::spawn(async move {
            loop {
                attempts.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut s) = connect(src, target).await {
                    open.fetch_add(1, Ordering::Relaxed);
                    // Idle: wait for the server to close it (EOF or reset).
                    let mut b = [0u8; 64];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 {
                            break;
                        }
                    }
                    open.fetch_sub(1, Ordering::Relaxed);
                }
                tokio::time::sleep(reopen).await;
            }
        });
        // Let the first wave go out without starving the timers.
        if i % 256 == 255 {
            tokio::task::yield_now().await;
        }
    }
    println!("open {}", open.load(Ordering::Relaxed));
    for _ in 0..a.seconds {
        tokio::time::sleep(Duration::from_secs(1)).await;
        println!(
            "open {} attempts {}",
            open.load(Ordering::Relaxed),
            attempts.load(Ordering::Relaxed)
        );
    }
}

async fn connect(src: Ipv4Addr, target: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(IpAddr::V4(src), 0))?;
    tokio::time::timeout(Duration::from_secs(5), s.connect(target))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// Thousands of sockets need more than the usual soft limit of 1024 descriptors.
fn raise_nofile() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let l = getrlimit(Resource::Nofile);
    let want = Some(l.maximum.unwrap_or(u64::MAX).max(20_000));
    if setrlimit(
        Resource::Nofile,
        Rlimit {
            current: want,
            maximum: want,
        },
    )
    .is_err()
    {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: l.maximum,
                ..l
            },
        );
    }
}
