//! ClusterNetworkPolicy tiers in the kernel (layout 6): on random clusters mixing
//! NetworkPolicies and cluster policies, the program's verdict on a new flow equals the IR
//! interpreter's, for each side of the flow judged alone — the program as it runs, its
//! lookups most specific first, the first hit deciding. Needs root and BPF, as CI has.

mod frames;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;

use frames::*;
use moat_dataplane::local::{LocalPods, PodAddr};
use moat_dataplane::plan::{Classes, Desired, desired_within};
use moat_ebpf_common::LAYOUT_VERSION;
use moat_enforcer_ebpf::dataplane::{Dataplane, EGRESS, EGRESS_POD, INGRESS, INGRESS_POD};
use moat_enforcer_ebpf::entries::{Diff, Entries, RulesetIds, budget, entries};
use moat_enforcer_ebpf::pods::PodTables;
use moat_policy::Index;
use moat_policy::ir::sim::{Fleet, Packet};
use moat_policy::ir::{EndpointId, Tier};
use moat_policy::testkit::parse_all;
use moat_policy::testkit::random::{Features, PROBES, World};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand::seq::IndexedRandom;

const OK: u32 = 0;
/// The uplink, and `OUT`: where packets leave (loopback, as `BPF_PROG_TEST_RUN` runs them).
const UPLINK: u32 = 7;
const OUT: u32 = 1;
/// The sending pod's interface.
const POD: u32 = 5;

struct Node {
    dp: Dataplane,
    root: PathBuf,
    pods: PodTables,
    current: Entries,
    ids: RulesetIds,
    sport: u16,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

impl Node {
    fn install(&mut self, d: &Desired) {
        let new = entries(d, &mut self.ids);
        new.check_capacity().unwrap();
        let diff = Diff::between(&self.current, &new);
        let active = self.dp.active_slot().unwrap();
        self.dp.write(1 - active, &diff).unwrap();
        self.dp.flip(1 - active).unwrap();
        self.dp.barrier().wait().unwrap();
        self.dp.write(active, &diff).unwrap();
        self.current = new;
    }

    /// Makes `addr` the one local pod, on interface `at`; the other interface is an uplink.
    fn one_pod(&mut self, at: u32, addr: IpAddr) {
        let mut l = LocalPods::default();
        l.pod_ifaces.insert(at);
        l.other_ifaces.insert(if at == POD { OUT } else { UPLINK });
        l.addrs.insert((at, addr), PodAddr::Known(EndpointId(1)));
        let new = PodTables::of(&l);
        let (less, more) = self.pods.diff(&new);
        self.dp.write_pods(&less).unwrap();
        self.dp.write_pods(&more).unwrap();
        self.pods = new;
    }

    /// A new flow's first packet, in on `from`, out on `OUT`: whether it passes.
    fn passes(&mut self, p: &Packet, from: u32) -> bool {
        // A tuple never seen before: no remembered flow decides for the rules.
        self.sport = self.sport.wrapping_add(1).max(1024);
        let frame = frame(p, self.sport);
        let pod_in = from == POD;
        let ingress = if pod_in { INGRESS_POD } else { INGRESS };
        let r = self.dp.test_run(ingress, &frame, 0, from).unwrap();
        assert_eq!(r.retval, OK, "the ingress program never drops");
        let egress = if pod_in { EGRESS } else { EGRESS_POD };
        self.dp
            .test_run(egress, &frame, r.mark, from)
            .unwrap()
            .retval
            == OK
    }
}

fn frame(p: &Packet, sport: u16) -> Vec<u8> {
    let l4 = match p.proto {
        6 => syn(sport, p.port),
        1 | 58 => icmp(if p.proto == 1 { 8 } else { 128 }, 0, sport),
        _ => ports(sport, p.port),
    };
    match (p.src, p.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            V4::new(&s.to_string(), &d.to_string(), p.proto).frame(&l4)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => v6(&s.to_string(), &d.to_string(), &[], p.proto, &l4),
        _ => unreachable!("one family per packet"),
    }
}

fn eg(d: &Desired, a: IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => d.eg4.contains_key(&a),
        IpAddr::V6(a) => d.eg6.contains_key(&a),
    }
}

fn ing(d: &Desired, a: IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => d.ing4.contains_key(&a),
        IpAddr::V6(a) => d.ing6.contains_key(&a),
    }
}

#[test]
fn the_program_decides_cluster_tiers_like_the_ir() {
    // SAFETY: a namespace of this thread's own; the test attaches nothing.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
    let bpffs = PathBuf::from("/run/moat-test/bpf");
    let name = format!("tiers-{}", std::process::id());
    let root = bpffs.join("moat").join(&name);
    let _ = std::fs::remove_dir_all(&root);
    let dp = Dataplane::open(&bpffs, &name).expect("load the datapath (root and BPF needed)");
    let mut node = Node {
        dp,
        root,
        pods: PodTables::default(),
        current: Entries::default(),
        ids: RulesetIds::default(),
        sport: 1024,
    };
    let budget = budget(None, LAYOUT_VERSION);
    let mut f = Features::default();
    let (mut checked, mut denied, mut tiered_worlds, mut ordered) = (0usize, 0, 0, 0);
    let mut classes = Classes::default();
    for case in 0..250u64 {
        let mut rng = SmallRng::seed_from_u64(0x71e6 + case);
        let world = World::generate(&mut rng, &mut f);
        let snaps = Index::build(parse_all(&world.objects())).snapshots();
        let fleet = Fleet::new(&snaps);
        let tiered = |s: &&moat_policy::ir::NodeSnapshot| {
            s.rules.iter().any(|r| r.tier != Tier::NetworkPolicy)
        };
        let Some(snap) = snaps.iter().filter(tiered).max_by_key(|s| s.rules.len()) else {
            continue;
        };
        tiered_worlds += 1;
        let d = desired_within(snap, &mut classes, &LocalPods::default(), &budget);
        assert!(d.degraded.is_empty(), "case {case}: {:?}", d.degraded);
        ordered += d.rulesets.values().filter(|r| r.ordered()).count();
        node.install(&d);
        let addrs = world.addresses();
        let mut verdicts: HashMap<(IpAddr, IpAddr, u8, u16, bool), bool> = HashMap::new();
        for _ in 0..150 {
            let src = *addrs.choose(&mut rng).unwrap();
            let same: Vec<_> = addrs
                .iter()
                .copied()
                .filter(|a| a.is_ipv4() == src.is_ipv4() && *a != src)
                .collect();
            let dst = *same.choose(&mut rng).unwrap();
            let (proto, port) = *PROBES.choose(&mut rng).unwrap();
            let proto = if proto == 1 && src.is_ipv6() {
                58
            } else {
                proto
            };
            let p = Packet {
                src,
                dst,
                proto,
                port,
            };
            if snap.node_addrs.contains(&src) || snap.node_addrs.contains(&dst) {
                continue;
            }
            for egress in [true, false] {
                let (local, want) = if egress {
                    (eg(&d, src), fleet.egress_allows(&p))
                } else {
                    (ing(&d, dst), fleet.ingress_allows(&p))
                };
                if !local || verdicts.contains_key(&(src, dst, proto, port, egress)) {
                    continue;
                }
                let got = if egress {
                    node.one_pod(POD, src);
                    node.passes(&p, POD)
                } else {
                    node.one_pod(OUT, dst);
                    node.passes(&p, UPLINK)
                };
                let side = if egress { "egress" } else { "ingress" };
                assert_eq!(
                    got, want,
                    "case {case}: {side} {p:?} on {}: program {got}, IR {want}",
                    snap.node
                );
                verdicts.insert((src, dst, proto, port, egress), got);
                checked += 1;
                denied += usize::from(!got);
            }
        }
    }
    eprintln!(
        "{checked} verdicts ({denied} denied) over {tiered_worlds} worlds with cluster rules, {ordered} rulesets with deny entries"
    );
    assert!(
        tiered_worlds >= 100 && ordered >= 100,
        "{tiered_worlds} / {ordered}"
    );
    assert!(checked >= 2_000 && denied >= 300, "{checked} / {denied}");
}
