//! The eBPF dataplane's costs, in a private network namespace:
//!
//! * **per packet**: the datapath program run by the kernel on one packet again and again
//!   (`BPF_PROG_TEST_RUN` with a repeat count; the kernel times the runs, not the packet's
//!   setup), for an established flow, a new flow (a SYN: always judged in full) and a denied
//!   one, with 10 and with 10,000 rules on the destination pod. Baseline, same run: the same
//!   program on an ARP frame, which returns at its first test (entry, exit and the timing
//!   loop itself);
//! * **apply**: the backend installing a 10,000-rule snapshot (from a node without policy)
//!   and one-pod deltas (a client pod appearing and going), through its `Backend` calls.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use moat_dataplane::Backend;
use moat_dataplane::local::{LocalPods, PodAddr};
use moat_enforcer_ebpf::EbpfBackend;
use moat_enforcer_ebpf::common::{MARK_CLASSIFIED, MARK_FROM_OTHER};
use moat_enforcer_ebpf::dataplane::{EGRESS_POD, INGRESS};
use moat_policy::ir::delta;
use moat_policy::model::K8sObject;

use crate::nftapply::{median, ms, objects, snapshot, spread};

const REPEAT: u32 = 1_000_000;
/// Admin ClusterNetworkPolicies over the measured node in the tiers comparison.
const ADMINS: usize = 100;

/// Packets come in on an uplink (7), whose ingress program marks them as from elsewhere, and
/// leave on the server pod's interface: test runs run on loopback (1), a pod interface here.
const UPLINK: u32 = 7;
const MARK: u32 = MARK_CLASSIFIED | MARK_FROM_OTHER;

fn node_pods() -> LocalPods {
    let mut l = LocalPods::default();
    l.other_ifaces.insert(UPLINK);
    l.pod_ifaces.insert(1);
    l.addrs.insert(
        (1, std::net::Ipv4Addr::new(10, 1, 0, 1).into()),
        PodAddr::Known(moat_policy::ir::EndpointId(1)),
    );
    l
}

fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// An IPv4 TCP packet from `src` to `dst`: flags 0x02 (SYN) or 0x10 (ACK).
fn tcp(src: [u8; 4], dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
    tcp_from(src, 65_000, dst, dport, flags)
}

fn tcp_from(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
    let mut f = eth(0x0800);
    f.extend_from_slice(&[0x45, 0, 0, 40, 0, 1, 0, 0, 64, 6, 0, 0]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    f
}

fn arp() -> Vec<u8> {
    let mut f = eth(0x0806);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[0; 20]);
    f
}

/// A path's kernel-timed cost: the median round, and the median and range of its per-round
/// difference to the floor timed in the same round.
#[derive(Clone, Copy)]
struct Timed {
    raw: f64,
    over: f64,
    low: f64,
    high: f64,
}

struct PacketCosts {
    floor: Timed,
    established: Timed,
    new_flow: Timed,
    denied: Timed,
    /// Each run once, on its own frame: the floor, and first packets of fresh flows.
    floor_once: f64,
    fresh: f64,
}

/// Flows timed per round by [`time_fresh`].
const FRESH: u16 = 10_000;

/// Mean ns of one run when every run is a different flow's first packet (a SYN from a
/// source port no flow has used), against the floor run the same way (each run once), the
/// median of `rounds` rounds of [`FRESH`] flows each. The repeated-SYN figure replaces a
/// remembered flow instead; this one is what a new connection costs.
/// `call` keeps the tuples of different calls apart (no flow is ever timed twice).
fn time_fresh(
    b: &mut EbpfBackend,
    client: [u8; 4],
    server: [u8; 4],
    rounds: usize,
    call: u16,
) -> Result<(f64, f64)> {
    let (mut floors, mut fresh) = (Vec::new(), Vec::new());
    let arp = arp();
    for round in 0..rounds.min(3) {
        let (mut f, mut n) = (0u64, 0u64);
        for i in 0..FRESH {
            f += u64::from(
                b.dataplane()
                    .test_run(EGRESS_POD, &arp, MARK, UPLINK)?
                    .duration_ns,
            );
            let sport = 1024 + (call * 3 + round as u16) * FRESH + i;
            let r = b.dataplane().test_run(
                EGRESS_POD,
                &tcp_from(client, sport, server, 80, 0x02),
                MARK,
                UPLINK,
            )?;
            anyhow::ensure!(r.retval == 0, "a fresh SYN of the client must be allowed");
            n += u64::from(r.duration_ns);
        }
        floors.push(f as f64 / f64::from(FRESH));
        fresh.push(n as f64 / f64::from(FRESH));
    }
    Ok((spread_f64(floors).0, spread_f64(fresh).0))
}

/// Median, minimum and maximum of `v` (not empty).
fn spread_f64(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// Mean ns per run of `REPEAT` runs of each frame, in `rounds` rounds; the first frame is
/// the floor. Each round times every frame back to back, so the drift of this shared
/// machine (the floor alone moved 34–44 ns between rounds) hits the floor and the paths
/// alike, and a path's cost over the floor is taken within its round.
fn time(b: &mut EbpfBackend, frames: &[&[u8]], rounds: usize) -> Result<Vec<Timed>> {
    let mut raw = vec![Vec::new(); frames.len()];
    for _ in 0..rounds {
        for (i, f) in frames.iter().enumerate() {
            let r = b
                .dataplane()
                .test_run_repeat(EGRESS_POD, f, MARK, UPLINK, REPEAT)?;
            raw[i].push(f64::from(r.duration_ns));
        }
    }
    Ok(raw
        .iter()
        .map(|r| {
            let over: Vec<f64> = r.iter().zip(&raw[0]).map(|(p, f)| p - f).collect();
            let (over, low, high) = spread_f64(over);
            Timed {
                raw: spread_f64(r.clone()).0,
                over,
                low,
                high,
            }
        })
        .collect())
}

fn packet_costs(b: &mut EbpfBackend, rounds: usize, call: u16) -> Result<PacketCosts> {
    let client = [10, 2, 0, 1];
    let server = [10, 1, 0, 1];
    let stranger = [10, 3, 0, 9];
    let syn = tcp(client, server, 80, 0x02);
    let ack = tcp(client, server, 80, 0x10);
    // The flow is allowed (and remembered) by its SYN; its ACKs are then established.
    let first = b.dataplane().test_run(EGRESS_POD, &syn, MARK, UPLINK)?;
    anyhow::ensure!(first.retval == 0, "the client's SYN must be allowed");
    let denied = tcp(stranger, server, 80, 0x02);
    let d = b.dataplane().test_run(EGRESS_POD, &denied, MARK, UPLINK)?;
    anyhow::ensure!(d.retval == 2, "a stranger's SYN must be dropped");
    let (floor_once, fresh) = time_fresh(b, client, server, rounds, call)?;
    let t = time(b, &[&arp(), &ack, &syn, &denied], rounds)?;
    Ok(PacketCosts {
        floor_once,
        fresh,
        floor: t[0],
        established: t[1],
        new_flow: t[2],
        denied: t[3],
    })
}

fn without_policies(objects: Vec<K8sObject>) -> Vec<K8sObject> {
    objects
        .into_iter()
        .filter(|o| !matches!(o, K8sObject::NetworkPolicy(_)))
        .collect()
}

pub fn run(rules: usize, full_runs: usize, delta_runs: usize, rounds: usize) -> Result<String> {
    // Its own network namespace: `adopt` attaches the programs to every interface, and they
    // drop forwarded packets through interfaces no local pod table classified.
    // SAFETY: unshare affects the calling thread only.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let mut b = EbpfBackend::open(
        PathBuf::from("/sys/fs/bpf"),
        "bench",
        moat_dataplane::local::PodInterfaces::Auto,
        Default::default(),
    )?;
    let pods = node_pods();
    b.adopt(None, &pods)?;
    let empty = snapshot(&without_policies(objects(rules, true)));
    let a = snapshot(&objects(rules, false));
    let c = snapshot(&objects(rules, true));
    let small = snapshot(&objects(10, true));
    let size = a.size();
    // The same node under 100 Admin ClusterNetworkPolicies (issue #16): its ruleset tiered,
    // with deny entries, the measured flows still decided by the NetworkPolicy.
    let tiered = |with_client: bool| {
        let mut o = objects(rules, with_client);
        o.extend(crate::policies::filler_pods(ADMINS, "n1", "app"));
        o.extend(crate::policies::admin_tiers(
            ADMINS,
            crate::policies::filler_peer,
        ));
        snapshot(&o)
    };
    let (ta, tc) = (tiered(false), tiered(true));

    // Per packet, 10 rules then `rules` rules, with the client allowed.
    b.apply_full(&small, &pods)?;
    let few = packet_costs(&mut b, rounds, 0)?;
    b.apply_full(&c, &pods)?;
    let many = packet_costs(&mut b, rounds, 1)?;
    let _ = b.dataplane().test_run(INGRESS, &arp(), 0, 7)?;
    // NetworkPolicy alone and under the admin tiers, alternating, so both meet the same
    // stretch of this shared machine.
    let (mut np_runs, mut tier_runs) = (Vec::new(), Vec::new());
    for round in 0..2u16 {
        b.apply_full(&c, &pods)?;
        np_runs.push(packet_costs(&mut b, rounds, 2 + 2 * round)?);
        let applied = b.apply_full(&tc, &pods)?;
        anyhow::ensure!(applied.degraded.is_empty(), "the tiered snapshot must fit");
        tier_runs.push(packet_costs(&mut b, rounds, 3 + 2 * round)?);
    }

    // Apply: from a node without policy to the big snapshot, again and again.
    // Timed: receipt to "in force" (when the enforcer ACKs). The replay onto the unused
    // slot then runs in the background; it is settled before the next timed apply (as a
    // spaced-out stream of versions would find it) and timed on its own.
    let (mut full, mut full_bg) = (Vec::new(), Vec::new());
    for _ in 0..full_runs {
        b.apply_full(&empty, &pods)?;
        b.settle();
        let t = Instant::now();
        b.apply_full(&a, &pods)?;
        full.push(t.elapsed());
        let t = Instant::now();
        b.settle();
        full_bg.push(t.elapsed());
    }
    let (ac, ca) = (delta::diff(&a, &c), delta::diff(&c, &a));
    let (mut deltas, mut deltas_bg) = (Vec::new(), Vec::new());
    for i in 0..delta_runs {
        let t = Instant::now();
        if i % 2 == 0 {
            b.apply_delta(&a, &ac, &c, &pods)?;
        } else {
            b.apply_delta(&c, &ca, &a, &pods)?;
        }
        deltas.push(t.elapsed());
        let t = Instant::now();
        b.settle();
        deltas_bg.push(t.elapsed());
    }
    let entries = b.counters().get("entries").copied().unwrap_or_default();
    // Applying the tiered snapshot, and a one-pod delta on it (patched in place since
    // `5c0cf8f`; planned whole before).
    let (mut tfull, mut tdeltas) = (Vec::new(), Vec::new());
    for _ in 0..full_runs {
        b.apply_full(&empty, &pods)?;
        b.settle();
        let t = Instant::now();
        b.apply_full(&ta, &pods)?;
        tfull.push(t.elapsed());
        b.settle();
    }
    let tiered_entries = b.counters().get("entries").copied().unwrap_or_default();
    let (tac, tca) = (delta::diff(&ta, &tc), delta::diff(&tc, &ta));
    for i in 0..delta_runs {
        let t = Instant::now();
        if i % 2 == 0 {
            b.apply_delta(&ta, &tac, &tc, &pods)?;
        } else {
            b.apply_delta(&tc, &tca, &ta, &pods)?;
        }
        tdeltas.push(t.elapsed());
        b.settle();
    }
    b.remove_all()?;

    let mut md = String::new();
    writeln!(
        md,
        "Snapshot of node n0: {} endpoints, {} rules, {} groups, {} members; {} map entries per slot.\n",
        size.endpoints, size.rules, size.groups, size.members, entries
    )?;
    writeln!(
        md,
        "Per packet (kernel-timed mean of {REPEAT} runs, median of {rounds} rounds; − floor: the median of the rounds' differences to the floor timed in the same round, and their range):\n"
    )?;
    writeln!(
        md,
        "| path | 10 rules | {rules} rules | {rules} rules − floor | range over rounds | target |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    for (name, f, m, target) in [
        (
            "floor (ARP: entry and exit)",
            few.floor,
            many.floor,
            "baseline",
        ),
        (
            "established flow",
            few.established,
            many.established,
            "≤ 60 ns",
        ),
        (
            "new flow, allowed (SYN)",
            few.new_flow,
            many.new_flow,
            "≤ 250 ns",
        ),
        ("new flow, denied", few.denied, many.denied, "—"),
    ] {
        writeln!(
            md,
            "| {name} | {:.0} ns | {:.0} ns | {:.0} ns | {:.0}–{:.0} ns | {target} |",
            f.raw, m.raw, m.over, m.low, m.high
        )?;
    }
    writeln!(
        md,
        "\nEvery run on its own frame, once (`BPF_PROG_TEST_RUN` without repeat; the kernel times the single run), median of {} rounds of {FRESH}:\n",
        rounds.min(3)
    )?;
    writeln!(
        md,
        "| path | 10 rules | {rules} rules | {rules} rules − floor | target |"
    )?;
    writeln!(md, "|---|---|---|---|---|")?;
    writeln!(
        md,
        "| floor (ARP), each run once | {:.0} ns | {:.0} ns | 0 ns | baseline |",
        few.floor_once, many.floor_once
    )?;
    writeln!(
        md,
        "| new flow, allowed: a fresh tuple's SYN (judged, then inserted) | {:.0} ns | {:.0} ns | {:.0} ns | ≤ 250 ns |",
        few.fresh,
        many.fresh,
        many.fresh - many.floor_once
    )?;
    write_tiers(
        &mut md,
        rules,
        &np_runs,
        &tier_runs,
        tiered_entries,
        &tfull,
        &tdeltas,
    )?;
    let (f, d) = (median(full.clone()), median(deltas.clone()));
    writeln!(md)?;
    writeln!(md, "| apply | median | spread | target |")?;
    writeln!(md, "|---|---|---|---|")?;
    writeln!(
        md,
        "| {rules}-rule snapshot onto a node without policy ({full_runs} runs) | {:.1} ms | {} | ≤ 100 ms |",
        ms(f),
        spread(&full)
    )?;
    writeln!(
        md,
        "| one-pod delta ({delta_runs} runs) | {:.2} ms | {} | ≤ 1 ms |",
        ms(d),
        spread(&deltas)
    )?;
    writeln!(
        md,
        "| after the snapshot, in the background: readers waited out, replay onto the unused slot | {:.1} ms | {} | — |",
        ms(median(full_bg.clone())),
        spread(&full_bg)
    )?;
    writeln!(
        md,
        "| after a delta, in the background: the same | {:.2} ms | {} | — |",
        ms(median(deltas_bg.clone())),
        spread(&deltas_bg)
    )?;
    Ok(md)
}

/// The tiers comparison: per packet under 100 Admin policies against NetworkPolicy alone,
/// each the median over runs alternating the two; applying the tiered snapshot.
#[allow(clippy::too_many_arguments)]
fn write_tiers(
    md: &mut String,
    rules: usize,
    np: &[PacketCosts],
    tiers: &[PacketCosts],
    entries: u64,
    full: &[std::time::Duration],
    deltas: &[std::time::Duration],
) -> Result<()> {
    let med = |v: Vec<f64>| spread_f64(v).0;
    let over = |runs: &[PacketCosts], f: fn(&PacketCosts) -> Timed| {
        med(runs.iter().map(|c| f(c).over).collect())
    };
    let fresh = |runs: &[PacketCosts]| med(runs.iter().map(|c| c.fresh - c.floor_once).collect());
    writeln!(
        md,
        "With {ADMINS} Admin ClusterNetworkPolicies over the node ({rules} NetworkPolicy rules; the measured flows still decided by NetworkPolicy; {entries} map entries per slot), over the floor, median of {} runs alternating with NetworkPolicy alone:\n",
        np.len()
    )?;
    writeln!(
        md,
        "| path | NetworkPolicy alone | with {ADMINS} admin policies | difference | target |"
    )?;
    writeln!(md, "|---|---|---|---|---|")?;
    for (name, f, target) in [
        (
            "established flow",
            (|c: &PacketCosts| c.established) as fn(&PacketCosts) -> Timed,
            "≤ 60 ns over the floor",
        ),
        (
            "new flow, allowed (SYN)",
            |c| c.new_flow,
            "≤ 250 ns over the floor",
        ),
        ("new flow, denied", |c| c.denied, "—"),
    ] {
        let (a, b) = (over(np, f), over(tiers, f));
        writeln!(
            md,
            "| {name} | {a:.0} ns | {b:.0} ns | {:+.0} ns | {target} |",
            b - a
        )?;
    }
    let (a, b) = (fresh(np), fresh(tiers));
    writeln!(
        md,
        "| new flow, a fresh tuple's SYN, each run once | {a:.0} ns | {b:.0} ns | {:+.0} ns | ≤ NetworkPolicy alone + 60 ns |",
        b - a
    )?;
    writeln!(md)?;
    writeln!(
        md,
        "| apply, with {ADMINS} admin policies | median | spread | target |"
    )?;
    writeln!(md, "|---|---|---|---|")?;
    writeln!(
        md,
        "| the tiered snapshot onto a node without policy ({} runs) | {:.1} ms | {} | ≤ 100 ms |",
        full.len(),
        ms(median(full.to_vec())),
        spread(full)
    )?;
    writeln!(
        md,
        "| one-pod delta, patched in place ({} runs) | {:.2} ms | {} | ≤ 1 ms |\n",
        deltas.len(),
        ms(median(deltas.to_vec())),
        spread(deltas)
    )?;
    Ok(())
}
