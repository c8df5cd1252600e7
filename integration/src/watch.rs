//! Verdicts and connections watched from threads while a test disrupts a node (a kill, a
//! restart, an upgrade, a backend switch): every probe's verdict must stay what it was
//! declared to be, and no watched connection may break.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use moat_harness::agent::{ProbeReq, StreamOp};
use moat_harness::client::AgentHandle;

/// How long a stream operation may take.
const STREAM: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Counts {
    probes: AtomicU64,
    wrong: AtomicU64,
    broken: AtomicU64,
}

/// Threads probing and echoing until [`finish`](Watch::finish).
pub struct Watch {
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
    threads: Vec<JoinHandle<()>>,
    started: Instant,
}

/// What a [`Watch`] saw.
#[derive(Debug)]
pub struct Watched {
    pub probes: u64,
    /// Probes per second over the whole watch.
    pub rate: f64,
    /// Verdicts other than the declared one.
    pub wrong: u64,
    /// Echo rounds in which a watched connection failed.
    pub broken: u64,
}

impl Default for Watch {
    fn default() -> Self {
        Self::new()
    }
}

impl Watch {
    pub fn new() -> Watch {
        Watch {
            stop: Arc::new(AtomicBool::new(false)),
            counts: Arc::default(),
            threads: Vec::new(),
            started: Instant::now(),
        }
    }

    /// Sends `reqs` from `agent` (pod `from`) again and again, without retries (a single
    /// refused new flow counts), batches `timeout` long and `pause` apart. Every verdict must
    /// be `expect`.
    pub fn probe(
        &mut self,
        mut agent: AgentHandle,
        from: &str,
        reqs: Vec<ProbeReq>,
        expect: bool,
        timeout: Duration,
        pause: Duration,
    ) {
        let (stop, counts, from) = (self.stop.clone(), self.counts.clone(), from.to_string());
        self.threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = agent.probe(reqs.clone(), timeout, 0).unwrap();
                counts.probes.fetch_add(r.len() as u64, Ordering::Relaxed);
                for (ok, p) in r.into_iter().zip(&reqs) {
                    if ok != expect {
                        // Wall-clock time, to set beside the processes' logs.
                        let at = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap_or_default();
                        eprintln!(
                            "{from} -> {p:?} was {ok}, must always be {expect} (batch ending at unix {:.3})",
                            at.as_secs_f64()
                        );
                        counts.wrong.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(pause);
            }
        }));
    }

    /// Echoes every 10 ms on the connections `agent` opened with [`open`]; a round in which
    /// one fails counts as broken.
    pub fn echo(&mut self, mut agent: AgentHandle, ids: &[u32]) {
        let echo: Vec<StreamOp> = ids.iter().map(|&id| StreamOp::Echo { id }).collect();
        let (stop, counts) = (self.stop.clone(), self.counts.clone());
        self.threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = agent.streams(echo.clone(), STREAM).unwrap();
                if r.iter().any(|ok| !ok) {
                    eprintln!("an established connection broke: {r:?}");
                    counts.broken.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }));
    }

    /// Stops and joins every thread.
    pub fn finish(mut self) -> Watched {
        self.stop.store(true, Ordering::Relaxed);
        for t in std::mem::take(&mut self.threads) {
            t.join().unwrap();
        }
        let probes = self.counts.probes.load(Ordering::Relaxed);
        Watched {
            probes,
            rate: probes as f64 / self.started.elapsed().as_secs_f64(),
            wrong: self.counts.wrong.load(Ordering::Relaxed),
            broken: self.counts.broken.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Watch {
    /// A test that fails midway stops its watchers, which would otherwise go on probing a
    /// cluster being torn down and bury the failure under their own.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Watched {
    /// The probers ran at `per_second` or more.
    pub fn assert_rate(&self, per_second: f64) {
        assert!(
            self.rate >= per_second,
            "probes ran at {:.0}/s, not {per_second:.0}/s",
            self.rate
        );
    }

    /// No verdict flipped and no connection broke.
    pub fn assert_clean(&self) {
        assert_eq!(self.wrong, 0, "a verdict flipped");
        assert_eq!(self.broken, 0, "an established connection broke");
    }
}

/// Opens TCP connections from `agent` to each of `dsts` on `port` (ids 1, 2, …), which must
/// all open; returns their ids.
pub fn open(agent: &mut AgentHandle, dsts: &[IpAddr], port: u16) -> Vec<u32> {
    let ids: Vec<u32> = (1..=dsts.len() as u32).collect();
    let ops = ids
        .iter()
        .zip(dsts)
        .map(|(&id, &dst)| StreamOp::Open { id, dst, port })
        .collect();
    assert!(
        agent.streams(ops, STREAM).unwrap().iter().all(|ok| *ok),
        "connections to {dsts:?}:{port} did not open"
    );
    ids
}
