//! A node with veth "pods" for packet tests that drive a dataplane directly: the test
//! process's own network namespace (a private one, see `moat_integration::netns`) is the
//! node, and every pod — and one remote host behind an uplink — is an unnamed network
//! namespace held by a thread of this process. Sockets opened in a pod's thread stay in its
//! namespace, so one process sends and receives everywhere; the namespaces go with the
//! process, whatever happens to it.
//!
//! ```text
//!   remote (192.0.2.2, 2001:db8::2) ── up0 ── node (this process) ── vpN ── pod N (eth0: /32, /128)
//! ```
//!
//! Probes are single UDP datagrams, each from a fresh socket: never answered, so conntrack
//! never calls them established and every one is judged as a new flow.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use moat_dataplane::local::Interfaces;

type Job = Box<dyn FnOnce() + Send>;

/// An unnamed network namespace, held by a thread that runs jobs inside it.
pub struct Ns {
    /// `/proc/<pid>/task/<tid>/ns/net`, for `ip link … netns`.
    pub path: String,
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Probe receivers on the probe ports (`[::]`, so both families).
    rx: Vec<UdpSocket>,
}

pub const PORTS: [u16; 2] = [7000, 7001];

impl Ns {
    pub fn new() -> Ns {
        let (tx, rx) = mpsc::channel::<Job>();
        let (tid_tx, tid_rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            // SAFETY: unshare(2) affects only this thread's namespaces; it takes no pointers.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
            tid_tx
                .send(std::process::id().to_string() + "/task/" + &gettid())
                .unwrap();
            for job in rx {
                job();
            }
        });
        let task = tid_rx.recv().expect("namespace thread");
        let mut ns = Ns {
            path: format!("/proc/{task}/ns/net"),
            jobs: Some(tx),
            thread: Some(thread),
            rx: Vec::new(),
        };
        ns.sh("ip link set lo up");
        ns.sh("sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0");
        ns.rx = PORTS
            .iter()
            .map(|p| {
                let s = ns.run(move || UdpSocket::bind(("::", *p)).expect("receiver"));
                s.set_nonblocking(true).unwrap();
                s
            })
            .collect();
        ns
    }

    /// Runs `f` inside the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .as_ref()
            .unwrap()
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .unwrap();
        rx.recv().expect("namespace job")
    }

    /// Runs a shell command inside the namespace (children inherit the thread's namespace).
    pub fn sh(&self, cmd: &str) {
        let cmd = cmd.to_string();
        self.run(move || sh(&cmd));
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn gettid() -> String {
    // SAFETY: gettid(2) has no arguments and cannot fail.
    unsafe { libc::gettid() }.to_string()
}

/// Runs a shell command in the node (this process's namespace); panics on failure.
pub fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct Pod {
    pub ns: Ns,
    /// The node's end of its veth.
    pub iface: String,
    pub v4: IpAddr,
    pub v6: IpAddr,
}

/// The node, its pods and the remote host.
pub struct Lab {
    pub pods: BTreeMap<String, Pod>,
    pub remote: Ns,
    next_if: u32,
}

pub const REMOTE4: &str = "192.0.2.2";
pub const REMOTE6: &str = "2001:db8::2";

impl Lab {
    pub fn new() -> Lab {
        sh(
            "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
            net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
            net.ipv6.conf.default.accept_dad=0",
        );
        sh("ip link set lo up");
        let remote = Ns::new();
        sh(&format!(
            "ip link add up0 type veth peer name eth0 netns {}",
            remote.path
        ));
        sh(
            "ip addr add 192.0.2.1/24 dev up0 && ip addr add 2001:db8::1/64 dev up0 nodad && ip link set up0 up",
        );
        remote.sh(&format!(
            "ip addr add {REMOTE4}/24 dev eth0 && ip addr add {REMOTE6}/64 dev eth0 nodad && ip link set eth0 up \
             && ip route add 10.9.0.0/16 via 192.0.2.1 && ip -6 route add fd09::/64 via 2001:db8::1"
        ));
        Lab {
            pods: BTreeMap::new(),
            remote,
            next_if: 1,
        }
    }

    /// A pod `name` with addresses 10.9.0.`n` and fd09::`n` on a new interface, routed.
    pub fn add_pod(&mut self, name: &str, n: u8) -> &Pod {
        let iface = format!("vp{}", self.next_if);
        self.next_if += 1;
        let ns = Ns::new();
        sh(&format!(
            "ip link add {iface} type veth peer name eth0 netns {}",
            ns.path
        ));
        sh(&format!(
            "ip addr add 169.254.1.1/32 dev {iface} && ip addr add fe80::1/64 dev {iface} nodad && ip link set {iface} up"
        ));
        let (v4, v6): (IpAddr, IpAddr) = (
            format!("10.9.0.{n}").parse().unwrap(),
            format!("fd09::{n}").parse().unwrap(),
        );
        ns.sh(&format!(
            "ip addr add {v4}/32 dev eth0 && ip addr add {v6}/128 dev eth0 nodad && ip link set eth0 up \
             && ip route add 169.254.1.1 dev eth0 scope link && ip route add default via 169.254.1.1 dev eth0 \
             && ip -6 route add default via fe80::1 dev eth0"
        ));
        sh(&format!(
            "ip route add {v4}/32 dev {iface} && ip -6 route add {v6}/128 dev {iface}"
        ));
        self.pods
            .insert(name.to_string(), Pod { ns, iface, v4, v6 });
        &self.pods[name]
    }

    /// Removes pod `name`: its namespace, its veth and with it its routes.
    pub fn remove_pod(&mut self, name: &str) {
        let p = self.pods.remove(name).expect("pod");
        sh(&format!("ip link del {}", p.iface));
    }

    pub fn pod(&self, name: &str) -> &Pod {
        &self.pods[name]
    }

    /// The node's interfaces as the agent classifies them: the pods' veths (with the
    /// addresses routed to them) and the others.
    pub fn interfaces(&self) -> Interfaces {
        let mut out = Interfaces::default();
        for p in self.pods.values() {
            out.pods
                .insert(ifindex(&p.iface), BTreeSet::from([p.v4, p.v6]));
        }
        out.other.extend([ifindex("lo"), ifindex("up0")]);
        out
    }

    fn ns(&self, who: &str) -> &Ns {
        if who == "remote" {
            &self.remote
        } else {
            &self.pod(who).ns
        }
    }

    /// Sends every probe, then waits until each one that should arrive has, and long enough
    /// for the others to have arrived if they were going to; panics listing every probe
    /// that did the wrong thing.
    pub fn check(&self, what: &str, probes: &[Probe]) {
        let mut ids = BTreeMap::new();
        for (i, p) in probes.iter().enumerate() {
            let id = (i as u64) << 8 | 0x5a;
            let (src, dst, port) = (p.src, p.dst, p.port);
            self.ns(&p.from).run(move || {
                let s = UdpSocket::bind(SocketAddr::new(src, 0)).expect("bind the source");
                s.send_to(&id.to_be_bytes(), (dst, port)).expect("send");
            });
            ids.insert(id, i);
        }
        let mut got: BTreeMap<usize, IpAddr> = BTreeMap::new();
        let start = Instant::now();
        let quiet = Duration::from_millis(400);
        loop {
            for who in std::iter::once("remote").chain(self.pods.keys().map(String::as_str)) {
                for s in &self.ns(who).rx {
                    let mut buf = [0u8; 16];
                    while let Ok((n, from)) = s.recv_from(&mut buf) {
                        if n == 8 {
                            let id = u64::from_be_bytes(buf[..8].try_into().unwrap());
                            if let Some(i) = ids.get(&id) {
                                got.insert(*i, from.ip().to_canonical());
                            }
                        }
                    }
                }
            }
            let waiting = probes
                .iter()
                .enumerate()
                .any(|(i, p)| p.arrives && !got.contains_key(&i));
            if (!waiting && start.elapsed() > quiet) || start.elapsed() > Duration::from_secs(3) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let wrong: Vec<String> = probes
            .iter()
            .enumerate()
            .filter(|(i, p)| got.contains_key(i) != p.arrives)
            .map(|(i, p)| {
                format!(
                    "{p:?}: {}",
                    match got.get(&i) {
                        Some(from) => format!("arrived (from {from})"),
                        None => "never arrived".into(),
                    }
                )
            })
            .collect();
        assert!(wrong.is_empty(), "{what}:\n{}", wrong.join("\n"));
        // What arrived carries the source it was sent with (nothing rewrote it).
        for (i, from) in &got {
            assert_eq!(*from, probes[*i].src, "{what}: {:?}", probes[*i]);
        }
    }
}

/// One UDP datagram from `from` (a pod's name or "remote") with source `src`.
#[derive(Clone, Debug)]
pub struct Probe {
    pub from: String,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub port: u16,
    pub arrives: bool,
}

pub fn ifindex(name: &str) -> u32 {
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .trim()
        .parse()
        .unwrap()
}
