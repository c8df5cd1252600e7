//! How long the nft backend takes to apply a 10,000-rule snapshot and a one-pod delta,
//! through the enforcer's own `Backend` calls (desired state, rendering, one `nft`
//! transaction each), in a private network namespace.
//!
//! Baselines, measured in the same run: the floor any nft-based dataplane pays for the same
//! work — one `nft` transaction adding as many elements to one plain set (full), and one
//! `nft` transaction adding a single element (delta).
//!
//! The node's 100 pods are in the local pod table (an interface each, known), as the agent
//! gives them; a local pod arriving — its interface classified, its address unknown until
//! the version naming it — is timed as `set_local`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Result;
use moat_dataplane::Backend;
use moat_dataplane::local::{LocalPods, PodAddr};
use moat_enforcer_nft::NftBackend;
use moat_policy::Index;
use moat_policy::ir::delta;
use moat_policy::model::K8sObject;
use moat_policy::testkit::{k8s, parse_all};
use serde_json::json;

use crate::policies;

const LOCAL_PODS: usize = 100;

pub(crate) fn objects(rules: usize, with_client: bool) -> Vec<K8sObject> {
    let mut out = Vec::new();
    for (i, n) in ["n0", "n1"].iter().enumerate() {
        out.push(K8sObject::Node(k8s(json!({"metadata": {"name": n},
            "status": {"addresses": [{"type": "InternalIP", "address": format!("192.0.2.{}", i + 1)}]}}))));
    }
    out.push(K8sObject::Namespace(k8s(
        json!({"metadata": {"name": "app", "labels": {"ns": "app"}}}),
    )));
    let pod = |name: String, node: &str, ip: String, role: &str| {
        K8sObject::Pod(k8s(json!({
            "metadata": {"name": name, "namespace": "app", "labels": {"app": "web", "role": role}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running", "podIPs": [{"ip": ip}]},
        })))
    };
    for i in 0..LOCAL_PODS {
        out.push(pod(
            format!("web-{i}"),
            "n0",
            format!("10.1.0.{}", i + 1),
            "server",
        ));
    }
    if with_client {
        out.push(pod("client".into(), "n1", "10.2.0.1".into(), "client"));
    }
    out.push(policies::big(
        "big",
        "app",
        json!({"matchLabels": {"role": "server"}}),
        rules,
        0,
        Some(
            json!({"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                    "ports": [{"protocol": "TCP", "port": 80}]}),
        ),
    ));
    out
}

pub(crate) fn snapshot(objects: &[K8sObject]) -> moat_policy::ir::NodeSnapshot {
    Index::build(parse_all(objects)).snapshot("n0").expect("n0")
}

/// The local pod table of `snap`'s endpoints, one interface each (indexes from 100: they
/// need not exist for nft), every address known; plus `extra` unnamed addresses on
/// interfaces of their own (pods whose version has not arrived yet).
pub(crate) fn local_pods(snap: &moat_policy::ir::NodeSnapshot, extra: u8) -> LocalPods {
    let mut l = LocalPods::default();
    l.other_ifaces.extend([1, 2]);
    for (i, e) in snap.endpoints.iter().enumerate() {
        let iface = 100 + i as u32;
        l.pod_ifaces.insert(iface);
        for a in &e.addrs {
            l.addrs.insert((iface, *a), PodAddr::Known(e.id));
        }
    }
    for k in 0..extra {
        let iface = 1000 + u32::from(k);
        l.pod_ifaces.insert(iface);
        let a = std::net::Ipv4Addr::new(10, 1, 1, k + 1);
        l.addrs.insert((iface, a.into()), PodAddr::Unknown);
    }
    l
}

fn nft(script: &str) -> Result<()> {
    crate::netns::nft(None, script)
}

pub(crate) fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub(crate) fn spread(v: &[Duration]) -> String {
    let min = v.iter().min().expect("samples");
    let max = v.iter().max().expect("samples");
    format!("{:.1}–{:.1} ms", ms(*min), ms(*max))
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The user-space part of one-pod deltas as the backend does it (in-place patch, then the
/// diff into commands), with its parts timed; no kernel involved.
pub fn compute(rules: usize, runs: usize) -> (Vec<Duration>, Duration, Duration) {
    use moat_enforcer_nft::{desired, incremental, render};
    let a = snapshot(&objects(rules, false));
    let b = snapshot(&objects(rules, true));
    let (ab, ba) = (delta::diff(&a, &b), delta::diff(&b, &a));
    let mut classes = desired::Classes::default();
    let mut cur = desired::desired(&a, &mut classes);
    let mut cache = incremental::cache(&a, &cur);
    let (mut total, mut patching, mut rendering) = (Vec::new(), Duration::ZERO, Duration::ZERO);
    for i in 0..runs {
        let (old, new, d) = if i % 2 == 0 {
            (&a, &b, &ab)
        } else {
            (&b, &a, &ba)
        };
        assert!(incremental::applies(old, d));
        let t = Instant::now();
        let next = incremental::patch(&cur, &mut cache, &mut classes, old, new, d);
        let t1 = t.elapsed();
        std::hint::black_box(render::delta(&cur, &next));
        let t2 = t.elapsed();
        total.push(t2);
        patching += t1;
        rendering += t2 - t1;
        cur = next;
    }
    (total, patching / runs as u32, rendering / runs as u32)
}

pub fn compute_loop(rules: usize, runs: usize) {
    let (total, p, r) = compute(rules, runs);
    println!(
        "median {:?} (patch {p:?}, render {r:?} on average)",
        median(total)
    );
}

pub fn run(rules: usize, full_runs: usize, delta_runs: usize) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let mut backend = NftBackend::open(
        moat_enforcer_nft::DEFAULT_MAX_ELEMENTS,
        &dir.path().join("lock"),
    )?;
    backend.adopt(None, &moat_dataplane::LocalPods::default())?;
    let a = snapshot(&objects(rules, false));
    let b = snapshot(&objects(rules, true));
    let size = a.size();
    let local = local_pods(&a, 0);

    // Full: replace the table with the whole snapshot, again and again.
    let mut full = Vec::new();
    for _ in 0..full_runs {
        let t = Instant::now();
        let applied = backend.apply_full(&a, &local)?;
        full.push(t.elapsed());
        anyhow::ensure!(
            applied.degraded.is_empty(),
            "degraded: {:?}",
            applied.degraded
        );
    }
    // Delta: the client pod appears and disappears (one group member in, one out).
    let (ab, ba) = (delta::diff(&a, &b), delta::diff(&b, &a));
    let mut deltas = Vec::new();
    for i in 0..delta_runs {
        let t = Instant::now();
        if i % 2 == 0 {
            backend.apply_delta(&a, &ab, &b, &local)?;
        } else {
            backend.apply_delta(&b, &ba, &a, &local)?;
        }
        deltas.push(t.elapsed());
    }
    // A local pod's interface appears and goes (its address unknown, isolated).
    let arrived = local_pods(&a, 1);
    let mut locals = Vec::new();
    for i in 0..delta_runs {
        let t = Instant::now();
        backend.set_local(if i % 2 == 0 { &arrived } else { &local })?;
        locals.push(t.elapsed());
    }
    backend.remove_all()?;
    // The user-space part alone: the in-place patch and the diff into commands.
    let (compute, _, _) = compute(rules, delta_runs);

    // Baselines: the same number of elements into one plain set; one element.
    let elements = size.rules + size.members + size.endpoints;
    let mut script = String::from(
        "table inet base {\n set s { type ipv4_addr; }\n}\nadd element inet base s { ",
    );
    let list: Vec<String> = (0..elements)
        .map(|i| policies::filler(i).to_string())
        .collect();
    script.push_str(&list.join(", "));
    script.push_str(" }\n");
    let mut base_full = Vec::new();
    for _ in 0..full_runs {
        let _ = nft("delete table inet base");
        let t = Instant::now();
        nft(&script)?;
        base_full.push(t.elapsed());
    }
    let mut base_delta = Vec::new();
    for i in 0..delta_runs {
        let op = if i % 2 == 0 { "add" } else { "delete" };
        let t = Instant::now();
        nft(&format!("{op} element inet base s {{ 100.127.0.1 }}\n"))?;
        base_delta.push(t.elapsed());
    }
    let _ = nft("delete table inet base");

    let (f, d, bf, bd) = (
        median(full.clone()),
        median(deltas.clone()),
        median(base_full.clone()),
        median(base_delta.clone()),
    );
    let mut md = String::new();
    writeln!(
        md,
        "Snapshot of node n0: {} endpoints, {} rules, {} groups, {} members.\n",
        size.endpoints, size.rules, size.groups, size.members
    )?;
    writeln!(
        md,
        "| what | median | spread | baseline (median) | ratio | target |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|")?;
    writeln!(
        md,
        "| full snapshot, {} runs | {:.1} ms | {} | {:.1} ms ({elements} elements into one set) | {:.2}× | ≤ 300 ms |",
        full_runs,
        ms(f),
        spread(&full),
        ms(bf),
        f.as_secs_f64() / bf.as_secs_f64()
    )?;
    writeln!(
        md,
        "| one-pod delta, {} runs | {:.2} ms | {} | {:.2} ms (one element) | {:.2}× | ≤ 10 ms |",
        delta_runs,
        ms(d),
        spread(&deltas),
        ms(bd),
        d.as_secs_f64() / bd.as_secs_f64()
    )?;
    writeln!(
        md,
        "| a local pod's interface appears or goes (`set_local`), {} runs | {:.2} ms | {} | {:.2} ms (one element) | {:.2}× | ≤ 10 ms |",
        locals.len(),
        ms(median(locals.clone())),
        spread(&locals),
        ms(bd),
        median(locals.clone()).as_secs_f64() / bd.as_secs_f64()
    )?;
    let c = median(compute.clone());
    writeln!(
        md,
        "| ↳ of which user space (patch the desired table in place, diff it into commands), {} runs | {:.2} ms | {} | | | |",
        compute.len(),
        ms(c),
        spread(&compute)
    )?;
    Ok(md)
}
