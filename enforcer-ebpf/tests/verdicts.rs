//! The datapath program's verdicts on crafted packets, run in the kernel through
//! `BPF_PROG_TEST_RUN` (no interfaces, no traffic). Needs root and BPF, as CI has.

mod frames;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use frames::*;
use moat_dataplane::local::{LocalPods, PodAddr, PodInterfaces, UnknownPods};
use moat_dataplane::plan::{Desired, Ruleset};
use moat_ebpf_common::{
    MARK_FROM_POD, MARK_LEGACY_SHIFT, MARK_OPEN, MARK_REPLY, MARK_SPOOFED, MARK_UNKNOWN, is_finding,
};
use moat_enforcer_ebpf::dataplane::{Dataplane, EGRESS, EGRESS_POD, INGRESS, INGRESS_POD};
use moat_enforcer_ebpf::entries::{Diff, Entries, RulesetIds, entries};
use moat_enforcer_ebpf::pods::PodTables;
use moat_policy::ir::EndpointId;

const OK: u32 = 0;
const SHOT: u32 = 2;
/// The uplink: remote senders arrive here (any interface but "generated here", 0).
const FORWARDED: u32 = 7;
/// `BPF_PROG_TEST_RUN` runs a tc program on loopback (`skb->ifindex` 1) unless told of an
/// existing device: the egress interface of every test packet, classified per test.
const OUT: u32 = 1;
/// Pod interfaces of senders.
const POD_A: u32 = 5;
const POD_B: u32 = 6;

struct Bed {
    dp: Dataplane,
    root: PathBuf,
    current: Entries,
    ids: RulesetIds,
    local: LocalPods,
    pods: PodTables,
}

/// The node's pods for most tests: the uplink (7), the receivers' interface (`OUT`, holding
/// 10.0.0.1, 10.0.0.3 and fd00::1), pod A (10.0.0.2) and pod B (10.0.0.4), all known.
fn node_pods() -> LocalPods {
    let mut l = LocalPods::default();
    l.other_ifaces.insert(FORWARDED);
    for (i, a) in [
        (OUT, "10.0.0.1"),
        (OUT, "10.0.0.3"),
        (OUT, "fd00::1"),
        (POD_A, "10.0.0.2"),
        (POD_B, "10.0.0.4"),
    ] {
        known(&mut l, i, a);
    }
    l
}

fn known(l: &mut LocalPods, iface: u32, a: &str) {
    l.pod_ifaces.insert(iface);
    let id = EndpointId((u64::from(iface) << 32) | l.addrs.len() as u64);
    l.addrs
        .insert((iface, a.parse().unwrap()), PodAddr::Known(id));
}

fn unknown(l: &mut LocalPods, iface: u32, a: &str) {
    l.pod_ifaces.insert(iface);
    l.addrs
        .insert((iface, a.parse().unwrap()), PodAddr::Unknown);
}

/// `OUT` as an uplink instead (the packets' receivers are remote).
fn out_is_uplink(l: &mut LocalPods) {
    l.pod_ifaces.remove(&OUT);
    l.addrs.retain(|(i, _), _| *i != OUT);
    l.other_ifaces.insert(OUT);
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
        let mut b = Bed {
            dp,
            root,
            current: Entries::default(),
            ids: RulesetIds::default(),
            local: LocalPods::default(),
            pods: PodTables::default(),
        };
        b.set_local(node_pods());
        b
    }

    /// Writes the local pod maps the way the backend does between versions.
    fn set_local(&mut self, l: LocalPods) {
        let new = PodTables::of(&l);
        let (less, more) = self.pods.diff(&new);
        self.dp.write_pods(&less).unwrap();
        self.dp.write_pods(&more).unwrap();
        assert_eq!(self.dp.read_pods(), new);
        self.pods = new;
        self.local = l;
    }

    fn edit_local(&mut self, f: impl FnOnce(&mut LocalPods)) {
        let mut l = self.local.clone();
        f(&mut l);
        self.set_local(l);
    }

    /// The mark the ingress program of interface `from`'s kind leaves (it never drops).
    fn ingress_on(&mut self, frame: &[u8], from: u32) -> u32 {
        let prog = if self.local.pod_ifaces.contains(&from) {
            INGRESS_POD
        } else {
            INGRESS
        };
        let r = self.dp.test_run(prog, frame, 0, from).unwrap();
        assert_eq!(r.retval, OK, "the ingress program never drops");
        r.mark
    }

    /// A packet's way through the node: in on `from` (the ingress program of its kind),
    /// out on `OUT` (the egress program of `OUT`'s kind).
    fn forward(&mut self, frame: &[u8], from: u32) -> u32 {
        let mark = self.ingress_on(frame, from);
        self.egress_marked(frame, mark, from)
    }

    fn counter(&self, name: &str) -> u64 {
        self.dp.counters().get(name).copied().unwrap_or(0)
    }

    /// Installs `d` the way the backend does: standby, flip, wait out readers, replay.
    fn install(&mut self, d: &Desired) {
        let new = entries(d, &mut self.ids);
        new.check_capacity().unwrap();
        let active = self.dp.active_slot().unwrap();
        let diff = Diff::between(&self.current, &new);
        self.dp.write(1 - active, &diff).unwrap();
        self.dp.flip(1 - active).unwrap();
        self.dp.barrier().wait().unwrap();
        self.dp.write(active, &diff).unwrap();
        assert_eq!(self.dp.read_slot(0), new);
        assert_eq!(self.dp.read_slot(1), new);
        self.current = new;
    }

    /// From a remote sender through the uplink.
    fn egress(&mut self, frame: &[u8]) -> u32 {
        self.forward(frame, FORWARDED)
    }

    /// The egress program of `OUT`'s kind on a packet that entered on `ifindex` with `mark`.
    fn egress_marked(&mut self, frame: &[u8], mark: u32, ifindex: u32) -> u32 {
        let prog = if self.local.pod_ifaces.contains(&OUT) {
            EGRESS_POD
        } else {
            EGRESS
        };
        self.dp.test_run(prog, frame, mark, ifindex).unwrap().retval
    }

    /// The mark the uplink's ingress program leaves.
    fn ingress(&mut self, frame: &[u8]) -> u32 {
        self.ingress_on(frame, FORWARDED)
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
        named_ports: true,
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
fn egress_rules_named_ports_and_the_sender_named_by_its_interface() {
    let mut b = Bed::new("egress");
    b.edit_local(out_is_uplink);
    b.install(&policy());
    let from_a = |b: &mut Bed, f: &[u8]| b.forward(f, POD_A);
    assert_eq!(from_a(&mut b, &tcp4("10.0.0.2", "10.0.0.9", 1000, 1)), OK);
    assert_eq!(from_a(&mut b, &tcp4("10.0.0.2", "10.0.0.8", 1000, 1)), SHOT);
    assert_eq!(
        from_a(&mut b, &tcp4("10.0.0.2", "10.0.0.10", 1000, 8080)),
        OK,
        "named port"
    );
    assert_eq!(
        from_a(&mut b, &tcp4("10.0.0.2", "10.0.0.10", 1000, 8081)),
        SHOT
    );
    // After SNAT (source rewritten to the node) the egress program still judges the pod's
    // egress rules: the sender is named by the interface the packet came in on.
    let mark = b.ingress_on(&tcp4("10.0.0.2", "10.0.0.8", 1000, 1), POD_A);
    let snat = tcp4("192.168.0.1", "10.0.0.8", 1000, 1);
    assert_eq!(b.egress_marked(&snat, mark, POD_A), SHOT);
    let snat_ok = tcp4("192.168.0.1", "10.0.0.9", 1001, 1);
    assert_eq!(b.egress_marked(&snat_ok, mark, POD_A), OK);
    assert_eq!(
        b.egress_marked(&snat, 0, 0),
        OK,
        "generated on the node: not judged"
    );
    // Pod B is not isolated.
    assert_eq!(b.forward(&tcp4("10.0.0.4", "10.0.0.8", 1000, 1), POD_B), OK);
}

#[test]
fn node_traffic_arp_nd_and_ipv6_link_local_pass() {
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
    // Linux forwards IPv4 link-local sources: judged like any other source.
    let ll4 = tcp4("169.254.1.1", "10.0.0.1", 1, 81);
    assert_eq!(b.egress(&ll4), SHOT);
    let ll4 = V4::new("169.254.1.1", "10.0.0.1", UDP).frame(&ports(1, 53));
    assert_eq!(b.egress(&ll4), OK, "what the rules allow");
}

#[test]
fn replies_and_icmp_errors_of_allowed_flows() {
    let mut b = Bed::new("replies");
    b.install(&policy());
    let reply = tcp4("10.0.0.1", "10.0.1.5", 80, 1000);
    assert_eq!(b.ingress(&reply) & MARK_REPLY, 0, "no flow yet");
    assert_eq!(b.egress(&tcp4("10.0.1.5", "10.0.0.1", 1000, 80)), OK);
    // The reply comes from the pod's interface.
    let mark = b.ingress_on(&reply, OUT);
    assert_ne!(mark & MARK_REPLY, 0);
    assert_eq!(b.egress_marked(&reply, mark, OUT), OK);
    // Later packets of the flow: remembered.
    assert_eq!(b.egress(&tcp4("10.0.1.5", "10.0.0.1", 1000, 80)), OK);

    // An ICMP error about the allowed flow, coming back to its client.
    let quoted = V4::new("10.0.1.5", "10.0.0.1", TCP);
    let mut q = quoted.header(8);
    q.extend(&ports(1000, 80)[..8]);
    let err = V4::new("10.0.0.1", "10.0.1.5", ICMP).frame(&icmp_error(3, 3, &q));
    assert_ne!(b.ingress_on(&err, OUT) & MARK_REPLY, 0);
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
    let err = V4::new("10.0.0.1", "10.0.1.5", ICMP).frame(&icmp_error(3, 3, &q[..12]));
    assert_eq!(b.ingress_on(&err, OUT) & MARK_REPLY, 0);
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
    assert_ne!(b.ingress_on(&reply, OUT) & MARK_REPLY, 0);
    assert_eq!(
        b.ingress_on(&syn_back, OUT) & MARK_REPLY,
        0,
        "a SYN never answers"
    );
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

    // A private network namespace for this test's thread (and the attacher it starts):
    // `adopt` attaches to every interface, and this layout's programs drop forwarded packets
    // through interfaces no local pod table classified.
    // SAFETY: affects the calling thread only.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
    let node = format!("backend-slots-{}", std::process::id());
    let root = bpffs().join("moat").join(&node);
    let _ = std::fs::remove_dir_all(&root);
    let mut b = EbpfBackend::open(bpffs(), &node, PodInterfaces::Auto, Default::default()).unwrap();
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
            let singles = installed.ports.keys();
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
    assert_ne!(b.ingress_on(&reply(1000), OUT) & MARK_REPLY, 0);

    // The restart: this run's program and clock.
    let node = b.root.file_name().unwrap().to_str().unwrap().to_string();
    let mut again = Dataplane::open(&bpffs(), &node).unwrap();
    let now = clock().get(&0, 0).unwrap();
    assert!(now >= stood + 200_000_000_000, "the clock runs again");
    let r = again.test_run(INGRESS_POD, &reply(1000), 0, OUT).unwrap();
    assert_ne!(r.mark & MARK_REPLY, 0, "the flow used meanwhile is alive");
    let r = again.test_run(INGRESS_POD, &reply(1001), 0, OUT).unwrap();
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
    let r = again.test_run(INGRESS_POD, &reply(1002), 0, OUT).unwrap();
    assert_ne!(
        r.mark & MARK_REPLY,
        0,
        "a flow placed by user space is found"
    );
    assert!(table.flows().iter().any(|(k, _)| *k == key(1002)));
}

/// A pod interface holds only its own addresses: a peer's address or a link-local one sent
/// from it is spoofed, and so is a local pod's address arriving from anywhere else.
#[test]
fn spoofed_sources_are_dropped_per_pod_interface() {
    let mut b = Bed::new("spoofed");
    b.install(&Desired::default());
    let to_pod = |src: &str| tcp4(src, "10.0.0.3", 1000, 80);
    assert_eq!(b.forward(&to_pod("10.0.0.2"), POD_A), OK, "its own address");
    let before = b.counter("spoofed_packets");
    for (src, from) in [
        ("10.0.0.4", POD_A),     // the peer's address, from A's interface
        ("169.254.7.7", POD_A),  // IPv4 link-local, forwarded by Linux
        ("10.0.9.9", POD_A),     // any address A does not hold
        ("10.0.0.2", FORWARDED), // A's address from the uplink
        ("10.0.0.2", POD_B),     // A's address from B
    ] {
        let mark = b.ingress_on(&to_pod(src), from);
        assert_ne!(mark & MARK_SPOOFED, 0, "{src} on {from}");
        assert_eq!(b.forward(&to_pod(src), from), SHOT, "{src} on {from}");
    }
    assert_eq!(b.counter("spoofed_packets") - before, 5);
    let v6 = v6("fd00::7", "fd00::1", &[], TCP, &ports(1, 2));
    assert_eq!(
        b.forward(&v6, POD_A),
        SHOT,
        "an IPv6 source A does not hold"
    );
}

/// An address the snapshot does not name is denied both ways until it is named; under
/// `--unknown-pods allow` it is open (no rules either way).
#[test]
fn unknown_pods_are_isolated_both_ways_until_named() {
    let mut b = Bed::new("unknown");
    b.install(&policy());
    b.edit_local(|l| {
        unknown(l, POD_B, "10.0.0.4");
        unknown(l, OUT, "10.0.0.5");
    });
    let from_unknown = tcp4("10.0.0.4", "10.0.0.3", 1000, 80);
    let to_unknown = tcp4("10.0.1.5", "10.0.0.5", 1000, 80);
    let before = b.counter("unknown_pod_packets");
    assert_ne!(b.ingress_on(&from_unknown, POD_B) & MARK_UNKNOWN, 0);
    assert_eq!(b.forward(&from_unknown, POD_B), SHOT);
    assert_eq!(b.egress(&to_unknown), SHOT);
    let not_held = tcp4("10.0.1.5", "10.0.0.77", 1000, 80);
    assert_eq!(
        b.egress(&not_held),
        SHOT,
        "an address not on the pod interface"
    );
    assert_eq!(b.counter("unknown_pod_packets") - before, 3);
    // Allow mode: open, and without rules (10.0.0.1's ingress rules are not consulted for
    // 10.0.0.5, nor anything for the sender).
    b.edit_local(|l| l.unknown = UnknownPods::Allow);
    assert_eq!(b.forward(&from_unknown, POD_B), OK);
    assert_eq!(b.egress(&tcp4("10.0.1.5", "10.0.0.5", 1001, 81)), OK);
    // Named (known): its rules apply.
    b.edit_local(|l| {
        l.unknown = UnknownPods::Deny;
        known(l, POD_B, "10.0.0.4");
        known(l, OUT, "10.0.0.5");
    });
    assert_eq!(
        b.forward(&tcp4("10.0.0.4", "10.0.0.3", 1002, 80), POD_B),
        OK
    );
    assert_eq!(b.egress(&tcp4("10.0.1.5", "10.0.0.5", 1002, 80)), OK);
}

/// An address whose route moved to a new interface is unknown there: the new pod gets
/// nothing, and the old interface no longer holds it.
#[test]
fn a_reused_address_on_a_new_interface_is_unknown() {
    let mut b = Bed::new("reused");
    b.install(&Desired::default());
    let pkt = tcp4("10.0.0.2", "10.0.0.3", 1000, 80);
    assert_eq!(b.forward(&pkt, POD_A), OK);
    const NEW: u32 = 8;
    b.edit_local(|l| {
        l.addrs.retain(|(i, _), _| *i != POD_A);
        unknown(l, NEW, "10.0.0.2");
    });
    assert_eq!(
        b.forward(&tcp4("10.0.0.2", "10.0.0.3", 1001, 80), NEW),
        SHOT
    );
    assert_eq!(
        b.forward(&tcp4("10.0.0.2", "10.0.0.3", 1002, 80), POD_A),
        SHOT,
        "the old interface lost it"
    );
    b.edit_local(|l| known(l, NEW, "10.0.0.2"));
    assert_eq!(b.forward(&tcp4("10.0.0.2", "10.0.0.3", 1003, 80), NEW), OK);
}

/// A packet through an interface no local pod table classified yet is dropped, whichever
/// side it is on; so is one from a pod interface whose ingress program has not run (it
/// appeared an instant ago).
#[test]
fn unclassified_interfaces_pass_nothing() {
    let mut b = Bed::new("unclassified");
    b.install(&Desired::default());
    assert_eq!(b.egress(&tcp4("10.0.1.5", "10.0.0.3", 999, 80)), OK);
    // New flows each (a remembered flow is a reply's business, not the sender's).
    let pkt = tcp4("10.0.1.5", "10.0.0.3", 1000, 80);
    let before = b.counter("unclassified_interface_packets");
    let spoofed = b.counter("spoofed_packets");
    let unknown = b.counter("unknown_pod_packets");
    // In on interface 9, which nothing classified (the other ingress program ran there).
    let mark = b.dp.test_run(INGRESS, &pkt, 0, 9).unwrap().mark;
    assert_eq!(b.egress_marked(&pkt, mark, 9), SHOT);
    // From pod A, without its ingress program's mark.
    let from_a = tcp4("10.0.0.2", "10.0.0.3", 1001, 80);
    assert_eq!(b.egress_marked(&from_a, 0, POD_A), SHOT);
    // The pod variant on an interface classified as an uplink: it holds no pod addresses
    // there, so the source is spoofed (counted as such, not here).
    let mark = b.dp.test_run(INGRESS_POD, &pkt, 0, FORWARDED).unwrap().mark;
    assert_eq!(b.egress_marked(&pkt, mark, FORWARDED), SHOT);
    // The uplink variant on a pod interface: the pod's own address is a local pod's,
    // which no uplink may send (spoofed too).
    let mark = b.dp.test_run(INGRESS, &from_a, 0, POD_A).unwrap().mark;
    assert_eq!(b.egress_marked(&from_a, mark, POD_A), SHOT);
    // Out through an interface no table classified. The pod variant there finds no
    // (interface, destination) entry, which is all it asks (one lookup on a new flow): an
    // unknown pod. The other variant asks `IFACES`: unclassified.
    b.edit_local(|l| {
        l.pod_ifaces.remove(&OUT);
        l.addrs.retain(|(i, _), _| *i != OUT);
    });
    let mark = b.ingress(&pkt);
    let r = b.dp.test_run(EGRESS_POD, &pkt, mark, FORWARDED).unwrap();
    assert_eq!(r.retval, SHOT);
    assert_eq!(b.counter("unknown_pod_packets") - unknown, 1);
    let r = b.dp.test_run(EGRESS, &pkt, mark, FORWARDED).unwrap();
    assert_eq!(r.retval, SHOT);
    assert_eq!(b.counter("unclassified_interface_packets") - before, 3);
    assert_eq!(b.counter("spoofed_packets") - spoofed, 2);
}

/// The sender of a new flow is named by its ingress interface, so SNAT can't hide it and
/// there is no limit of 255 isolated-egress pods (the 8-bit mark index of layout 4).
#[test]
fn senders_named_by_interface_beyond_255_isolated_pods() {
    const PODS: u32 = 300;
    let mut b = Bed::new("many");
    let mut l = node_pods();
    out_is_uplink(&mut l);
    let mut d = Desired::default();
    let pod = |k: u32| Ipv4Addr::new(10, 2, (k >> 8) as u8, k as u8);
    let peer = |k: u32| Ipv4Addr::new(10, 9, (k >> 8) as u8, k as u8);
    for k in 0..PODS {
        known(&mut l, 1000 + k, &pod(k).to_string());
        d.addr4.insert(peer(k), k + 1);
        let mut rs = Ruleset {
            egress: true,
            ..Default::default()
        };
        rs.aa.insert(k + 1);
        d.rulesets.insert(format!("e_{k}"), rs);
        d.eg4.insert(pod(k), format!("e_{k}"));
    }
    b.set_local(l);
    b.install(&d);
    for k in [0, 254, 255, 256, PODS - 1] {
        let own = tcp4(&pod(k).to_string(), &peer(k).to_string(), 1000, 1);
        let mark = b.ingress_on(&own, 1000 + k);
        // SNAT: the node's address as the source.
        let snat = |dst: Ipv4Addr| tcp4("192.168.0.1", &dst.to_string(), 2000 + k as u16, 1);
        assert_eq!(
            b.egress_marked(&snat(peer(k)), mark, 1000 + k),
            OK,
            "pod {k}"
        );
        let other = peer((k + 1) % PODS);
        assert_eq!(
            b.egress_marked(&snat(other), mark, 1000 + k),
            SHOT,
            "pod {k}"
        );
    }
}

/// An established flow does not let spoofed or unknown packets through: the marks are
/// tested before the flow table.
#[test]
fn established_flows_do_not_carry_spoofed_packets() {
    let mut b = Bed::new("established");
    b.install(&policy());
    let fwd = tcp4("10.0.1.5", "10.0.0.1", 1000, 80);
    assert_eq!(b.egress(&fwd), OK);
    assert_eq!(b.egress(&fwd), OK, "remembered");
    // The same tuple, sent from pod A (which does not hold 10.0.1.5).
    assert_eq!(b.forward(&fwd, POD_A), SHOT);
    // The reply direction, from a pod interface that does not hold 10.0.0.1: REPLY and
    // SPOOFED both set, and the spoofed bit wins.
    let reply = tcp4("10.0.0.1", "10.0.1.5", 80, 1000);
    let mark = b.ingress_on(&reply, POD_B);
    assert_ne!(mark & MARK_REPLY, 0);
    assert_eq!(b.egress_marked(&reply, mark, POD_B), SHOT);
    assert_eq!(b.forward(&reply, OUT), OK, "from its own interface");
    // A pod that becomes unknown: its packets are dropped even on a remembered tuple.
    let a = tcp4("10.0.0.4", "10.0.0.3", 1000, 80);
    assert_eq!(b.forward(&a, POD_B), OK);
    b.edit_local(|l| unknown(l, POD_B, "10.0.0.4"));
    assert_eq!(b.forward(&a, POD_B), SHOT, "remembered, but unknown now");
}

/// A version bigger than the budget is applied with the rule lists that don't fit denied,
/// and says so; a delta on top of a degraded version is planned whole again (an in-place
/// patch would keep nothing of the budget's verdict and report nothing).
#[test]
fn a_version_that_does_not_fit_is_applied_degraded() {
    use moat_dataplane::Backend;
    use moat_enforcer_ebpf::EbpfBackend;
    use moat_policy::Index;
    use moat_policy::ir::delta;
    use moat_policy::testkit::parse_all;
    use moat_policy::testkit::random::{Features, World};
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    // SAFETY: affects the calling thread only (see the test above).
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
    let node = format!("backend-budget-{}", std::process::id());
    let root = bpffs().join("moat").join(&node);
    let _ = std::fs::remove_dir_all(&root);
    let mut b = EbpfBackend::open(bpffs(), &node, PodInterfaces::Auto, Default::default()).unwrap();
    let none = LocalPods::default();
    b.adopt(None, &none).unwrap();
    let mut f = Features::default();
    let mut rng = SmallRng::seed_from_u64(0xb0d9e7);
    let (mut world, name, old) = loop {
        let world = World::generate(&mut rng, &mut f);
        let index = Index::build(parse_all(&world.objects()));
        let busiest = index.snapshots().into_iter().max_by_key(|s| s.rules.len());
        let s = busiest.expect("a node");
        // Layout 5 denies cluster-tier rule lists whole (degraded by design): start from a
        // version it holds exactly.
        let np_only = s
            .rules
            .iter()
            .all(|r| r.tier == moat_policy::ir::Tier::NetworkPolicy);
        if s.rules.len() >= 4 && np_only {
            break (world, s.node.clone(), s);
        }
    };
    let full = b.apply_full(&old, &none).unwrap();
    assert!(full.degraded.is_empty());
    let whole = b.installed().len();
    b.set_max_elements(Some(whole / 2));
    let cut = b.apply_full(&old, &none).unwrap();
    assert!(
        !cut.degraded.is_empty(),
        "{whole} entries under a cap of half"
    );
    assert!(b.installed().len() < whole);
    let snap = |w: &World| Index::build(parse_all(&w.objects())).snapshot(&name);
    let mut deltas = 0;
    let mut old = old;
    for _ in 0..20 {
        world.mutate(&mut rng, &mut f, false);
        let Some(new) = snap(&world) else { break };
        let a = b
            .apply_delta(&old, &delta::diff(&old, &new), &new, &none)
            .unwrap();
        b.settle();
        assert_eq!(b.dataplane().read_slot(0), *b.installed());
        assert_eq!(b.dataplane().read_slot(1), *b.installed());
        deltas += usize::from(!a.degraded.is_empty());
        old = new;
    }
    assert!(deltas > 0, "a degraded version's deltas report what is cut");
    b.remove_all().unwrap();
}

/// A mark that is no finding of this layout's ingress programs names nobody: the findings of
/// a build from before `MARK_CLASSIFIED` (a packet it marked, still queued when the links
/// moved) and an older layout's sender index, with no older layout to decode it from, are
/// unclassified, never "from a pod, left open".
#[test]
fn marks_that_are_no_finding_name_nobody() {
    let mut b = Bed::new("nofinding");
    b.edit_local(out_is_uplink);
    b.install(&policy());
    let denied = tcp4("10.0.0.2", "10.0.0.8", 1000, 1);
    let allowed = tcp4("10.0.0.2", "10.0.0.9", 1000, 1);
    for (frame, from) in [(&denied, POD_A), (&allowed, POD_A), (&denied, FORWARDED)] {
        let mark = b.ingress_on(frame, from);
        assert!(is_finding(mark), "{mark:#x} from {from}");
    }
    assert_eq!(b.forward(&allowed, POD_A), OK);
    let before = b.counter("unclassified_interface_packets");
    // New flows each (a remembered flow's packets pass before any finding is read).
    for (n, mark) in [
        MARK_FROM_POD | MARK_OPEN,
        MARK_FROM_POD,
        70 << MARK_LEGACY_SHIFT,
    ]
    .into_iter()
    .enumerate()
    {
        assert!(!is_finding(mark));
        let sport = 2000 + n as u16;
        let denied = tcp4("10.0.0.2", "10.0.0.8", sport, 1);
        let allowed = tcp4("10.0.0.2", "10.0.0.9", sport, 1);
        assert_eq!(b.egress_marked(&denied, mark, POD_A), SHOT, "{mark:#x}");
        assert_eq!(b.egress_marked(&allowed, mark, POD_A), SHOT, "{mark:#x}");
    }
    assert_eq!(b.counter("unclassified_interface_packets") - before, 6);
}
