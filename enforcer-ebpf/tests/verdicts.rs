//! The datapath program's verdicts on crafted packets, run in the kernel through
//! `BPF_PROG_TEST_RUN` (no interfaces, no traffic). Needs root and BPF, as CI has.

mod frames;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use frames::*;
use moat_dataplane::plan::{Desired, Ruleset};
use moat_ebpf_common::{MARK_REPLY, MARK_SRC_MASK, MARK_SRC_SHIFT};
use moat_enforcer_ebpf::dataplane::{Dataplane, EGRESS, INGRESS};
use moat_enforcer_ebpf::entries::{Diff, Entries, RulesetIds, entries};

const OK: u32 = 0;
const SHOT: u32 = 2;
/// Any interface but "generated here" (0).
const FORWARDED: u32 = 7;

struct Bed {
    dp: Dataplane,
    root: PathBuf,
    current: Entries,
    ids: RulesetIds,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The tests' bpffs. Every node directory ends in its test process's pid; the first call
/// removes those of processes that are gone (a run killed before its cleanup), whose
/// preallocated flow tables would otherwise stay in kernel memory until a reboot.
fn bpffs() -> PathBuf {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    let fs = PathBuf::from("/run/moat-test/bpf");
    SWEPT.call_once(|| {
        for e in std::fs::read_dir(fs.join("moat"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let gone = name
                .rsplit_once('-')
                .and_then(|(_, pid)| pid.parse::<u32>().ok())
                .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists());
            if gone {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    });
    fs
}

impl Bed {
    fn new(name: &str) -> Bed {
        let node = format!("verdicts-{name}-{}", std::process::id());
        let root = bpffs().join("moat").join(&node);
        let _ = std::fs::remove_dir_all(&root);
        let dp = Dataplane::open(&bpffs(), &node).expect("load the datapath (root and BPF needed)");
        Bed {
            dp,
            root,
            current: Entries::default(),
            ids: RulesetIds::default(),
        }
    }

    /// Installs `d` the way the backend does: standby, flip, wait out readers, replay.
    fn install(&mut self, d: &Desired) {
        let new = entries(d, &mut self.ids);
        new.check_capacity().unwrap();
        let active = self.dp.active_slot().unwrap();
        let diff = Diff::between(&self.current, &new);
        self.dp.assign_local(&new.local).unwrap();
        self.dp.write(1 - active, &diff).unwrap();
        self.dp.flip(1 - active).unwrap();
        self.dp.barrier().wait().unwrap();
        self.dp.write(active, &diff).unwrap();
        let stale = self.dp.assign_local(&new.local).unwrap();
        self.dp.release_local(&stale).unwrap();
        assert_eq!(self.dp.read_slot(0), new);
        assert_eq!(self.dp.read_slot(1), new);
        self.current = new;
    }

    fn egress(&mut self, frame: &[u8]) -> u32 {
        self.dp
            .test_run(EGRESS, frame, 0, FORWARDED)
            .unwrap()
            .retval
    }

    fn egress_marked(&mut self, frame: &[u8], mark: u32, ifindex: u32) -> u32 {
        self.dp
            .test_run(EGRESS, frame, mark, ifindex)
            .unwrap()
            .retval
    }

    /// The mark the ingress program leaves (it never drops).
    fn ingress(&mut self, frame: &[u8]) -> u32 {
        let r = self.dp.test_run(INGRESS, frame, 0, FORWARDED).unwrap();
        assert_eq!(r.retval, OK, "the ingress program never drops");
        r.mark
    }
}

/// Local pods: 10.0.0.1 / fd00::1 isolated for ingress (TCP 80 from 10.0.1.0/24 and
/// fd00:1::/64; UDP 53–60 from anyone; everything from 10.0.2.0/24), 10.0.0.2 isolated for
/// egress (anything to 10.0.0.9; TCP 8080 to 10.0.0.10 as a named port).
fn policy() -> Desired {
    let mut d = Desired::default();
    d.class4.insert(
        (Ipv4Addr::new(10, 0, 1, 0), Ipv4Addr::new(10, 0, 1, 255)),
        1,
    );
    d.class4.insert(
        (Ipv4Addr::new(10, 0, 2, 0), Ipv4Addr::new(10, 0, 2, 255)),
        4,
    );
    d.class6.insert(
        (
            "fd00:1::".parse().unwrap(),
            "fd00:1::ffff:ffff:ffff:ffff".parse().unwrap(),
        ),
        1,
    );
    d.addr4.insert(Ipv4Addr::new(10, 0, 0, 9), 2);
    let mut ing = Ruleset::default();
    ing.gx.insert((1, TCP, 80));
    ing.ap.insert((UDP, 53, 60));
    ing.aa.insert(4);
    let mut eg = Ruleset {
        egress: true,
        ..Default::default()
    };
    eg.aa.insert(2);
    eg.n4.insert((Ipv4Addr::new(10, 0, 0, 10), TCP, 8080));
    d.rulesets.insert("i_a".into(), ing);
    d.rulesets.insert("e_b".into(), eg);
    d.ing4.insert(Ipv4Addr::new(10, 0, 0, 1), "i_a".into());
    d.ing6
        .insert("fd00::1".parse::<Ipv6Addr>().unwrap(), "i_a".into());
    d.eg4.insert(Ipv4Addr::new(10, 0, 0, 2), "e_b".into());
    d
}

fn tcp4(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    V4::new(src, dst, TCP).frame(&ports(sport, dport))
}

#[test]
fn ports_peers_and_protocols() {
    let mut b = Bed::new("ports");
    b.install(&policy());
    assert_eq!(b.egress(&tcp4("10.0.1.5", "10.0.0.1", 1000, 80)), OK);
    assert_eq!(b.egress(&tcp4("10.0.1.5", "10.0.0.1", 1000, 81)), SHOT);
    assert_eq!(
        b.egress(&tcp4("10.0.3.5", "10.0.0.1", 1000, 80)),
        SHOT,
        "peer in no group"
    );
    let udp = |dport| V4::new("8.8.8.8", "10.0.0.1", UDP).frame(&ports(1, dport));
    assert_eq!(b.egress(&udp(53)), OK);
    assert_eq!(b.egress(&udp(60)), OK);
    assert_eq!(b.egress(&udp(61)), SHOT);
    let sctp = V4::new("10.0.1.5", "10.0.0.1", SCTP).frame(&ports(5, 80));
    assert_eq!(b.egress(&sctp), SHOT, "the TCP rule does not open SCTP");
    // A rule without ports opens every protocol, ICMP and unknown ones included.
    let echo = V4::new("10.0.2.3", "10.0.0.1", ICMP).frame(&icmp(8, 0, 9));
    assert_eq!(b.egress(&echo), OK);
    let echo = V4::new("10.0.1.3", "10.0.0.1", ICMP).frame(&icmp(8, 0, 9));
    assert_eq!(b.egress(&echo), SHOT, "a ported rule does not open ICMP");
    let gre = V4::new("10.0.2.3", "10.0.0.1", 47).frame(&[0; 8]);
    assert_eq!(b.egress(&gre), OK);
    let gre = V4::new("10.0.1.3", "10.0.0.1", 47).frame(&[0; 8]);
    assert_eq!(b.egress(&gre), SHOT);
    // Not isolated: anything goes.
    assert_eq!(b.egress(&tcp4("10.9.9.9", "10.0.0.3", 1, 1)), OK);
}

#[test]
fn egress_rules_named_ports_and_the_original_source() {
    let mut b = Bed::new("egress");
    b.install(&policy());
    assert_eq!(b.egress(&tcp4("10.0.0.2", "10.0.0.9", 1000, 1)), OK);
    assert_eq!(b.egress(&tcp4("10.0.0.2", "10.0.0.8", 1000, 1)), SHOT);
    assert_eq!(
        b.egress(&tcp4("10.0.0.2", "10.0.0.10", 1000, 8080)),
        OK,
        "named port"
    );
    assert_eq!(b.egress(&tcp4("10.0.0.2", "10.0.0.10", 1000, 8081)), SHOT);
    // The ingress program names the sender in the mark; after SNAT (source rewritten to
    // the node) the egress program still judges the pod's egress rules.
    let mark = b.ingress(&tcp4("10.0.0.2", "10.0.0.8", 1000, 1));
    assert_ne!(mark & MARK_SRC_MASK, 0);
    let snat = tcp4("192.168.0.1", "10.0.0.8", 1000, 1);
    assert_eq!(b.egress_marked(&snat, mark, FORWARDED), SHOT);
    assert_eq!(
        b.egress(&snat),
        OK,
        "without the mark it would pass as node traffic"
    );
    let other = b.ingress(&tcp4("10.0.0.3", "10.0.0.8", 1000, 1));
    assert_eq!(
        other >> MARK_SRC_SHIFT & 0xff,
        0,
        "no index for unisolated pods"
    );
}

#[test]
fn node_traffic_arp_nd_and_link_local_pass() {
    let mut b = Bed::new("node");
    b.install(&policy());
    let denied = tcp4("10.0.3.5", "10.0.0.1", 1000, 81);
    assert_eq!(b.egress(&denied), SHOT);
    assert_eq!(b.egress_marked(&denied, 0, 0), OK, "generated on the node");
    assert_eq!(b.egress(&arp()), OK);
    let ns = v6("fd00:9::1", "fd00::1", &[], ICMPV6, &icmp(135, 0, 0));
    assert_eq!(b.egress(&ns), OK);
    let ll = v6("fe80::1", "fd00::1", &[], TCP, &ports(1, 81));
    assert_eq!(b.egress(&ll), OK);
    let ll4 = tcp4("169.254.1.1", "10.0.0.1", 1, 81);
    assert_eq!(b.egress(&ll4), OK);
}

#[test]
fn replies_and_icmp_errors_of_allowed_flows() {
    let mut b = Bed::new("replies");
    b.install(&policy());
    let reply = tcp4("10.0.0.1", "10.0.1.5", 80, 1000);
    assert_eq!(b.ingress(&reply) & MARK_REPLY, 0, "no flow yet");
    assert_eq!(b.egress(&tcp4("10.0.1.5", "10.0.0.1", 1000, 80)), OK);
    let mark = b.ingress(&reply);
    assert_ne!(mark & MARK_REPLY, 0);
    assert_eq!(
        b.egress_marked(&tcp4("10.0.0.1", "10.0.1.5", 80, 1000), mark, FORWARDED),
        OK
    );
    // Later packets of the flow: remembered.
    assert_eq!(b.egress(&tcp4("10.0.1.5", "10.0.0.1", 1000, 80)), OK);

    // An ICMP error about the allowed flow, coming back to its client.
    let quoted = V4::new("10.0.1.5", "10.0.0.1", TCP);
    let mut q = quoted.header(8);
    q.extend(&ports(1000, 80)[..8]);
    let err = V4::new("10.0.0.1", "10.0.1.5", ICMP).frame(&icmp_error(3, 3, &q));
    assert_ne!(b.ingress(&err) & MARK_REPLY, 0);
    // About a flow never allowed: not related; judged as ICMP on its own and refused.
    let stranger = V4::new("10.0.1.5", "10.0.0.1", TCP);
    let mut q = stranger.header(8);
    q.extend(&ports(2000, 81)[..8]);
    let err = V4::new("10.0.1.6", "10.0.0.1", ICMP).frame(&icmp_error(3, 3, &q));
    assert_eq!(b.ingress(&err) & MARK_REPLY, 0);
    assert_eq!(b.egress(&err), SHOT);
    // A truncated quote is no relation either.
    let err = V4::new("10.0.1.6", "10.0.0.1", ICMP).frame(&icmp_error(3, 3, &q[..12]));
    assert_eq!(b.ingress(&err) & MARK_REPLY, 0);
}

#[test]
fn fragments_follow_the_first() {
    let mut b = Bed::new("frags");
    b.install(&policy());
    let first = |id, dport| {
        let mut h = V4::new("10.0.1.5", "10.0.0.1", TCP);
        h.id = id;
        h.more_fragments = true;
        h.frame(&ports(1000, dport))
    };
    let later = |id| {
        let mut h = V4::new("10.0.1.5", "10.0.0.1", TCP);
        h.id = id;
        h.frag_offset = 3;
        h.frame(&[0; 16])
    };
    assert_eq!(b.egress(&later(7)), SHOT, "no first fragment seen");
    assert_eq!(b.egress(&first(7, 80)), OK);
    assert_eq!(b.egress(&later(7)), OK);
    assert_eq!(b.egress(&first(8, 81)), SHOT);
    assert_eq!(b.egress(&later(8)), SHOT);

    let f6 = |id, offset, more, dport: u16| {
        let payload = if offset == 0 {
            ports(1000, dport)
        } else {
            vec![0; 16]
        };
        v6(
            "fd00:1::5",
            "fd00::1",
            &[(44, frag6(id, offset, more))],
            TCP,
            &payload,
        )
    };
    assert_eq!(b.egress(&f6(99, 0, true, 80)), OK);
    assert_eq!(b.egress(&f6(99, 5, false, 0)), OK);
    assert_eq!(b.egress(&f6(100, 0, true, 81)), SHOT);
    assert_eq!(b.egress(&f6(100, 5, false, 0)), SHOT);
}

#[test]
fn ipv6_extension_headers_and_truncation() {
    let mut b = Bed::new("ext");
    b.install(&policy());
    let with_ext = |dport| {
        v6(
            "fd00:1::5",
            "fd00::1",
            &[(0, opts()), (60, opts())],
            TCP,
            &ports(1000, dport),
        )
    };
    assert_eq!(b.egress(&with_ext(80)), OK);
    assert_eq!(b.egress(&with_ext(81)), SHOT);
    let too_many: Vec<(u8, Vec<u8>)> = (0..9).map(|_| (60, opts())).collect();
    let long = v6("fd00:1::5", "fd00::1", &too_many, TCP, &ports(1000, 80));
    assert_eq!(
        b.egress(&long),
        SHOT,
        "a chain longer than we walk is refused"
    );
    // The IPv4 header promises TCP, the frame ends before its ports.
    let mut cut = tcp4("10.0.1.5", "10.0.0.1", 1000, 80);
    cut.truncate(14 + 20 + 2);
    assert_eq!(b.egress(&cut), SHOT);
    // Unknown to an unisolated destination stays allowed even when truncated? No: a packet
    // the program cannot read is refused whatever its destination.
    let mut cut = tcp4("10.0.1.5", "10.0.0.3", 1000, 80);
    cut.truncate(14 + 20 + 2);
    assert_eq!(b.egress(&cut), SHOT);
}

#[test]
fn a_new_version_replaces_the_old_whole() {
    let mut b = Bed::new("versions");
    let mut d = policy();
    b.install(&d);
    assert_eq!(b.egress(&tcp4("10.0.1.5", "10.0.0.1", 1000, 80)), OK);
    d.rulesets.get_mut("i_a").unwrap().gx.clear();
    d.rulesets.get_mut("i_a").unwrap().gx.insert((1, TCP, 443));
    b.install(&d);
    assert_eq!(b.egress(&tcp4("10.0.1.5", "10.0.0.1", 1001, 80)), SHOT);
    assert_eq!(b.egress(&tcp4("10.0.1.5", "10.0.0.1", 1001, 443)), OK);
    // The flow allowed under the first version stays established.
    assert_eq!(b.egress(&tcp4("10.0.1.5", "10.0.0.1", 1000, 80)), OK);
    b.install(&Desired::default());
    assert_eq!(
        b.egress(&tcp4("10.0.1.5", "10.0.0.1", 1002, 81)),
        OK,
        "nothing isolated"
    );
    assert!(b.dp.read_slot(0).is_empty() && b.dp.read_slot(1).is_empty());
}

#[test]
fn a_syn_on_a_remembered_tuple_is_judged_again() {
    let mut b = Bed::new("syn");
    let mut d = policy();
    b.install(&d);
    let syn4 = V4::new("10.0.1.5", "10.0.0.1", TCP).frame(&syn(1000, 80));
    assert_eq!(b.egress(&syn4), OK);
    d.rulesets.get_mut("i_a").unwrap().gx.clear();
    b.install(&d);
    assert_eq!(
        b.egress(&tcp4("10.0.1.5", "10.0.0.1", 1000, 80)),
        OK,
        "the open connection"
    );
    assert_eq!(b.egress(&syn4), SHOT, "a new connection on the same ports");
    let reply = tcp4("10.0.0.1", "10.0.1.5", 80, 1000);
    let mut syn_back = reply.clone();
    syn_back[14 + 20 + 13] = 0x02;
    assert_ne!(b.ingress(&reply) & MARK_REPLY, 0);
    assert_eq!(b.ingress(&syn_back) & MARK_REPLY, 0, "a SYN never answers");
}

#[test]
fn clearing_the_unused_slot_leaves_the_version_in_force() {
    let mut b = Bed::new("clear");
    b.install(&policy());
    let active = b.dp.active_slot().unwrap();
    b.dp.clear(1 - active).unwrap();
    let cleared = b.dp.read_slot(1 - active);
    assert!(cleared.endpoints.is_empty() && cleared.ports.is_empty() && cleared.ranges.is_empty());
    assert_eq!(b.dp.read_slot(active), b.current);
    assert_eq!(b.egress(&tcp4("10.0.1.5", "10.0.0.1", 1000, 80)), OK);
    assert_eq!(b.egress(&tcp4("10.0.1.5", "10.0.0.1", 1000, 81)), SHOT);
}

/// The backend itself through random clusters' versions, full and delta (in-place patches
/// included): once each replay has settled, both slots hold exactly what it installed.
#[test]
fn the_backend_leaves_both_slots_equal_to_each_version() {
    use moat_dataplane::Backend;
    use moat_enforcer_ebpf::EbpfBackend;
    use moat_policy::Index;
    use moat_policy::ir::delta;
    use moat_policy::testkit::parse_all;
    use moat_policy::testkit::random::{Features, World};
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    let node = format!("backend-slots-{}", std::process::id());
    let root = bpffs().join("moat").join(&node);
    let _ = std::fs::remove_dir_all(&root);
    let mut b = EbpfBackend::open(bpffs(), &node, Default::default()).unwrap();
    b.adopt(None, &moat_dataplane::LocalPods::default())
        .unwrap();
    // Single ports are written to the exact-match map (both slots), the rest to the trie.
    use aya::maps::{HashMap, LpmTrie, Map, MapData};
    use moat_ebpf_common::{MapNames, PORT_FULL_BITS, PortKey};
    let dir = b.dataplane().map_dir().to_path_buf();
    let pin = |name| MapData::from_pin(dir.join(name)).unwrap();
    let exact: HashMap<MapData, PortKey, u8> =
        HashMap::try_from(Map::HashMap(pin(MapNames::PORT_EXACT))).unwrap();
    let trie: LpmTrie<MapData, PortKey, u8> =
        LpmTrie::try_from(Map::LpmTrie(pin(MapNames::PORTS))).unwrap();
    let (mut nonempty, mut singles_seen) = (0, 0);
    let mut f = Features::default();
    let mut rng = SmallRng::seed_from_u64(0x51075);
    // Several small worlds, each on its busiest node (a node with no policy would have both
    // slots equal because both are empty).
    for world_no in 0..8 {
        let mut world = World::generate(&mut rng, &mut f);
        let index = Index::build(parse_all(&world.objects()));
        let busiest = index.snapshots().into_iter().max_by_key(|s| s.rules.len());
        let name = busiest.expect("a node").node;
        let snap = |w: &World| Index::build(parse_all(&w.objects())).snapshot(&name);
        let mut old = snap(&world).unwrap();
        b.apply_full(&old, &moat_dataplane::LocalPods::default())
            .unwrap();
        for step in 0..15 {
            world.mutate(&mut rng, &mut f, false);
            let Some(new) = snap(&world) else {
                break;
            };
            b.apply_delta(
                &old,
                &delta::diff(&old, &new),
                &new,
                &moat_dataplane::LocalPods::default(),
            )
            .unwrap();
            b.settle();
            let at = format!("world {world_no}, step {step}");
            let installed = b.installed().clone();
            assert_eq!(b.dataplane().read_slot(0), installed, "{at}");
            assert_eq!(b.dataplane().read_slot(1), installed, "{at}");
            let singles = installed.ports.iter();
            let singles = singles.filter(|(len, _)| *len == PORT_FULL_BITS).count();
            assert_eq!(exact.keys().count(), 2 * singles, "{at}");
            let short = |k: Result<aya::maps::lpm_trie::Key<PortKey>, _>| {
                k.unwrap().prefix_len() < PORT_FULL_BITS
            };
            assert!(trie.keys().all(short), "{at}");
            nonempty += usize::from(!installed.is_empty());
            singles_seen += singles;
            old = new;
        }
    }
    assert!(nonempty >= 20, "only {nonempty} versions held entries");
    assert!(singles_seen > 0, "no version had a single-port rule");
    b.remove_all().unwrap();
}

/// The flows' clock stands still while no enforcer runs. A restart must neither age the
/// flows used meanwhile by that time (their replies would be judged as new flows and
/// dropped) nor keep a flow that was idle before.
#[test]
fn flows_used_while_the_clock_stood_still_stay_and_idle_ones_go() {
    use aya::maps::{Array, MapData};
    use moat_ebpf_common::{FlowKey, MapNames, OTHER_IDLE_NS};
    use moat_enforcer_ebpf::flows::{FlowTable, coarse_now};

    let mut b = Bed::new("clock");
    b.install(&policy());
    let dir = b.dp.map_dir().to_path_buf();
    let clock = || -> Array<MapData, u64> {
        let m = MapData::from_pin(dir.join(MapNames::CLOCK)).unwrap();
        Array::try_from(aya::maps::Map::Array(m)).unwrap()
    };
    let udp = |sport| V4::new("10.0.1.5", "10.0.0.1", UDP).frame(&ports(sport, 53));
    let reply = |dport| V4::new("10.0.0.1", "10.0.1.5", UDP).frame(&ports(53, dport));

    // The last enforcer stopped 200 s ago. Flow 1001 was last used 130 s before that;
    // flow 1000 was used after it stopped, so the program stamped it with the standing
    // clock.
    let stood = coarse_now() - 200_000_000_000;
    clock().set(0, stood - 130_000_000_000, 0).unwrap();
    assert_eq!(b.egress(&udp(1001)), OK);
    clock().set(0, stood, 0).unwrap();
    assert_eq!(b.egress(&udp(1000)), OK);
    assert_ne!(b.ingress(&reply(1000)) & MARK_REPLY, 0);

    // The restart: this run's program and clock.
    let node = b.root.file_name().unwrap().to_str().unwrap().to_string();
    let mut again = Dataplane::open(&bpffs(), &node).unwrap();
    let now = clock().get(&0, 0).unwrap();
    assert!(now >= stood + 200_000_000_000, "the clock runs again");
    let r = again.test_run(INGRESS, &reply(1000), 0, FORWARDED).unwrap();
    assert_ne!(r.mark & MARK_REPLY, 0, "the flow used meanwhile is alive");
    let r = again.test_run(INGRESS, &reply(1001), 0, FORWARDED).unwrap();
    assert_eq!(r.mark & MARK_REPLY, 0, "the flow idle before is not");

    // User space finds the flows where the program put them: the one used meanwhile seen
    // just now, the idle one where it was left.
    let table = FlowTable::open(&dir)
        .unwrap()
        .expect("this layout's flow table");
    let key = |sport| {
        let mut k = FlowKey {
            family: 4,
            proto: 17,
            _pad: [0; 2],
            sport,
            dport: 53,
            saddr: [0; 16],
            daddr: [0; 16],
        };
        k.saddr[..4].copy_from_slice(&[10, 0, 1, 5]);
        k.daddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        k
    };
    assert_eq!(table.get(&key(1000)), Some(now));
    let idle = table
        .get(&key(1001))
        .expect("idle flows stay until their slot is taken");
    assert!(now - idle > OTHER_IDLE_NS);
    // And the program finds a flow user space put in (as a migration does).
    assert!(table.remember(&key(1002), now, now));
    let r = again.test_run(INGRESS, &reply(1002), 0, FORWARDED).unwrap();
    assert_ne!(
        r.mark & MARK_REPLY,
        0,
        "a flow placed by user space is found"
    );
    assert!(table.flows().iter().any(|(k, _)| *k == key(1002)));
}
