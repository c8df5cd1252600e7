//! An upgrade from the previous map layout, program by program in the kernel
//! (`BPF_PROG_TEST_RUN`): the old program keeps admitting flows until its links move, and the
//! new one must know every one of them at once. Needs root and BPF, as CI has.
//!
//! One test in its own binary: it points the loader at the committed layout-5 object through
//! the environment, which no other test may see, and enters a network namespace of its own
//! (the migration attaches to every interface; a new namespace has only loopback).

mod frames;
mod layouts;

use std::path::Path;

use frames::*;
use layouts::{BPFFS, Sweep, node, open_layout, own_netns};
use moat_dataplane::local::{LocalPods, PodInterfaces};
use moat_dataplane::plan::{Desired, Ruleset};
use moat_ebpf_common::{LAYOUT_VERSION, MARK_REPLY, MapNames, RULESET_NAMED};
use moat_enforcer_ebpf::dataplane::{Dataplane, EGRESS, INGRESS, INGRESS_POD};
use moat_enforcer_ebpf::entries::{Diff, Entries, RulesetIds, entries};
use moat_enforcer_ebpf::migrate::legacy_marks_migrating;
use moat_enforcer_ebpf::pods::PodTables;

const OK: u32 = 0;
const SHOT: u32 = 2;
/// `BPF_PROG_TEST_RUN` runs a tc program on loopback unless told of another device.
const OUT: u32 = 1;
/// Where the client's packets come from (any interface but "generated here", 0).
const FORWARDED: u32 = 7;

fn udp(sport: u16) -> Vec<u8> {
    V4::new("10.0.1.5", "10.0.0.1", UDP).frame(&ports(sport, 53))
}

fn reply(dport: u16) -> Vec<u8> {
    V4::new("10.0.0.1", "10.0.1.5", UDP).frame(&ports(53, dport))
}

/// A client's packet in on the uplink and out: the ingress program's finding, then the
/// egress program's verdict.
fn forward(dp: &mut Dataplane, sport: u16) -> u32 {
    let mark = dp
        .test_run(INGRESS, &udp(sport), 0, FORWARDED)
        .unwrap()
        .mark;
    dp.test_run(EGRESS, &udp(sport), mark, FORWARDED)
        .unwrap()
        .retval
}

fn is_reply(dp: &mut Dataplane, dport: u16) -> bool {
    let r = dp.test_run(INGRESS_POD, &reply(dport), 0, OUT).unwrap();
    r.mark & MARK_REPLY != 0
}

/// Layout 5's flow table is layout 6's: shared, not copied. A flow the old program admits
/// while the new one is already loaded (as on a node mid-upgrade, where some links run the
/// new program and the old one judges packets until its links move) is one the new program
/// finds at once; a copy would leave the reply to an egress-isolated pod's flow to meet a
/// table without it, and be denied as a new flow.
#[test]
fn the_previous_layouts_flows_are_the_new_programs_at_once() {
    assert_eq!(LAYOUT_VERSION, 6, "update the layout this test shares from");
    own_netns();
    let bpffs = Path::new(BPFFS);
    let (node, root) = node("migrate");
    let _sweep = Sweep(&root);

    let mut old = open_layout(bpffs, &node, 5);
    let mut l = LocalPods::default();
    l.other_ifaces.extend([OUT, FORWARDED]);
    let (less, more) = PodTables::default().diff(&PodTables::of(&l));
    old.write_pods(&less).unwrap();
    old.write_pods(&more).unwrap();
    // A pod's egress rules with a named port, as layout 5 holds them (no flag: its program
    // looked `NAMED` up for every egress new flow), in both slots.
    let mut d = Desired::default();
    let mut rs = Ruleset {
        egress: true,
        named_ports: true,
        ..Default::default()
    };
    rs.n4.insert(("10.0.0.9".parse().unwrap(), 6, 8080));
    d.rulesets.insert("e_named".into(), rs);
    d.eg4.insert("10.0.0.2".parse().unwrap(), "e_named".into());
    let diff = Diff::between(
        &Entries::default(),
        &entries(&d, &mut RulesetIds::default()),
    );
    for slot in [0, 1] {
        old.write(slot, &diff).unwrap();
    }
    let flagged = |dp: &Dataplane| {
        dp.read_slot(0)
            .endpoints
            .values()
            .all(|v| v & RULESET_NAMED != 0)
    };
    assert!(!flagged(&old), "layout 5 holds no flag");
    // Layout 5 with no rules for the sender admits every flow and remembers it.
    assert_eq!(forward(&mut old, 1000), OK);

    // A run of this layout that stopped while its loader pinned maps left a hash key of its
    // own (here: another node's, pinned under this one's directory).
    let stray = format!("migrate-stray-{}", std::process::id());
    let stray_root = bpffs.join("moat").join(&stray);
    let _sweep_stray = Sweep(&stray_root);
    drop(Dataplane::open(bpffs, &stray).unwrap());
    let pin =
        |n: &str, v: u32, map: &str| bpffs.join("moat").join(n).join(format!("v{v}")).join(map);
    std::fs::create_dir_all(root.join("v6")).unwrap();
    moat_enforcer_ebpf::sys::pin_again(
        &pin(&stray, 6, MapNames::FLOW_SEED),
        &pin(&node, 6, MapNames::FLOW_SEED),
    )
    .unwrap();

    let mut new = Dataplane::open(bpffs, &node).expect("load this layout");
    let id = |v: u32| {
        moat_enforcer_ebpf::sys::map_id(&root.join(format!("v{v}")).join(MapNames::FLOWS)).unwrap()
    };
    assert_eq!(id(5), id(6), "one flow table under both layouts");
    let seed =
        |v: u32| moat_enforcer_ebpf::sys::map_id(&pin(&node, v, MapNames::FLOW_SEED)).unwrap();
    assert_eq!(seed(5), seed(6), "and one hash key, the stray one replaced");
    assert!(is_reply(&mut new, 1000), "a flow from before the upgrade");
    // The old program, still running somewhere, admits another: known to the new at once.
    assert_eq!(forward(&mut old, 1001), OK);
    assert!(
        is_reply(&mut new, 1001),
        "a flow the old program admitted mid-upgrade"
    );
    assert!(!is_reply(&mut new, 1002), "a flow nobody admitted");

    let mode = PodInterfaces::Auto;
    assert_eq!(new.migrate(&mode).unwrap(), Some(5));
    drop(old);
    assert!(!root.join("v5").exists(), "the old layout's pins are gone");
    assert!(
        std::fs::read_dir(&root)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with("v5")),
        "nothing of it left"
    );
    assert!(is_reply(&mut new, 1000) && is_reply(&mut new, 1001));
    assert!(
        flagged(&new),
        "an endpoint whose ruleset has named entries looks them up"
    );
    assert_eq!(new.read_slot(0).named.values().collect::<Vec<_>>(), [&1]);
    assert!(
        !root.join("v6-copied").exists(),
        "the copy's marker goes with the old layout"
    );

    // A migration retried after its copy (it failed later, and versions of this layout
    // were written since) copies nothing again: old entries over the new ones would be
    // read under this binary's ruleset numbers, in the slot in force too.
    let retry = format!("migrate-retry-{}", std::process::id());
    let retry_root = bpffs.join("moat").join(&retry);
    let _sweep_retry = Sweep(&retry_root);
    let mut old = open_layout(bpffs, &retry, 5);
    for slot in [0, 1] {
        old.write(slot, &diff).unwrap();
    }
    std::fs::create_dir_all(retry_root.join("v6-copied")).unwrap();
    let mut again = Dataplane::open(bpffs, &retry).expect("load this layout");
    assert_eq!(again.migrate(&mode).unwrap(), Some(5));
    drop(old);
    assert!(
        again.read_slot(0).is_empty() && again.read_slot(1).is_empty(),
        "nothing copied on a retry"
    );
    assert!(!retry_root.join("v5").exists() && !retry_root.join("v6-copied").exists());
    drop(again);

    // A previous layout whose flow table has another shape than this one's (here: a hash
    // key where the table should be) is not taken over; the migration copies what it can.
    let odd = format!("migrate-odd-{}", std::process::id());
    let odd_root = bpffs.join("moat").join(&odd);
    let _sweep_odd = Sweep(&odd_root);
    std::fs::create_dir_all(odd_root.join("v5")).unwrap();
    moat_enforcer_ebpf::sys::pin_again(
        &pin(&stray, 6, MapNames::FLOW_SEED),
        &pin(&odd, 5, MapNames::FLOWS),
    )
    .unwrap();
    drop(Dataplane::open(bpffs, &odd).unwrap());
    let id = |v: u32| moat_enforcer_ebpf::sys::map_id(&pin(&odd, v, MapNames::FLOWS)).unwrap();
    assert_ne!(id(5), id(6), "a table of another shape is not shared");

    // A run stopped while deleting the migrated layout left half of it, marked: the next
    // run finishes the deletion instead of migrating from it.
    let half = format!("migrate-half-{}", std::process::id());
    let half_root = bpffs.join("moat").join(&half);
    let _sweep_half = Sweep(&half_root);
    std::fs::create_dir_all(half_root.join("v5")).unwrap();
    std::fs::create_dir_all(half_root.join("v5-gone")).unwrap();
    moat_enforcer_ebpf::sys::pin_again(
        &pin(&stray, 6, MapNames::FLOW_SEED),
        &pin(&half, 5, MapNames::FLOW_SEED),
    )
    .unwrap();
    let mut dp = Dataplane::open(bpffs, &half).unwrap();
    assert_eq!(dp.migrate(&mode).unwrap(), None);
    assert!(!half_root.join("v5").exists() && !half_root.join("v5-gone").exists());
    drop(dp);

    // From layout 3, whose flow table is a kernel hash this layout does not have: the new
    // program looks a flow up there too, until the migration has copied it. A flow the old
    // program admits after the new one loaded is a reply to the new one at once.
    let three = format!("migrate-three-{}", std::process::id());
    let three_root = bpffs.join("moat").join(&three);
    let _sweep_three = Sweep(&three_root);
    let mut old = open_layout(bpffs, &three, 3);
    let mut new = Dataplane::open(bpffs, &three).expect("load this layout");
    assert!(!is_reply(&mut new, 2000), "nothing admitted yet");
    let admit = |dp: &mut Dataplane, sport| {
        dp.test_run(EGRESS, &udp(sport), 0, FORWARDED)
            .unwrap()
            .retval
    };
    assert_eq!(admit(&mut old, 2000), OK);
    assert!(
        is_reply(&mut new, 2000),
        "a flow layout 3 admitted mid-upgrade"
    );
    // The egress links move first: meanwhile a flow this layout's egress program admits
    // goes into layout 3's table too, where its ingress program, still on its links, looks
    // the reply up. (Before the links move, a packet no program of this layout marked is
    // unclassified.)
    let mut l = LocalPods::default();
    l.other_ifaces.extend([OUT, FORWARDED]);
    let (less, more) = PodTables::default().diff(&PodTables::of(&l));
    new.write_pods(&less).unwrap();
    new.write_pods(&more).unwrap();
    assert_eq!(admit(&mut new, 2001), SHOT, "not migrating yet");
    legacy_marks_migrating(&three_root.join("v6"), true).unwrap();
    assert_eq!(admit(&mut new, 2002), OK);
    let old_knows = |old: &mut Dataplane, dport| {
        let r = old.test_run(INGRESS, &reply(dport), 0, OUT).unwrap();
        r.mark & MARK_REPLY != 0
    };
    assert!(
        old_knows(&mut old, 2002),
        "a flow the new egress program admitted mid-upgrade"
    );
    assert!(!old_knows(&mut old, 2001));
    assert_eq!(new.migrate(&mode).unwrap(), Some(3));
    drop(old);
    assert!(is_reply(&mut new, 2000), "copied into this layout's table");
    assert!(
        !three_root.join("v6").join(MapNames::LEGACY_CT).exists(),
        "the old table is let go"
    );
    // Emptied: a flow only it knew is no reply any more (none is: every one was copied).
    drop(new);
    let mut again = Dataplane::open(bpffs, &three).unwrap();
    assert!(is_reply(&mut again, 2000), "the copy outlives a restart");
}
