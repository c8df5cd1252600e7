//! The nft dataplane fails closed, on real packets through real veths: `NftBackend` driven
//! directly, in a private namespace that is the node (see `support/podlab.rs`), with the
//! local pod table bound by the agent's own `Bindings` from the lab's interfaces. IPv4 and
//! IPv6 alike: spoofed sources never arrive, unknown pods are isolated both ways until a
//! snapshot names them, a reused address is denied until named for the new pod, a new
//! interface is dropped until classified, `--unknown-pods allow` opens unknown pods (and
//! nothing else), and a version over the element limit denies only what doesn't fit.

#[path = "support/podlab.rs"]
mod podlab;

use std::net::IpAddr;

use moat_dataplane::local::{Bindings, UnknownPods};
use moat_dataplane::{Backend, LocalPods, counters};
use moat_enforcer_nft::NftBackend;
use moat_integration::netns;
use moat_policy::Index;
use moat_policy::ir::NodeSnapshot;
use moat_policy::ir::delta::diff;
use moat_policy::model::K8sObject;
use moat_policy::testkit::{k8s, parse_all};
use podlab::{Lab, Probe, REMOTE4, REMOTE6};
use serde_json::{Value, json};

/// Pod objects: (name, uid, address number) on node n1.
fn snapshot(pods: &[(&str, &str, u8)], extra: Vec<Value>) -> NodeSnapshot {
    let mut objs = vec![
        K8sObject::Node(k8s(json!({"metadata": {"name": "n1"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}}))),
        K8sObject::Namespace(k8s(json!({"metadata": {"name": "t"}}))),
    ];
    for (name, uid, n) in pods {
        objs.push(K8sObject::Pod(k8s(json!({
            "metadata": {"name": name, "namespace": "t", "uid": uid, "labels": {"app": name}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
            "status": {"phase": "Running",
                       "podIPs": [{"ip": format!("10.9.0.{n}")}, {"ip": format!("fd09::{n}")}]},
        }))));
    }
    for p in extra {
        objs.push(K8sObject::NetworkPolicy(k8s(p)));
    }
    Index::build(parse_all(&objs)).snapshot("n1").unwrap()
}

/// c takes UDP 7000 from a and b only; b sends to c only.
fn policies() -> Vec<Value> {
    let sel = |app: &str| json!({"podSelector": {"matchLabels": {"app": app}}});
    vec![
        json!({"metadata": {"name": "c-in", "namespace": "t"},
               "spec": {"podSelector": {"matchLabels": {"app": "c"}}, "policyTypes": ["Ingress"],
                        "ingress": [{"from": [sel("a"), sel("b")],
                                     "ports": [{"protocol": "UDP", "port": 7000}]}]}}),
        json!({"metadata": {"name": "b-out", "namespace": "t"},
               "spec": {"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Egress"],
                        "egress": [{"to": [sel("c")]}]}}),
    ]
}

fn backend(dir: &tempfile::TempDir, max: usize) -> NftBackend {
    let mut b = NftBackend::open(max, &dir.path().join("lock")).unwrap();
    b.adopt(None, &LocalPods::default()).unwrap();
    b
}

/// Probes in both families: `(from, source, to, port, arrives)`, where a source or
/// destination names a pod (its own address of that family), "remote", or is an address.
struct Probes<'a> {
    lab: &'a Lab,
    list: Vec<Probe>,
}

impl<'a> Probes<'a> {
    fn new(lab: &'a Lab) -> Self {
        Probes {
            lab,
            list: Vec::new(),
        }
    }

    fn addr(&self, who: &str, v4: bool) -> Option<IpAddr> {
        Some(match who {
            "remote" if v4 => REMOTE4.parse().unwrap(),
            "remote" => REMOTE6.parse().unwrap(),
            _ if self.lab.pods.contains_key(who) => {
                let p = self.lab.pod(who);
                if v4 { p.v4 } else { p.v6 }
            }
            a => {
                let a: IpAddr = a.parse().unwrap();
                if a.is_ipv4() != v4 {
                    return None;
                }
                a
            }
        })
    }

    /// Adds the probe in each family its addresses exist in.
    fn add(mut self, from: &str, src: &str, to: &str, port: u16, arrives: bool) -> Self {
        for v4 in [true, false] {
            let (Some(s), Some(d)) = (self.addr(src, v4), self.addr(to, v4)) else {
                continue;
            };
            self.list.push(Probe {
                from: from.into(),
                src: s,
                dst: d,
                port,
                arrives,
            });
        }
        self
    }

    fn check(self, what: &str) -> usize {
        self.lab.check(what, &self.list);
        self.list.len()
    }
}

/// Counter increments since `before`.
fn moved(b: &NftBackend, before: &std::collections::BTreeMap<String, u64>) -> [u64; 4] {
    let now = b.counters();
    let d = |k: &str| now.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    [
        d(counters::SPOOFED),
        d(counters::UNKNOWN_POD),
        d(counters::UNCLASSIFIED),
        d("denied_packets"),
    ]
}

#[test]
fn spoofed_sources_never_arrive() {
    if !netns::inside("spoofed_sources_never_arrive") {
        return;
    }
    let mut lab = Lab::new();
    for (name, n) in [("a", 1), ("b", 2), ("c", 3), ("d", 4)] {
        lab.add_pod(name, n);
    }
    let pods = [
        ("a", "ua", 1),
        ("b", "ub", 2),
        ("c", "uc", 3),
        ("d", "ud", 4),
    ];
    let s1 = snapshot(&pods, policies());
    let dir = tempfile::tempdir().unwrap();
    let mut b = backend(&dir, moat_enforcer_nft::DEFAULT_MAX_ELEMENTS);
    let mut bindings = Bindings::default();
    let local = bindings.reconcile(&lab.interfaces(), Some(&s1), UnknownPods::Deny);
    assert!(b.apply_full(&s1, &local).unwrap().degraded.is_empty());

    // Pod a also holds a peer's addresses and link-local ones, the remote host a local
    // pod's: their kernels send from them, the node must not forward them.
    lab.pod("a").ns.sh(
        "ip addr add 10.9.0.2/32 dev eth0 && ip addr add 169.254.9.9/32 dev eth0 \
         && ip addr add fd09::2/128 dev eth0 nodad && ip addr add fd09::99/128 dev eth0 nodad",
    );
    lab.remote.sh(
        "ip addr add 10.9.0.2/32 dev lo && ip addr add 169.254.9.9/32 dev lo \
         && ip addr add fd09::2/128 dev lo nodad",
    );
    let before = b.counters();
    let n = Probes::new(&lab)
        // Controls: the same paths with true sources.
        .add("a", "a", "d", 7000, true)
        .add("a", "a", "remote", 7000, true)
        .add("remote", "remote", "d", 7000, true)
        // A peer's address from a pod interface.
        .add("a", "b", "d", 7000, false)
        .add("a", "b", "remote", 7000, false)
        .add("a", "b", "c", 7000, false)
        // An address routed nowhere, and a link-local one, from a pod interface.
        .add("a", "fd09::99", "d", 7000, false)
        .add("a", "169.254.9.9", "d", 7000, false)
        .add("a", "169.254.9.9", "remote", 7000, false)
        // A local pod's address from the uplink.
        .add("remote", "b", "d", 7000, false)
        .add("remote", "b", "c", 7000, false)
        .check("spoofed sources");
    let [spoofed, unknown, unclassified, denied] = moved(&b, &before);
    assert_eq!(
        (spoofed, unknown, unclassified, denied),
        (n as u64 - 6, 0, 0, 0),
        "every spoofed probe counted as spoofed"
    );

    // A forwarded link-local source from the uplink is judged like any other source:
    // allowed to a pod no policy isolates, denied by c's ingress rules.
    let before = b.counters();
    Probes::new(&lab)
        .add("remote", "169.254.9.9", "d", 7000, true)
        .add("remote", "169.254.9.9", "c", 7000, false)
        // And the rules of isolated pods are exact: b may send only to c, c takes 7000
        // from a and b only.
        .add("b", "b", "c", 7000, true)
        .add("b", "b", "c", 7001, false)
        .add("b", "b", "a", 7000, false)
        .add("a", "a", "c", 7000, true)
        .add("d", "d", "c", 7000, false)
        .check("link-local and policy");
    assert_eq!(moved(&b, &before), [0, 0, 0, 1 + 2 + 2 + 2]);
}

#[test]
fn unknown_pods_are_denied_both_ways_until_named() {
    if !netns::inside("unknown_pods_are_denied_both_ways_until_named") {
        return;
    }
    let mut lab = Lab::new();
    for (name, n) in [("a", 1), ("b", 2), ("c", 3), ("d", 4)] {
        lab.add_pod(name, n);
    }
    let named = [("a", "ua", 1), ("b", "ub", 2), ("c", "uc", 3)];
    let s1 = snapshot(&named, policies());
    let dir = tempfile::tempdir().unwrap();
    let mut b = backend(&dir, moat_enforcer_nft::DEFAULT_MAX_ELEMENTS);
    let mut bindings = Bindings::default();
    let deny = UnknownPods::Deny;
    b.apply_full(&s1, &bindings.reconcile(&lab.interfaces(), Some(&s1), deny))
        .unwrap();

    // d is routed to its interface but no snapshot names it: isolated both ways.
    let before = b.counters();
    let n = Probes::new(&lab)
        .add("a", "a", "d", 7000, false)
        .add("d", "d", "a", 7000, false)
        .add("remote", "remote", "d", 7000, false)
        .add("d", "d", "remote", 7000, false)
        .add("a", "a", "remote", 7000, true)
        .check("d unknown");
    assert_eq!(moved(&b, &before), [0, n as u64 - 2, 0, 0]);

    // Named (a delta): open like any pod no policy isolates.
    let with_d = [
        ("a", "ua", 1),
        ("b", "ub", 2),
        ("c", "uc", 3),
        ("d", "ud", 4),
    ];
    let s2 = snapshot(&with_d, policies());
    let local = bindings.reconcile(&lab.interfaces(), Some(&s2), deny);
    b.apply_delta(&s1, &diff(&s1, &s2), &s2, &local).unwrap();
    Probes::new(&lab)
        .add("a", "a", "d", 7000, true)
        .add("d", "d", "a", 7000, true)
        .add("remote", "remote", "d", 7000, true)
        .add("d", "d", "remote", 7000, true)
        .check("d named");

    // A new interface, before the agent classified it: dropped both ways.
    lab.add_pod("e", 5);
    let before = b.counters();
    Probes::new(&lab)
        .add("e", "e", "a", 7000, false)
        .add("a", "a", "e", 7000, false)
        .check("e unclassified");
    assert_eq!(moved(&b, &before), [0, 0, 4, 0]);
    // Classified, not named: unknown.
    b.set_local(&bindings.reconcile(&lab.interfaces(), Some(&s2), deny))
        .unwrap();
    let before = b.counters();
    Probes::new(&lab)
        .add("e", "e", "a", 7000, false)
        .add("a", "a", "e", 7000, false)
        .check("e unknown");
    assert_eq!(moved(&b, &before), [0, 4, 0, 0]);

    // a goes, and a new pod gets its addresses on a new interface while the snapshot still
    // names a: the new pod must not pass for a (its rules, its peers' trust in it).
    lab.remove_pod("a");
    lab.add_pod("a2", 1);
    let before = b.counters();
    Probes::new(&lab)
        .add("a2", "a2", "d", 7000, false)
        .check("a2 unclassified");
    assert_eq!(moved(&b, &before), [0, 0, 2, 0]);
    b.set_local(&bindings.reconcile(&lab.interfaces(), Some(&s2), deny))
        .unwrap();
    let before = b.counters();
    Probes::new(&lab)
        .add("a2", "a2", "d", 7000, false)
        .add("d", "d", "a2", 7000, false)
        .add("a2", "a2", "c", 7000, false)
        .add("remote", "remote", "a2", 7000, false)
        .check("a2 on a's address, a still named");
    assert_eq!(moved(&b, &before), [0, 8, 0, 0]);

    // Named for the new pod (another UID): bound to its interface, with its own rules.
    let s3 = snapshot(
        &[
            ("a2", "ua2", 1),
            ("b", "ub", 2),
            ("c", "uc", 3),
            ("d", "ud", 4),
        ],
        policies(),
    );
    let local = bindings.reconcile(&lab.interfaces(), Some(&s3), deny);
    b.apply_delta(&s2, &diff(&s2, &s3), &s3, &local).unwrap();
    Probes::new(&lab)
        .add("a2", "a2", "d", 7000, true)
        .add("d", "d", "a2", 7000, true)
        .add("remote", "remote", "a2", 7000, true)
        // c's rules name pod a by label, and a2 is not labelled a.
        .add("a2", "a2", "c", 7000, false)
        .check("a2 named");
}

#[test]
fn allow_mode_opens_unknown_pods_and_nothing_else() {
    if !netns::inside("allow_mode_opens_unknown_pods_and_nothing_else") {
        return;
    }
    let mut lab = Lab::new();
    for (name, n) in [("a", 1), ("b", 2), ("c", 3), ("d", 4)] {
        lab.add_pod(name, n);
    }
    let s1 = snapshot(
        &[("a", "ua", 1), ("b", "ub", 2), ("c", "uc", 3)],
        policies(),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut b = backend(&dir, moat_enforcer_nft::DEFAULT_MAX_ELEMENTS);
    let mut bindings = Bindings::default();
    let local = bindings.reconcile(&lab.interfaces(), Some(&s1), UnknownPods::Allow);
    b.apply_full(&s1, &local).unwrap();
    let before = b.counters();
    Probes::new(&lab)
        .add("a", "a", "d", 7000, true)
        .add("d", "d", "a", 7000, true)
        .add("remote", "remote", "d", 7000, true)
        .add("d", "d", "remote", 7000, true)
        // Isolated pods keep their rules.
        .add("d", "d", "c", 7000, false)
        .add("a", "a", "c", 7000, true)
        .check("allow mode");
    assert_eq!(moved(&b, &before), [0, 0, 0, 2]);
    // An unknown pod's traffic is open, not its neighbours' identities. (Only now does d
    // hold a's addresses: before, its kernel would have dropped a's packets as martians.)
    lab.pod("d")
        .ns
        .sh("ip addr add 10.9.0.1/32 dev eth0 && ip addr add fd09::1/128 dev eth0 nodad");
    let before = b.counters();
    Probes::new(&lab)
        .add("d", "a", "remote", 7000, false)
        .check("allow mode, spoofed");
    assert_eq!(moved(&b, &before), [2, 0, 0, 0]);
}

/// A pod selected by a policy far over the element limit: applied anyway, that pod denies
/// all ingress, every other pod keeps its exact rules.
#[test]
fn a_pod_whose_rules_do_not_fit_is_denied_and_the_rest_exact() {
    if !netns::inside("a_pod_whose_rules_do_not_fit_is_denied_and_the_rest_exact") {
        return;
    }
    let mut lab = Lab::new();
    for (name, n) in [("a", 1), ("b", 2), ("c", 3), ("d", 4)] {
        lab.add_pod(name, n);
    }
    let blocks: Vec<Value> = (0..300u32)
        .map(|i| json!({"ipBlock": {"cidr": format!("11.0.{}.{}/32", i / 256, i % 256)}}))
        .chain([json!({"ipBlock": {"cidr": "192.0.2.0/24"}})])
        .collect();
    let ports: Vec<Value> = (0..300u16)
        .map(|i| json!({"protocol": "UDP", "port": 7000 + i * 2}))
        .collect();
    let mut pols = policies();
    pols.push(json!({"metadata": {"name": "huge", "namespace": "t"},
        "spec": {"podSelector": {"matchLabels": {"app": "d"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": blocks, "ports": ports}]}}));
    let all = [
        ("a", "ua", 1),
        ("b", "ub", 2),
        ("c", "uc", 3),
        ("d", "ud", 4),
    ];
    let s = snapshot(&all, pols);
    let dir = tempfile::tempdir().unwrap();
    let mut b = backend(&dir, 10_000);
    let mut bindings = Bindings::default();
    let local = bindings.reconcile(&lab.interfaces(), Some(&s), UnknownPods::Deny);
    let applied = b.apply_full(&s, &local).unwrap();
    assert_eq!(applied.degraded.len(), 1, "{:?}", applied.degraded);
    assert!(b.counters()["elements"] <= 10_000);
    let before = b.counters();
    Probes::new(&lab)
        // The remote host is in one of d's blocks on an allowed port: cut, so denied.
        .add("remote", "remote", "d", 7000, false)
        .add("a", "a", "d", 7000, false)
        .add("b", "b", "c", 7000, true)
        .add("b", "b", "c", 7001, false)
        .add("a", "a", "c", 7000, true)
        .add("d", "d", "a", 7000, true)
        .check("degraded");
    assert_eq!(moved(&b, &before), [0, 0, 0, 6]);
}
