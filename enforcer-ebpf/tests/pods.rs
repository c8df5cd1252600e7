//! Local pods on real packets: a private node namespace with veth pods, the eBPF backend
//! driven directly with hand-made local pod tables. Needs root, BPF and `ip`.
//!
//! ```text
//!   pod ns a (10.77.0.1) ──veth── vpa ┐
//!   pod ns b (10.77.0.2) ──veth── vpb ├─ node ns (forwarding, /32 routes, proxy ARP)
//!   pod ns c (10.77.0.3) ──veth── vpc ┘   (created mid-test: the attacher must win)
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use moat_dataplane::Backend;
use moat_dataplane::local::{LocalPods, PodAddr, PodInterfaces};
use moat_enforcer_ebpf::EbpfBackend;
use moat_policy::ir::EndpointId;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a thread inside network namespace `ns` (a socket made there stays there).
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        enter(&path);
        f()
    })
    .join()
    .unwrap()
}

fn enter(path: &str) {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: a namespace fd that stays open for the call; affects this thread only.
    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
}

struct Cluster {
    tag: String,
    bpffs: PathBuf,
}

impl Cluster {
    fn node(&self) -> String {
        format!("mn-{}", self.tag)
    }
    fn pod(&self, p: char) -> String {
        format!("mp{p}-{}", self.tag)
    }

    fn new() -> Cluster {
        let c = Cluster {
            // Unique per test, also when a harness runs several in one process; the pid
            // last, as the other BPF tests' sweep of dead runs' directories reads it there.
            tag: {
                static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                format!("{n}-{}", std::process::id())
            },
            bpffs: PathBuf::from("/run/moat-test/bpf"),
        };
        let node = c.node();
        ip(&["netns", "add", &node]);
        ip(&["-n", &node, "link", "set", "lo", "up"]);
        // The pods' gateway, as Calico wires it: a node address, answered on every veth.
        ip(&["-n", &node, "addr", "add", "169.254.1.1/32", "dev", "lo"]);
        for s in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ] {
            let ok = Command::new("ip")
                .args(["netns", "exec", &node, "sysctl", "-qw", s])
                .status()
                .unwrap();
            assert!(ok.success(), "{s}");
        }
        c
    }

    /// A pod: namespace, veth `vp<p>` in the node, address 10.77.0.<n>, host route, proxy ARP.
    /// Returns when the veth's creation was asked for.
    fn add_pod(&self, p: char, n: u8) -> Instant {
        let pod = self.pod(p);
        ip(&["netns", "add", &pod]);
        let created = Instant::now();
        Self::plug(
            &self.node(),
            &pod,
            &format!("vp{p}"),
            &format!("10.77.0.{n}"),
            None,
        );
        created
    }

    /// Wires pod namespace `pod` to the node: veth `host` (at `index` if given), `addr` on
    /// the pod's eth0, its routes, the node's host route and proxy ARP.
    fn plug(node: &str, pod: &str, host: &str, addr: &str, index: Option<u32>) {
        let index = index.map(|i| i.to_string());
        let mut add = vec!["-n", node, "link", "add", "name", host];
        if let Some(i) = &index {
            add.extend(["index", i]);
        }
        add.extend(["type", "veth", "peer", "name", "eth0", "netns", pod]);
        ip(&add);
        ip(&["-n", pod, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            pod,
            "addr",
            "add",
            &format!("{addr}/32"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", pod, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            pod,
            "route",
            "add",
            "169.254.1.1",
            "dev",
            "eth0",
            "scope",
            "link",
        ]);
        ip(&[
            "-n",
            pod,
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ]);
        ip(&["-n", node, "link", "set", "dev", host, "up"]);
        ip(&[
            "-n",
            node,
            "route",
            "add",
            &format!("{addr}/32"),
            "dev",
            host,
        ]);
        let proxy = format!("net.ipv4.conf.{host}.proxy_arp=1");
        let rp = format!("net.ipv4.conf.{host}.rp_filter=0");
        for s in [proxy, rp] {
            Command::new("ip")
                .args(["netns", "exec", node, "sysctl", "-qw", &s])
                .status()
                .unwrap();
        }
    }

    /// Where the backend pins its links.
    fn links(&self) -> PathBuf {
        self.bpffs
            .join("moat")
            .join(format!("pods-{}", self.tag))
            .join("links")
    }

    fn ifindex(&self, name: &str) -> u32 {
        let name = name.to_string();
        in_ns(&self.node(), move || {
            let c = std::ffi::CString::new(name).unwrap();
            // SAFETY: a valid NUL-terminated name.
            unsafe { libc::if_nametoindex(c.as_ptr()) }
        })
    }

    /// Whether a UDP datagram from pod `from` (source `src`) reaches pod `to` at `dst`.
    fn reaches(&self, from: char, src: &str, to: char, dst: &str) -> bool {
        let dst: IpAddr = dst.parse().unwrap();
        let src: IpAddr = src.parse().unwrap();
        let rx = in_ns(&self.pod(to), move || UdpSocket::bind((dst, 0)).unwrap());
        let port = rx.local_addr().unwrap().port();
        rx.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let tx = in_ns(&self.pod(from), move || UdpSocket::bind((src, 0)).unwrap());
        tx.send_to(b"moat", SocketAddr::new(dst, port)).unwrap();
        let mut buf = [0u8; 8];
        matches!(rx.recv_from(&mut buf), Ok((4, _)))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for ns in [self.pod('a'), self.pod('b'), self.pod('c'), self.node()] {
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stderr(std::process::Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(self.bpffs.join("moat").join(format!("pods-{}", self.tag)));
    }
}

fn known(l: &mut LocalPods, iface: u32, a: &str, id: u64) {
    l.pod_ifaces.insert(iface);
    l.addrs
        .insert((iface, a.parse().unwrap()), PodAddr::Known(EndpointId(id)));
}

#[test]
fn pods_are_isolated_until_named_spoofing_is_dropped_and_a_new_pod_is_covered_at_once() {
    let c = Cluster::new();
    c.add_pod('a', 1);
    c.add_pod('b', 2);
    let (ma, mb) = (c.ifindex("vpa"), c.ifindex("vpb"));
    let node = Node::start(&c);
    let set = |l: LocalPods| node.run(move |b| b.set_local(&l).unwrap());
    let counter =
        |name: &'static str| node.run(move |b| b.counters().get(name).copied().unwrap_or(0));

    // Nothing named yet: both pod interfaces are classified, their addresses unknown.
    let mut l = LocalPods::default();
    l.other_ifaces.insert(1);
    l.pod_ifaces.extend([ma, mb]);
    l.addrs
        .insert((ma, "10.77.0.1".parse().unwrap()), PodAddr::Unknown);
    l.addrs
        .insert((mb, "10.77.0.2".parse().unwrap()), PodAddr::Unknown);
    set(l.clone());
    assert!(
        !c.reaches('a', "10.77.0.1", 'b', "10.77.0.2"),
        "unknown pods are isolated"
    );
    assert!(counter("unknown_pod_packets") >= 1);
    known(&mut l, ma, "10.77.0.1", 1);
    known(&mut l, mb, "10.77.0.2", 2);
    set(l.clone());
    assert!(c.reaches('a', "10.77.0.1", 'b', "10.77.0.2"), "named: open");
    assert!(c.reaches('b', "10.77.0.2", 'a', "10.77.0.1"));

    // Pod a sends from an address it was not given (it holds it, the node never routed it):
    // dropped at the node, although the kernel's own reverse path filter is off.
    ip(&[
        "-n",
        &c.pod('a'),
        "addr",
        "add",
        "10.77.0.9/32",
        "dev",
        "eth0",
    ]);
    let before = counter("spoofed_packets");
    assert!(
        !c.reaches('a', "10.77.0.9", 'b', "10.77.0.2"),
        "spoofed source"
    );
    assert!(counter("spoofed_packets") > before);

    // A new pod appears: its interface and route are made and used at once. The attacher
    // puts the programs on it from its first packet, so before any table classifies it
    // nothing passes in either direction.
    let links = c.links();
    // Watches for both programs' link pins of the new interface, from before it exists.
    let pinned = {
        let links = links.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                let n = std::fs::read_dir(&links)
                    .unwrap()
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().contains("-vpc-"))
                    .count();
                if n == 2 {
                    return Some(Instant::now());
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            None
        })
    };
    let created = c.add_pod('c', 3);
    let set_up = created.elapsed();
    let pinned = pinned
        .join()
        .unwrap()
        .expect("the new interface got no programs");
    // Includes starting `ip` (a few ms): an upper bound on creation-to-attach.
    eprintln!(
        "programs on the new pod's veth {:?} after its creation was asked for (the pod's whole setup took {set_up:?})",
        pinned - created
    );
    assert!(pinned - created < Duration::from_millis(100));
    let mc = c.ifindex("vpc");
    // The pod variant went on (the veth holds a pod route): it asks `PODS` alone, so a pod
    // no table names yet is unknown as a receiver and spoofed as a sender (the address is
    // not one its interface holds, as far as Moat knows).
    let (unknown, spoofed) = (counter("unknown_pod_packets"), counter("spoofed_packets"));
    assert!(
        !c.reaches('a', "10.77.0.1", 'c', "10.77.0.3"),
        "to an unclassified pod"
    );
    assert!(counter("unknown_pod_packets") > unknown);
    assert!(
        !c.reaches('c', "10.77.0.3", 'b', "10.77.0.2"),
        "from an unclassified pod"
    );
    assert!(counter("spoofed_packets") > spoofed);
    known(&mut l, mc, "10.77.0.3", 3);
    set(l.clone());
    assert!(
        c.reaches('a', "10.77.0.1", 'c', "10.77.0.3"),
        "classified and named"
    );
    assert!(c.reaches('c', "10.77.0.3", 'b', "10.77.0.2"));
    node.stop();
}

/// An interface deleted and made again under the same index and name between two passes of
/// the attacher (a CNI may ask for the index; a veth moved into the node keeps a free one)
/// looks unchanged in a link dump. Its programs went with the old device: the next pass must
/// put them on the new one, or traffic to the pod there passes unjudged.
#[test]
fn an_interface_made_again_under_its_index_and_name_gets_the_programs() {
    let c = Cluster::new();
    c.add_pod('a', 1);
    c.add_pod('b', 2);
    let (ma, mb) = (c.ifindex("vpa"), c.ifindex("vpb"));
    // Pod a is not named: nothing reaches it.
    let table = move || {
        let mut l = LocalPods::default();
        l.other_ifaces.insert(1);
        known(&mut l, mb, "10.77.0.2", 2);
        l.pod_ifaces.insert(ma);
        l.addrs
            .insert((ma, "10.77.0.1".parse().unwrap()), PodAddr::Unknown);
        l
    };
    let node = Node::start(&c);
    let l = table();
    node.run(move |b| b.set_local(&l).unwrap());
    assert!(!c.reaches('b', "10.77.0.2", 'a', "10.77.0.1"), "unknown");

    // The attacher waits on the programs' lock while the interface is made again, as if
    // both link events came before its next pass.
    let (pod, host) = (c.pod('a'), c.node());
    let (again, attached) = node.run(move |b| {
        let progs = b.dataplane().shared_progs();
        let mut p = progs.lock().unwrap();
        ip(&["-n", &host, "link", "del", "vpa"]);
        Cluster::plug(&host, &pod, "vpa", "10.77.0.1", Some(ma));
        let again = in_ns(&host, || {
            let c = std::ffi::CString::new("vpa").unwrap();
            // SAFETY: a valid NUL-terminated name.
            unsafe { libc::if_nametoindex(c.as_ptr()) }
        });
        (again, p.attach_all(&PodInterfaces::Auto).unwrap())
    });
    assert_eq!(again, ma, "the test needs the same index");
    assert!(
        !c.reaches('b', "10.77.0.2", 'a', "10.77.0.1"),
        "still unknown on the new device"
    );
    assert_eq!(attached, 1, "the new device is attached to");
    let pin = c.links().join(format!("{ma}-vpa-egress"));
    let live = |node: &Node| {
        let pin = pin.clone();
        node.run(move |_| moat_enforcer_ebpf::sys::tcx_link_ifindex(&pin).unwrap())
    };
    assert_eq!(
        live(&node),
        Some(ma),
        "the pin names a link on the new device"
    );

    // The same while no enforcer runs (killed: its pins stay): the next one finds a pin
    // whose link went with the old device. It drops it and attaches anew.
    node.stop_keeping_pins();
    ip(&["-n", &c.node(), "link", "del", "vpa"]);
    Cluster::plug(&c.node(), &c.pod('a'), "vpa", "10.77.0.1", Some(ma));
    let node = Node::start(&c);
    let l = table();
    node.run(move |b| b.set_local(&l).unwrap());
    assert!(
        !c.reaches('b', "10.77.0.2", 'a', "10.77.0.1"),
        "unknown on the device made while no enforcer ran"
    );
    assert_eq!(live(&node), Some(ma));
    node.stop();
}

/// An interface that refuses its program (here: something other than a link sits where its
/// link's pin goes) leaves no other interface without its own: the pass goes on, reports the
/// refusal, and the attacher retries it.
#[test]
fn an_interface_that_refuses_its_program_leaves_the_others_covered() {
    let c = Cluster::new();
    c.add_pod('a', 1);
    c.add_pod('b', 2);
    let (ma, mb) = (c.ifindex("vpa"), c.ifindex("vpb"));
    assert!(ma < mb, "vpa comes first in the pass");
    let blocked = c.links().join(format!("{ma}-vpa-ingress"));
    std::fs::create_dir_all(&blocked).unwrap();
    let node = Node::launch(&c);
    let refused = node.adopted.clone().unwrap_err();
    assert!(refused.contains("vpa"), "{refused}");
    let mut l = LocalPods::default();
    l.other_ifaces.insert(1);
    l.pod_ifaces.extend([ma, mb]);
    known(&mut l, mb, "10.77.0.2", 2);
    l.addrs
        .insert((ma, "10.77.0.1".parse().unwrap()), PodAddr::Unknown);
    node.run(move |b| b.set_local(&l).unwrap());
    // vpb's programs judge what reaches b: a is unknown (and unvouched for, vpa having no
    // ingress program), so dropped.
    assert!(!c.reaches('a', "10.77.0.1", 'b', "10.77.0.2"));
    // Once the obstacle is gone the attacher's retry covers vpa too: b's packets to the
    // unknown a are dropped by vpa's own egress program.
    std::fs::remove_dir(&blocked).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !blocked.exists() {
        assert!(Instant::now() < deadline, "vpa never got its programs");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!c.reaches('b', "10.77.0.2", 'a', "10.77.0.1"));
    node.stop();
}

type Job = Box<dyn FnOnce(&mut EbpfBackend) + Send>;

/// A backend adopted in the node namespace, on a thread of its own (which its attacher
/// inherits), driven by jobs.
struct Node {
    jobs: std::sync::mpsc::Sender<Job>,
    thread: std::thread::JoinHandle<()>,
    keep_pins: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// What `adopt` returned (its error as text).
    adopted: Result<(), String>,
}

impl Node {
    fn start(c: &Cluster) -> Node {
        let n = Node::launch(c);
        n.adopted.clone().unwrap();
        n
    }

    fn launch(c: &Cluster) -> Node {
        let (node, bpffs, tag) = (c.node(), c.bpffs.clone(), c.tag.clone());
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        let keep_pins = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let keep = std::sync::Arc::clone(&keep_pins);
        let (ready, adopted) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            enter(&format!("/run/netns/{node}"));
            let mut b = EbpfBackend::open(
                bpffs,
                &format!("pods-{tag}"),
                PodInterfaces::Auto,
                BTreeMap::new(),
            )
            .unwrap();
            let mut l = LocalPods::default();
            l.other_ifaces.insert(1);
            let r = b.adopt(None, &l).map(|_| ()).map_err(|e| {
                let mut text = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    text = format!("{text}: {c}");
                    cause = c.source();
                }
                text
            });
            ready.send(r).unwrap();
            for f in rx {
                f(&mut b);
            }
            if !keep.load(std::sync::atomic::Ordering::SeqCst) {
                b.remove_all().unwrap();
            }
        });
        Node {
            jobs,
            thread,
            keep_pins,
            adopted: adopted.recv().unwrap(),
        }
    }

    /// Runs `f` on the backend's thread and returns its result.
    fn run<T: Send + 'static>(&self, f: impl FnOnce(&mut EbpfBackend) -> T + Send + 'static) -> T {
        let (done, wait) = std::sync::mpsc::channel();
        self.jobs
            .send(Box::new(move |b| done.send(f(b)).unwrap()))
            .unwrap();
        wait.recv().unwrap()
    }

    fn stop(self) {
        drop(self.jobs);
        self.thread.join().unwrap();
    }

    /// Stops it as a killed enforcer stops: its pins (links and maps) stay.
    fn stop_keeping_pins(self) {
        self.keep_pins
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.stop();
    }
}
