//! The compiler's own measurements, shared by the report and the `cnp` comparison: the
//! synthetic input, one full compile, and single-pod events on a compiled cluster. Depends on
//! the policy crate alone.

use std::time::{Duration, Instant};

use moat_policy::model::{self, Object};
use moat_policy::testkit::synthetic::{self, Scale};
use moat_policy::{Index, model::K8sObject};

use crate::alloc;

/// ClusterNetworkPolicies added to the synthetic cluster
/// ([`synthetic::cluster_policies`]); none by default.
#[derive(clap::Args, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Cnps {
    /// Admin-tier ClusterNetworkPolicies.
    #[arg(long, default_value_t = 0)]
    pub(crate) admin: usize,
    /// Baseline-tier ClusterNetworkPolicies.
    #[arg(long, default_value_t = 0)]
    pub(crate) baseline: usize,
}

impl Cnps {
    pub(crate) const NONE: Cnps = Cnps {
        admin: 0,
        baseline: 0,
    };
}

pub(crate) struct Input {
    pub(crate) objects: Vec<Object>,
    pub(crate) parse: Duration,
    pub(crate) bytes: usize,
}

/// Generates the cluster and converts it as a source would; the conversion is the baseline.
pub(crate) fn input(scale: Scale, cnps: Cnps) -> Input {
    let mut k8s: Vec<K8sObject> = Vec::new();
    synthetic::generate(scale, 7, |o| k8s.push(o));
    synthetic::cluster_policies(cnps.admin, cnps.baseline, |o| k8s.push(o));
    let live = alloc::live();
    let t = Instant::now();
    let objects: Vec<Object> = k8s
        .iter()
        .map(|o| {
            model::parse::object(o)
                .expect("synthetic objects are valid")
                .value
        })
        .collect();
    let parse = t.elapsed();
    let bytes = alloc::live() - live;
    drop(k8s);
    // Dropping the generator's millions of small JSON-derived allocations leaves them in
    // glibc's fast bins, and the next large allocation consolidates them all: 0.1-0.2 s that
    // would land inside whatever is timed next (the full compile). Settle it here.
    // SAFETY: malloc_trim only walks and releases the allocator's own free lists.
    unsafe { libc::malloc_trim(0) };
    Input {
        objects,
        parse,
        bytes,
    }
}

pub(crate) struct CompileResult {
    pub(crate) scale: Scale,
    pub(crate) parse: Duration,
    pub(crate) build: Duration,
    /// CPU time of the compiling thread during `build` (immune to other processes' load,
    /// which only stretches wall time on this shared machine).
    pub(crate) build_cpu: Duration,
    pub(crate) materialize: Duration,
    pub(crate) input_bytes: usize,
    pub(crate) peak_bytes: usize,
    pub(crate) retained_bytes: usize,
    pub(crate) stats: moat_policy::Stats,
    pub(crate) snapshot_entries: usize,
    pub(crate) largest_snapshot: usize,
}

/// CPU time consumed by the calling thread so far.
pub(crate) fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; this clock exists on every Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

pub(crate) fn compile(scale: Scale, cnps: Cnps) -> CompileResult {
    let input = input(scale, cnps);
    let before = alloc::live();
    alloc::reset_peak();
    let cpu = thread_cpu();
    let t = Instant::now();
    let index = Index::build(input.objects);
    let build = t.elapsed();
    let build_cpu = thread_cpu() - cpu;
    let peak = alloc::peak() - (before - input.bytes);
    let retained = alloc::live() - (before - input.bytes);
    let t = Instant::now();
    let mut entries = 0;
    let mut largest = 0;
    for n in index.nodes() {
        let s = index.snapshot(&n.node).expect("listed");
        let size = s.size().total();
        entries += size;
        largest = largest.max(size);
    }
    let materialize = t.elapsed();
    CompileResult {
        scale,
        parse: input.parse,
        build,
        build_cpu,
        materialize,
        input_bytes: input.bytes,
        peak_bytes: peak,
        retained_bytes: retained,
        stats: index.stats(),
        snapshot_entries: entries,
        largest_snapshot: largest,
    }
}

pub(crate) fn mib(b: usize) -> String {
    format!("{:.0} MiB", b as f64 / (1024.0 * 1024.0))
}

pub(crate) fn secs(d: Duration) -> String {
    if d.as_secs_f64() >= 1.0 {
        format!("{:.2} s", d.as_secs_f64())
    } else if d.as_secs_f64() >= 1e-3 {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.1} µs", d.as_secs_f64() * 1e6)
    }
}

impl CompileResult {
    pub(crate) fn row(&self) -> String {
        let s = self.scale;
        format!(
            "| {} / {} / {} / {} | {} | {} | **{}** | {:.2}× | {} | {} | {} | {} | {} | {} / {} |",
            s.nodes,
            s.namespaces,
            s.pods,
            s.policies,
            secs(self.parse),
            mib(self.input_bytes),
            secs(self.build),
            self.build.as_secs_f64() / self.parse.as_secs_f64(),
            mib(self.peak_bytes),
            mib(self.retained_bytes),
            secs(self.materialize),
            self.stats.groups,
            self.stats.rules,
            self.snapshot_entries,
            self.largest_snapshot,
        )
    }
}

impl CompileResult {
    /// For the parent of a `cnp` run: durations in nanoseconds, sizes in bytes.
    pub(crate) fn machine(&self) -> String {
        format!(
            "parse={} build={} build_cpu={} materialize={} input={} peak={} retained={} groups={} rules={} entries={} largest={}",
            self.parse.as_nanos(),
            self.build.as_nanos(),
            self.build_cpu.as_nanos(),
            self.materialize.as_nanos(),
            self.input_bytes,
            self.peak_bytes,
            self.retained_bytes,
            self.stats.groups,
            self.stats.rules,
            self.snapshot_entries,
            self.largest_snapshot,
        )
    }
}

pub(crate) const COMPILE_HEADER: &str = "| nodes / namespaces / pods / policies | baseline: validate + convert input | input size | full compile | compile ÷ baseline | peak heap (input + index) | index after compile | materialise all snapshots | groups | rules | snapshot entries: all nodes / largest node |\n|---|---|---|---|---|---|---|---|---|---|---|\n";

pub(crate) struct EventResult {
    pub(crate) what: &'static str,
    pub(crate) nodes: usize,
    pub(crate) median: Duration,
    pub(crate) p90: Duration,
}

/// Times single-pod events on a compiled cluster. Each kind is applied and undone many times;
/// the node count is how many snapshots the event changed.
pub(crate) fn events(scale: Scale, cnps: Cnps, iterations: usize) -> (Duration, Vec<EventResult>) {
    let input = input(scale, cnps);
    let t = Instant::now();
    let mut index = Index::build(input.objects);
    let full = t.elapsed();
    // A quiet namespace (no policies) and a ten-node one whose pods all allow each other.
    let mut setup = vec![Object::Namespace(model::Namespace {
        name: "bench-ten".into(),
        labels: model::Namespace::implicit_labels("bench-ten"),
    })];
    for i in 0..10 {
        setup.push(pod(
            "bench-ten",
            &format!("p{i}"),
            "peer",
            i * (scale.nodes / 10),
            1_000_000 + i,
        ));
    }
    setup.push(Object::Policy(model::Policy {
        namespace: "bench-ten".into(),
        name: "mesh".into(),
        pod_selector: model::Selector::everything(),
        ingress: Some(vec![model::Rule {
            peers: vec![model::Peer::Pods {
                namespaces: None,
                pods: model::Selector::everything(),
            }],
            ports: vec![],
        }]),
        egress: None,
    }));
    index.batch(setup.into_iter().map(moat_policy::Event::Apply));

    let node = scale.nodes / 2 + 1;
    let kinds: [(&'static str, Object); 4] = [
        (
            "pod added in a namespace without policies",
            pod("bench-solo", "new", "solo", node, 2_000_000),
        ),
        (
            "pod added to a 10-node mesh",
            pod("bench-ten", "new", "peer", node, 2_000_001),
        ),
        (
            "pod added in an app namespace (100 pods)",
            pod("ns-00000", "new", "app-1", node, 2_000_002),
        ),
        (
            "DNS replica added (every node's DNS egress rule)",
            pod("kube-system", "coredns-new", "dns", node, 2_000_003),
        ),
    ];
    let mut out = Vec::new();
    for (what, obj) in kinds {
        let key = obj.key();
        let mut add = Vec::new();
        let mut del = Vec::new();
        let mut nodes = 0;
        for _ in 0..iterations {
            let t = Instant::now();
            let c = index.apply(obj.clone());
            add.push(t.elapsed());
            nodes = c.updated.len();
            let t = Instant::now();
            index.delete(&key);
            del.push(t.elapsed());
        }
        out.push(EventResult {
            what,
            nodes,
            median: median(&mut add),
            p90: p90(&mut add),
        });
        let what_del: &'static str = match what {
            w if w.starts_with("DNS") => "DNS replica deleted",
            _ => "… and deleted again",
        };
        out.push(EventResult {
            what: what_del,
            nodes,
            median: median(&mut del),
            p90: p90(&mut del),
        });
    }
    // A relabel moves one pod between app groups.
    let mut relabel = Vec::new();
    let mut nodes = 0;
    let a = pod("ns-00001", "relabelled", "app-1", node, 2_000_010);
    let mut b = a.clone();
    if let Object::Pod(p) = &mut b {
        p.labels.insert("app".into(), "app-2".into());
    }
    index.apply(a.clone());
    for i in 0..iterations {
        let t = Instant::now();
        let c = index.apply(if i % 2 == 0 { b.clone() } else { a.clone() });
        relabel.push(t.elapsed());
        nodes = nodes.max(c.updated.len());
    }
    out.push(EventResult {
        what: "pod relabelled app-1 ↔ app-2 (app namespace)",
        nodes,
        median: median(&mut relabel),
        p90: p90(&mut relabel),
    });
    (full, out)
}

pub(crate) fn pod(ns: &str, name: &str, app: &str, node: usize, n: usize) -> Object {
    let labels = if app == "dns" {
        [("k8s-app".to_string(), "kube-dns".to_string())].into()
    } else {
        [
            ("app".to_string(), app.to_string()),
            ("tier".to_string(), "frontend".to_string()),
        ]
        .into()
    };
    Object::Pod(model::Pod {
        namespace: ns.into(),
        name: name.into(),
        labels,
        node: Some(synthetic::node_name(node)),
        ips: vec![synthetic::pod_ip_v4(n)],
        ports: vec![model::ContainerPort {
            name: "http".into(),
            proto: model::Protocol::Tcp,
            port: 8080,
        }],
        host_network: false,
        terminal: false,
        uid: None,
        sandbox: None,
    })
}

pub(crate) fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub(crate) fn p90(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() * 9 / 10]
}
