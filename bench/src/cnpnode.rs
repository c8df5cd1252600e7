//! The Antrea scale's largest node under 100 Admin and 20 Baseline ClusterNetworkPolicies
//! (issue #16): does its snapshot fit each dataplane's default sizes, and how long do a
//! full apply and one-pod deltas take, through the backends' own `Backend` calls, in a
//! private network namespace.
//!
//! The synthetic admin policies have `namespaces: {}` peers (every pod of the cluster): the
//! largest node's table holds every pod address. The node is the one whose snapshot has the
//! most entries of all 5,000. One-pod deltas: a pod appearing on another node and going
//! again, without container ports (only address groups change: patched in place), and with a
//! named port the admin policies name (a named-port group changes: planned whole).
//! Baseline, same run: each backend applying the 10,000-rule NetworkPolicy snapshot of
//! `nft-apply`/`ebpf-apply` (the targets' reference size) and its one-pod delta.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use moat_dataplane::Backend;
use moat_dataplane::local::LocalPods;
use moat_enforcer_ebpf::EbpfBackend;
use moat_enforcer_nft::NftBackend;
use moat_policy::Index;
use moat_policy::ir::{NodeSnapshot, delta};
use moat_policy::model::{self, Object};
use moat_policy::testkit::synthetic::{self, Scale};

use crate::compiler::{Cnps, input, pod};
use crate::nftapply::{local_pods, median, ms, objects, snapshot, spread};

/// A node's snapshot before and after a pod elsewhere appears.
struct Pair {
    what: &'static str,
    without: NodeSnapshot,
    with: NodeSnapshot,
}

struct Node {
    name: String,
    base: NodeSnapshot,
    pairs: Vec<Pair>,
}

/// Compiles the world and picks its largest node, with the snapshots of two pod events.
fn largest_node() -> Result<Node> {
    let scale = Scale::ANTREA;
    let mut index = Index::build(
        input(
            scale,
            Cnps {
                admin: 100,
                baseline: 20,
            },
        )
        .objects,
    );
    let (mut name, mut largest) = (String::new(), 0);
    for n in index.nodes() {
        let size = index.snapshot(&n.node).expect("listed").size().total();
        if size > largest {
            (name, largest) = (n.node.to_string(), size);
        }
    }
    let base = index.snapshot(&name).expect("the largest node");
    let elsewhere = (0..scale.nodes)
        .map(synthetic::node_name)
        .find(|n| *n != name)
        .expect("another node");
    let at = |o: Object| -> Object {
        let Object::Pod(mut p) = o else {
            unreachable!("a pod")
        };
        p.node = Some(elsewhere.clone());
        Object::Pod(p)
    };
    let plain = {
        let Object::Pod(mut p) = at(pod("ns-00000", "bench-plain", "app-1", 0, 3_000_000)) else {
            unreachable!("a pod")
        };
        p.ports.clear();
        Object::Pod(p)
    };
    let named = at(pod("ns-00000", "bench-named", "app-1", 0, 3_000_001));
    let mut pairs = Vec::new();
    for (what, o) in [
        ("a pod without ports, on another node", plain),
        ("a pod with a named port the admin policies name", named),
    ] {
        let key = o.key();
        index.apply(o);
        let with = index.snapshot(&name).expect("still listed");
        index.delete(&key);
        let without = index.snapshot(&name).expect("still listed");
        ensure!(without.digest == base.digest, "the event undone");
        ensure!(
            with.digest != base.digest,
            "{what}: the node's snapshot changes"
        );
        pairs.push(Pair {
            what,
            without,
            with,
        });
    }
    Ok(Node { name, base, pairs })
}

/// Times full applies (from `empty`) and one-pod deltas on `b`.
struct Times {
    full: Vec<Duration>,
    deltas: Vec<Vec<Duration>>,
    degraded: usize,
    entries: Option<u64>,
}

#[allow(clippy::too_many_arguments)]
fn time_backend<B: Backend>(
    b: &mut B,
    settle: impl Fn(&mut B),
    empty: &NodeSnapshot,
    snap: &NodeSnapshot,
    pairs: &[(&NodeSnapshot, &NodeSnapshot)],
    local: &LocalPods,
    full_runs: usize,
    delta_runs: usize,
) -> Result<Times> {
    let mut full = Vec::new();
    let mut degraded = 0;
    for _ in 0..full_runs {
        b.apply_full(empty, local)?;
        settle(b);
        let t = Instant::now();
        let applied = b.apply_full(snap, local)?;
        full.push(t.elapsed());
        degraded = applied.degraded.len();
        settle(b);
    }
    // eBPF counts map entries, nft set elements.
    let c = b.counters();
    let entries = c.get("entries").or_else(|| c.get("elements")).copied();
    let mut deltas = Vec::new();
    for (without, with) in pairs {
        b.apply_full(without, local)?;
        settle(b);
        let (there, back) = (delta::diff(without, with), delta::diff(with, without));
        let mut v = Vec::new();
        for i in 0..delta_runs {
            let t = Instant::now();
            if i % 2 == 0 {
                b.apply_delta(without, &there, with, local)?;
            } else {
                b.apply_delta(with, &back, without, local)?;
            }
            v.push(t.elapsed());
            settle(b);
        }
        deltas.push(v);
    }
    Ok(Times {
        full,
        deltas,
        degraded,
        entries,
    })
}

/// Layout 7's tier plan of the largest node (not yet taken by a dataplane): how long, and
/// what it holds, as the layout-6 plan below it.
fn tier_plan_only(node: &Node) -> String {
    use moat_dataplane::plan::tier_tables::tier_plan;
    use moat_dataplane::plan::{Budget, Classes, addresses};
    let t = Instant::now();
    let mut classes = Classes::default();
    let d = addresses(&node.base, &mut classes);
    let laid = t.elapsed();
    let tp = tier_plan(&node.base, &d, &classes);
    let took = t.elapsed();
    let lpm = Budget {
        prefixes: true,
        ..Budget::UNLIMITED
    };
    let prefixes: usize = tp.tables.values().map(|t| t.cost(&lpm)).sum();
    let np: usize = tp.np.values().map(|r| r.elements()).sum();
    // One-pod deltas patched in place: the address maps, then the tier plan.
    let (mut d, mut tp) = (d, tp);
    let mut cache = moat_dataplane::plan::incremental::cache(&node.base, &d);
    let pair = &node.pairs[0];
    let mut took_delta = Vec::new();
    let (mut born, mut at) = (0, &node.base);
    for i in 0..40 {
        let to = if i % 2 == 0 {
            &pair.with
        } else {
            &pair.without
        };
        let dl = delta::diff(at, to);
        assert!(moat_dataplane::plan::incremental::applies(at, &dl));
        let t = Instant::now();
        let log = moat_dataplane::plan::incremental::patch_in_place(
            &mut d,
            &mut cache,
            &mut classes,
            at,
            to,
            &dl,
        );
        let moved = moat_dataplane::plan::tier_tables::patch(&mut tp, to, &d, &classes, &log);
        took_delta.push(t.elapsed());
        born += moved.born.len();
        at = to;
    }
    let extra = tp
        .of_addr
        .keys()
        .filter(|a| d.class_at(**a).is_none())
        .count();
    let nft = match nft_layout7(node, &mut classes) {
        Ok(line) => line,
        Err(e) => format!("nft's rendering of it could not be measured: {e:#}\n\n"),
    };
    nft + &format!(
        "Layout 7's tier plan (`plan::addresses` + `plan::tier_tables::tier_plan`, not yet taken by a dataplane): {:.2} s ({:.2} s of it the address maps); {} cluster classes ({} addresses with named ports of their own, {extra} of them in no address class), {} tier tables holding {} entries ({prefixes} as port prefixes), {} NetworkPolicy rulesets holding {np} entries, {} address entries, {} range entries. One-pod delta ({}), address maps and tier plan patched in place: {:.3} ms median of {} ({born} cluster classes born).\n\n",
        took.as_secs_f64(),
        laid.as_secs_f64(),
        tp.cclasses.len(),
        tp.of_addr.len(),
        tp.tables.len(),
        tp.table_entries(),
        tp.np.len(),
        d.addr4.len() + d.addr6.len(),
        d.class4.len() + d.class6.len(),
        pair.what,
        ms(median(took_delta.clone())),
        took_delta.len(),
    )
}

/// Layout 7 rendered for nft (`render::full_tiers`, `render::delta_tiers`; not yet the
/// backend's) and committed in this namespace's kernel: the full table, then one-pod
/// deltas (planned whole each time, as the backend does not patch this layout yet), against
/// the floor of one `nft` transaction adding as many elements to one plain set.
fn nft_layout7(node: &Node, classes: &mut moat_dataplane::plan::Classes) -> Result<String> {
    use moat_dataplane::plan::addresses;
    use moat_dataplane::plan::tier_tables::tier_plan;
    use moat_enforcer_nft::{nft, render};
    let dir = tempfile::tempdir()?;
    let lock = nft::TxLock::acquire(&dir.path().join("lock"), nft::LOCK_WAIT_DEFAULT)?;
    let local = local_pods(&node.base, 0);
    let epoch = 7;
    let plan = |snap: &NodeSnapshot, classes: &mut moat_dataplane::plan::Classes| {
        let mut d = addresses(snap, classes);
        d.local = local.clone();
        d.epoch = epoch;
        let tp = tier_plan(snap, &d, classes);
        (d, tp)
    };
    let count = |cmds: &[serde_json::Value]| -> usize {
        cmds.iter()
            .filter_map(|c| c["add"]["element"]["elem"].as_array())
            .map(Vec::len)
            .sum()
    };
    let (d, tp) = plan(&node.base, classes);
    let t = Instant::now();
    let full = render::full_tiers(&d, &tp);
    let rendered = t.elapsed();
    let elements = count(&full);
    let t = Instant::now();
    nft::apply(&lock, full)?;
    let applied = t.elapsed();
    // The floor: as many elements into one plain set, one transaction.
    let floor = {
        let elems: Vec<u32> = (1..=elements as u32).collect();
        let batch = serde_json::json!([
            {"add": {"table": {"family": "inet", "name": "floor"}}},
            {"add": {"set": {"family": "inet", "table": "floor", "name": "s", "type": "mark"}}},
            {"add": {"element": {"family": "inet", "table": "floor", "name": "s", "elem": elems}}},
        ]);
        let t = Instant::now();
        nft::apply(&lock, batch.as_array().expect("a batch").clone())?;
        let took = t.elapsed();
        nft::apply(
            &lock,
            vec![serde_json::json!({"delete": {"table": {"family": "inet", "name": "floor"}}})],
        )?;
        took
    };
    let pair = &node.pairs[0];
    let (mut cur, mut deltas, mut sizes) = ((d, tp), Vec::new(), Vec::new());
    for i in 0..10 {
        let to = if i % 2 == 0 {
            &pair.with
        } else {
            &pair.without
        };
        let t = Instant::now();
        let next = plan(to, classes);
        let batch = render::delta_tiers((&cur.0, &cur.1), (&next.0, &next.1));
        sizes.push(batch.len());
        nft::apply(&lock, batch)?;
        deltas.push(t.elapsed());
        cur = next;
    }
    nft::delete_table(&lock)?;
    Ok(format!(
        "nft, layout 7 rendered (`render::full_tiers`, not yet the backend's) and committed: {elements} elements rendered in {:.1} ms, applied in {:.0} ms against {:.0} ms for as many elements in one plain set ({:.2}×); one-pod delta ({}), planned whole, rendered and committed: {:.1} ms median of {} ({}–{} commands).\n\n",
        rendered.as_secs_f64() * 1e3,
        applied.as_secs_f64() * 1e3,
        floor.as_secs_f64() * 1e3,
        applied.as_secs_f64() / floor.as_secs_f64(),
        pair.what,
        ms(median(deltas.clone())),
        deltas.len(),
        sizes.iter().min().unwrap_or(&0),
        sizes.iter().max().unwrap_or(&0),
    ))
}

/// The plan of the largest node alone (no backend): how long, and what it holds.
fn plan_only(node: &Node) -> String {
    use moat_dataplane::plan::{Classes, desired};
    let t = Instant::now();
    let d = desired(&node.base, &mut Classes::default());
    let took = t.elapsed();
    let tiered = d.rulesets.values().filter(|r| r.ordered()).count();
    let named: usize = d
        .rulesets
        .values()
        .map(|r| r.n4.len() + r.n6.len() + r.deny.n4.len() + r.deny.n6.len())
        .sum();
    let classed: usize = d
        .rulesets
        .values()
        .map(|r| r.aa.len() + r.gx.len() + r.gp.len() + r.deny.len())
        .sum();
    format!(
        "The plan alone (`plan::desired`, unlimited budget): {:.2} s; {} rulesets ({tiered} with deny entries), {} address entries, {} range entries, {classed} class and port entries, {named} named-port entries.\n\n",
        took.as_secs_f64(),
        d.rulesets.len(),
        d.addr4.len() + d.addr6.len(),
        d.class4.len() + d.class6.len(),
    )
}

pub fn run(full_runs: usize, delta_runs: usize, plan: bool) -> Result<String> {
    let t = Instant::now();
    let node = largest_node()?;
    let compiled = t.elapsed();
    let size = node.base.size();
    eprintln!(
        "node {} chosen in {:.1} s: {size:?}",
        node.name,
        compiled.as_secs_f64()
    );
    if plan {
        return Ok(tier_plan_only(&node) + &plan_only(&node));
    }
    // The reference: the 10,000-rule NetworkPolicy node of `nft-apply`/`ebpf-apply`.
    let (ref_a, ref_b) = (
        snapshot(&objects(10_000, false)),
        snapshot(&objects(10_000, true)),
    );
    let ref_empty = snapshot(
        &objects(0, false)
            .into_iter()
            .filter(|o| !matches!(o, model::K8sObject::NetworkPolicy(_)))
            .collect::<Vec<_>>(),
    );
    let local = local_pods(&node.base, 0);
    let ref_local = local_pods(&ref_a, 0);
    let pairs: Vec<(&NodeSnapshot, &NodeSnapshot)> =
        node.pairs.iter().map(|p| (&p.without, &p.with)).collect();
    // Its own empty version: the node's pods, no policy at all.
    let empty = {
        let mut e = node.base.clone();
        for ep in &mut e.endpoints {
            ep.ingress = Default::default();
            ep.egress = Default::default();
        }
        e.rules.clear();
        e.groups.clear();
        e.version += 1;
        e.digest = e.content_digest();
        e
    };

    let mut out = String::new();
    writeln!(
        out,
        "Node `{}` of 5,000 (Antrea scale, 100 Admin + 20 Baseline ClusterNetworkPolicies; compiled and chosen in {:.1} s): {} endpoints, {} rules, {} groups, {} group members.\n",
        node.name,
        compiled.as_secs_f64(),
        size.endpoints,
        size.rules,
        size.groups,
        size.members
    )?;
    writeln!(
        out,
        "| backend | what | the largest node | baseline: 10,000-rule NetworkPolicy node | ratio | target |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|")?;

    let work = Work {
        empty: &empty,
        base: &node.base,
        pairs: &pairs,
        local: &local,
        ref_empty: &ref_empty,
        ref_a: &ref_a,
        ref_b: &ref_b,
        ref_local: &ref_local,
        full_runs,
        delta_runs,
    };
    let dir = tempfile::tempdir()?;
    let mut nft = NftBackend::open(
        moat_enforcer_nft::DEFAULT_MAX_ELEMENTS,
        &dir.path().join("lock"),
    )?;
    let (big, reference) = measure(&mut nft, |_| {}, &work)?;
    rows(&mut out, "nft", &big, &reference, &node, 300.0, 10.0)?;
    let mut ebpf = EbpfBackend::open(
        PathBuf::from("/sys/fs/bpf"),
        "bench-node",
        moat_dataplane::local::PodInterfaces::Auto,
        Default::default(),
    )?;
    // The replay onto the unused slot runs after the timed apply: settled before the next.
    let (big, reference) = measure(&mut ebpf, EbpfBackend::settle, &work)?;
    rows(&mut out, "eBPF", &big, &reference, &node, 100.0, 1.0)?;
    Ok(out)
}

/// The snapshots both backends are timed on.
struct Work<'a> {
    empty: &'a NodeSnapshot,
    base: &'a NodeSnapshot,
    pairs: &'a [(&'a NodeSnapshot, &'a NodeSnapshot)],
    local: &'a LocalPods,
    ref_empty: &'a NodeSnapshot,
    ref_a: &'a NodeSnapshot,
    ref_b: &'a NodeSnapshot,
    ref_local: &'a LocalPods,
    full_runs: usize,
    delta_runs: usize,
}

/// The largest node, then the reference node, on one backend (left empty afterwards).
fn measure<B: Backend>(
    b: &mut B,
    settle: impl Fn(&mut B) + Copy,
    w: &Work<'_>,
) -> Result<(Times, Times)> {
    b.adopt(None, &LocalPods::default())?;
    let big = time_backend(
        b,
        settle,
        w.empty,
        w.base,
        w.pairs,
        w.local,
        w.full_runs,
        w.delta_runs,
    )?;
    let reference = time_backend(
        b,
        settle,
        w.ref_empty,
        w.ref_a,
        &[(w.ref_a, w.ref_b)],
        w.ref_local,
        w.full_runs,
        w.delta_runs,
    )?;
    b.remove_all()?;
    Ok((big, reference))
}

fn rows(
    out: &mut String,
    backend: &str,
    big: &Times,
    reference: &Times,
    node: &Node,
    full_target: f64,
    delta_target: f64,
) -> Result<()> {
    let cell = |v: &[Duration]| format!("{:.2} ms ({})", ms(median(v.to_vec())), spread(v));
    let ratio = |a: &[Duration], b: &[Duration]| {
        ms(median(a.to_vec())) / ms(median(b.to_vec())).max(f64::MIN_POSITIVE)
    };
    writeln!(
        out,
        "| {backend} | fits the default sizes | {} ({} entries) | {} entries | — | fits |",
        if big.degraded == 0 {
            "yes".to_string()
        } else {
            format!("**no**: {} rule lists degraded", big.degraded)
        },
        big.entries
            .map_or_else(|| "?".to_string(), |e| e.to_string()),
        reference
            .entries
            .map_or_else(|| "?".to_string(), |e| e.to_string()),
    )?;
    writeln!(
        out,
        "| {backend} | full apply, onto the node without policy | {} | {} | {:.2}× | ≤ {full_target} ms |",
        cell(&big.full),
        cell(&reference.full),
        ratio(&big.full, &reference.full)
    )?;
    for (pair, d) in node.pairs.iter().zip(&big.deltas) {
        writeln!(
            out,
            "| {backend} | one-pod delta: {} | {} | {} | {:.2}× | ≤ {delta_target} ms |",
            pair.what,
            cell(d),
            cell(&reference.deltas[0]),
            ratio(d, &reference.deltas[0])
        )?;
    }
    Ok(())
}
