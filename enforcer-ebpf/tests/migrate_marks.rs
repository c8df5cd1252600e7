//! The mark across a live upgrade from layout 4, program by program in the kernel
//! (`BPF_PROG_TEST_RUN`): layout 4's ingress program writes its sender's 8-bit index where
//! this layout's writes its findings, and while the links move a packet may be marked by the
//! one and judged by the other. This layout's egress program must judge such a packet by the
//! sender the index names, checked against the pod interface it came from; an index that
//! reads as one of its findings ("from an unknown pod, left open") must be renumbered away
//! first. Needs root and BPF, as CI has.
//!
//! One test in its own binary: it points the loader at the committed layout-4 object through
//! the environment, which no other test may see, and enters a network namespace of its own.

mod frames;
mod layouts;

use std::path::Path;

use aya::maps::{Array, HashMap, MapData};
use frames::*;
use layouts::{BPFFS, Sweep, node, open_layout, own_netns};
use moat_dataplane::local::{LocalPods, PodAddr, PodInterfaces};
use moat_dataplane::plan::{Desired, Ruleset};
use moat_ebpf_common::{
    LAYOUT_VERSION, LocalAddr, LocalKey, MARK_LEGACY_INDEX, MARK_LEGACY_SHIFT, MapNames, is_finding,
};
use moat_enforcer_ebpf::dataplane::{Dataplane, EGRESS, INGRESS, INGRESS_POD};
use moat_enforcer_ebpf::entries::{Diff, Entries, RulesetIds, entries};
use moat_enforcer_ebpf::migrate::legacy_marks_migrating;
use moat_enforcer_ebpf::pods::PodTables;
use moat_policy::ir::EndpointId;

const OK: u32 = 0;
const SHOT: u32 = 2;
/// `BPF_PROG_TEST_RUN` runs a tc program on loopback: the way out, an uplink here.
const OUT: u32 = 1;
const UPLINK: u32 = 7;
const POD_A: u32 = 5;
const POD_B: u32 = 6;
const POD_C: u32 = 9;
/// Pod D had no index under layout 4 (only senders with isolated egress had one).
const POD_D: u32 = 10;
/// Pod A's index under layout 4: it reads as "from an unknown pod, left open".
const A_INDEX: u32 = 81;
/// Pod B's and pod C's: no finding of this layout's.
const B_INDEX: u32 = 70;
const C_INDEX: u32 = 144;

fn tcp4(src: &str, dst: &str, sport: u16) -> Vec<u8> {
    V4::new(src, dst, TCP).frame(&syn(sport, 80))
}

/// Layout 4's local senders: `(address, index)` in `LOCAL`, the address in `LOCAL_ADDR`.
fn index_senders(v4: &Path, senders: &[(&str, u32)]) {
    let mut local: HashMap<MapData, LocalKey, u32> = HashMap::try_from(aya::maps::Map::HashMap(
        MapData::from_pin(v4.join(MapNames::LOCAL)).unwrap(),
    ))
    .unwrap();
    let mut addrs: Array<MapData, LocalAddr> = Array::try_from(aya::maps::Map::Array(
        MapData::from_pin(v4.join(MapNames::LOCAL_ADDR)).unwrap(),
    ))
    .unwrap();
    for (a, i) in senders {
        let addr = addr16(a.parse().unwrap());
        addrs
            .set(
                *i,
                LocalAddr {
                    family: 4,
                    _pad: [0; 3],
                    addr,
                },
                0,
            )
            .unwrap();
        let key = LocalKey {
            family: 4,
            _pad: [0; 3],
            addr,
        };
        local.insert(key, i, 0).unwrap();
    }
}

/// This layout's view of the node: pods A, B and D known, C unknown (denied), the rest
/// uplinks; pod A isolated for egress with nothing allowed.
fn enforce(dp: &mut Dataplane) {
    let mut l = LocalPods::default();
    l.other_ifaces.extend([OUT, UPLINK]);
    l.pod_ifaces.extend([POD_A, POD_B, POD_C, POD_D]);
    l.addrs.insert(
        (POD_D, "10.0.0.6".parse().unwrap()),
        PodAddr::Known(EndpointId(4)),
    );
    l.addrs.insert(
        (POD_A, "10.0.0.2".parse().unwrap()),
        PodAddr::Known(EndpointId(1)),
    );
    l.addrs.insert(
        (POD_B, "10.0.0.4".parse().unwrap()),
        PodAddr::Known(EndpointId(2)),
    );
    l.addrs
        .insert((POD_C, "10.0.0.5".parse().unwrap()), PodAddr::Unknown);
    let (less, more) = PodTables::default().diff(&PodTables::of(&l));
    dp.write_pods(&less).unwrap();
    dp.write_pods(&more).unwrap();

    let mut d = Desired::default();
    d.rulesets.insert(
        "e_a".into(),
        Ruleset {
            egress: true,
            ..Default::default()
        },
    );
    d.eg4.insert("10.0.0.2".parse().unwrap(), "e_a".into());
    let new = entries(&d, &mut RulesetIds::default());
    let diff = Diff::between(&Entries::default(), &new);
    let active = dp.active_slot().unwrap();
    dp.write(1 - active, &diff).unwrap();
    dp.flip(1 - active).unwrap();
    dp.barrier().wait().unwrap();
    dp.write(active, &diff).unwrap();
}

/// The mark layout 4's ingress program leaves on `frame` from `from`.
fn old_mark(old: &mut Dataplane, frame: &[u8], from: u32) -> u32 {
    let r = old.test_run(INGRESS, frame, 0, from).unwrap();
    assert_eq!(r.retval, OK);
    r.mark
}

fn index(mark: u32) -> u32 {
    (mark & MARK_LEGACY_INDEX) >> MARK_LEGACY_SHIFT
}

#[test]
fn an_older_layouts_sender_index_names_its_sender_and_never_opens_one() {
    // Layout 4 is the last to write a sender index; later layouts all read it this way.
    let layout_dir = format!("v{LAYOUT_VERSION}");
    own_netns();
    let bpffs = Path::new(BPFFS);
    let (node, root) = node("migrate-marks");
    let _sweep = Sweep(&root);

    let mut old = open_layout(bpffs, &node, 4);
    index_senders(
        &root.join("v4"),
        &[
            ("10.0.0.2", A_INDEX),
            ("10.0.0.4", B_INDEX),
            ("10.0.0.5", C_INDEX),
        ],
    );
    let mut new = Dataplane::open(bpffs, &node).expect("load this layout");
    let id = |v: u32, name: &str| {
        moat_enforcer_ebpf::sys::map_id(&root.join(format!("v{v}")).join(name)).unwrap()
    };
    assert_eq!(
        id(4, MapNames::LOCAL_ADDR),
        id(LAYOUT_VERSION, MapNames::LEGACY_LOCAL_ADDR),
        "the old sender indices are the new program's to read"
    );
    enforce(&mut new);
    let judge = |new: &mut Dataplane, frame: &[u8], mark: u32, from: u32| {
        new.test_run(EGRESS, frame, mark, from).unwrap().retval
    };

    let from_a = tcp4("10.0.0.2", "10.0.0.8", 1000);
    let mark = old_mark(&mut old, &from_a, POD_A);
    assert_eq!(index(mark), A_INDEX);
    assert!(is_finding(mark));
    // Read as a finding, pod A's index says "unknown pod, left open": believed only once
    // `PODS` says so for the source the egress program sees (`LEGACY_MARKS`, set while an
    // older layout is pinned), which it does not: A is judged, even before renumbering.
    assert_eq!(
        judge(&mut new, &from_a, mark, POD_A),
        SHOT,
        "before renumbering"
    );
    let from_b = tcp4("10.0.0.4", "10.0.0.8", 1000);
    let mark = old_mark(&mut old, &from_b, POD_B);
    assert_eq!(index(mark), B_INDEX);
    assert_eq!(judge(&mut new, &from_b, mark, POD_B), OK, "pod B is open");

    // Pod D's packets carry no index. Unless the links are moving, that names nobody.
    let from_d = tcp4("10.0.0.6", "10.0.0.8", 1000);
    let mark = old_mark(&mut old, &from_d, POD_D);
    assert_eq!(index(mark), 0);
    assert_eq!(judge(&mut new, &from_d, mark, POD_D), SHOT, "not migrating");
    // While they move, the source is checked where the new egress program sees it.
    legacy_marks_migrating(&root.join(&layout_dir), true).unwrap();
    assert_eq!(judge(&mut new, &from_d, mark, POD_D), OK, "pod D is open");
    let d_snat = tcp4("192.168.0.1", "10.0.0.8", 1001);
    assert_eq!(
        judge(&mut new, &d_snat, mark, POD_D),
        SHOT,
        "no index and SNAT: the sender is unknowable, dropped"
    );
    let stray = tcp4("10.0.0.66", "10.0.0.8", 1002);
    let mark = old_mark(&mut old, &stray, POD_D);
    assert_eq!(judge(&mut new, &stray, mark, POD_D), SHOT, "not pod D's");
    let remote = tcp4("10.0.1.5", "10.0.0.8", 1003);
    let mark = old_mark(&mut old, &remote, UPLINK);
    assert_eq!(judge(&mut new, &remote, mark, UPLINK), OK, "from elsewhere");
    let posing = tcp4("10.0.0.6", "10.0.0.8", 1004);
    let mark = old_mark(&mut old, &posing, UPLINK);
    assert_eq!(index(mark), 0);
    assert_eq!(
        judge(&mut new, &posing, mark, UPLINK),
        SHOT,
        "a local pod's address from elsewhere"
    );
    // Indexed on the uplink: a local sender's address from elsewhere too.
    let posing = tcp4("10.0.0.4", "10.0.0.8", 1005);
    let mark = old_mark(&mut old, &posing, UPLINK);
    assert_eq!(index(mark), B_INDEX);
    assert_eq!(judge(&mut new, &posing, mark, UPLINK), SHOT);

    assert_eq!(new.migrate(&PodInterfaces::Auto).unwrap(), Some(4));
    assert!(
        !root
            .join(&layout_dir)
            .join(MapNames::LEGACY_LOCAL_ADDR)
            .exists(),
        "the name goes with the old layout"
    );
    // A packet the old ingress program marks now (a straggler queued in the kernel, or on
    // an interface whose ingress link has not moved yet).
    let mark = old_mark(&mut old, &from_a, POD_A);
    assert!(
        index(mark) != A_INDEX && !is_finding(mark),
        "pod A renumbered to {}",
        index(mark)
    );
    let counters = |new: &Dataplane| new.counters();
    let before = counters(&new);
    assert_eq!(
        judge(&mut new, &from_a, mark, POD_A),
        SHOT,
        "pod A's egress rules"
    );
    let snat = tcp4("192.168.0.1", "10.0.0.8", 1001);
    assert_eq!(
        judge(&mut new, &snat, mark, POD_A),
        SHOT,
        "after SNAT too: the index names the sender, not the rewritten source"
    );
    // Pod B sending with pod A's address: the old program named A; A is not B's.
    let spoofed = tcp4("10.0.0.2", "10.0.0.8", 1002);
    let mark = old_mark(&mut old, &spoofed, POD_B);
    assert_eq!(judge(&mut new, &spoofed, mark, POD_B), SHOT, "spoofed");
    // Pod C, which the enforced version does not name yet (unknown pods denied).
    let from_c = tcp4("10.0.0.5", "10.0.0.8", 1003);
    let mark = old_mark(&mut old, &from_c, POD_C);
    assert_eq!(index(mark), C_INDEX);
    assert_eq!(judge(&mut new, &from_c, mark, POD_C), SHOT, "unknown pod");
    // A source the old program knew no index for, from a pod interface: the links have
    // moved, so no old program marks it any more; unclassified.
    let stranger = tcp4("10.0.0.77", "10.0.0.8", 1004);
    let mark = old_mark(&mut old, &stranger, POD_A);
    assert_eq!(index(mark), 0);
    assert_eq!(judge(&mut new, &stranger, mark, POD_A), SHOT, "no index");
    let after = counters(&new);
    let grew =
        |name: &str| after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0);
    assert_eq!(grew("denied"), 2, "{after:?}");
    assert_eq!(grew("spoofed_packets"), 1, "{after:?}");
    assert_eq!(grew("unknown_pod_packets"), 1, "{after:?}");
    assert_eq!(grew("unclassified_interface_packets"), 1, "{after:?}");
    // Pod B, not isolated, keeps its way.
    let mark = old_mark(&mut old, &from_b, POD_B);
    assert_eq!(judge(&mut new, &from_b, mark, POD_B), OK, "pod B");

    // Packets the kernel held across the renumbering (a fragment awaiting its datagram)
    // carry the old indices that spell findings; each is checked on its source.
    let old_index = |i: u32| i << MARK_LEGACY_SHIFT;
    let snat_a = tcp4("192.168.0.1", "10.0.0.8", 1100);
    assert_eq!(
        judge(&mut new, &from_a, old_index(81), POD_A),
        SHOT,
        "81: A judged"
    );
    assert_eq!(
        judge(&mut new, &snat_a, old_index(81), POD_A),
        SHOT,
        "81 after SNAT"
    );
    let snat_c = tcp4("192.168.0.1", "10.0.0.8", 1101);
    assert_eq!(
        judge(&mut new, &snat_c, old_index(81), POD_C),
        SHOT,
        "81 after SNAT from a pod with no known address: nobody to judge"
    );
    let b_as_a = tcp4("10.0.0.2", "10.0.0.8", 1102);
    assert_eq!(
        judge(&mut new, &b_as_a, old_index(65), POD_B),
        SHOT,
        "65: spoofed"
    );
    let from_b = tcp4("10.0.0.4", "10.0.0.8", 1103);
    assert_eq!(
        judge(&mut new, &from_b, old_index(65), POD_B),
        OK,
        "65: pod B"
    );
    let posing = tcp4("10.0.0.4", "10.0.0.8", 1104);
    assert_eq!(
        judge(&mut new, &posing, old_index(33), UPLINK),
        SHOT,
        "33: spoofed"
    );
    let remote = tcp4("10.0.1.5", "10.0.0.8", 1105);
    assert_eq!(
        judge(&mut new, &remote, old_index(33), UPLINK),
        OK,
        "33: remote"
    );
    // This layout's own findings, checked the same way, keep their meaning.
    let from_b = tcp4("10.0.0.4", "10.0.0.8", 1106);
    let r = new.test_run(INGRESS_POD, &from_b, 0, POD_B).unwrap();
    assert_eq!(
        judge(&mut new, &from_b, r.mark, POD_B),
        OK,
        "a finding of this layout"
    );
    let from_a = tcp4("10.0.0.2", "10.0.0.9", 1107);
    let r = new.test_run(INGRESS_POD, &from_a, 0, POD_A).unwrap();
    assert_eq!(
        judge(&mut new, &from_a, r.mark, POD_A),
        SHOT,
        "pod A isolated"
    );
}
