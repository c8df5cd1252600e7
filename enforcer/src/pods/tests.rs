use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use moat_dataplane::local::{Link, PodAddr};
use moat_dataplane::{Adopted, Capabilities};
use moat_policy::ir::delta::Delta;
use moat_policy::ir::digest::Digest;
use moat_policy::ir::{DirectionRules, Endpoint, EndpointId};

use super::*;

/// Records the local tables it is given; fails applies while `fail` is set.
#[derive(Clone, Default)]
struct Fake {
    calls: Arc<Mutex<Vec<(&'static str, LocalPods)>>>,
    fail: Arc<Mutex<bool>>,
}

impl Fake {
    fn record(&self, op: &'static str, l: &LocalPods) -> Result<(), BackendError> {
        if *self.fail.lock().unwrap() {
            return Err(BackendError::failed(op, "planted failure"));
        }
        self.calls.lock().unwrap().push((op, l.clone()));
        Ok(())
    }
    fn ops(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap().iter().map(|c| c.0).collect()
    }
}

impl Backend for Fake {
    fn name(&self) -> &str {
        "fake"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    fn adopt(
        &mut self,
        last: Option<&NodeSnapshot>,
        l: &LocalPods,
    ) -> Result<Adopted, BackendError> {
        self.record("adopt", l)?;
        Ok(if last.is_some() {
            Adopted::Enforcing
        } else {
            Adopted::Nothing
        })
    }
    fn apply_full(&mut self, _: &NodeSnapshot, l: &LocalPods) -> Result<Applied, BackendError> {
        self.record("full", l)?;
        Ok(Applied::default())
    }
    fn apply_delta(
        &mut self,
        _: &NodeSnapshot,
        _: &Delta,
        _: &NodeSnapshot,
        l: &LocalPods,
    ) -> Result<Applied, BackendError> {
        self.record("delta", l)?;
        Ok(Applied::default())
    }
    fn set_local(&mut self, l: &LocalPods) -> Result<(), BackendError> {
        self.record("set_local", l)
    }
    fn counters(&self) -> BTreeMap<String, u64> {
        BTreeMap::new()
    }
    fn remove_all(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn topo(routes: &[(&str, u32)]) -> Topology {
    let mut t = Topology::default();
    for i in [5, 6] {
        t.links.insert(
            i,
            Link {
                index: i,
                name: format!("vp{i}"),
                kind: "veth".into(),
                master: None,
                global_addr: false,
            },
        );
    }
    t.routes = routes.iter().map(|(a, i)| (ip(a), *i)).collect();
    t
}

fn snap(eps: &[(u64, &str)]) -> Arc<NodeSnapshot> {
    Arc::new(NodeSnapshot {
        node: "n".into(),
        version: 1,
        digest: Digest([0; 32]),
        node_addrs: vec![],
        endpoints: eps
            .iter()
            .map(|(id, a)| Endpoint {
                id: EndpointId(*id),
                sandbox: 0,
                addrs: vec![ip(a)],
                ingress: DirectionRules::default(),
                egress: DirectionRules::default(),
            })
            .collect(),
        rules: vec![],
        groups: vec![],
    })
}

fn setup() -> (
    tempfile::TempDir,
    LocalState,
    Fake,
    Dataplane<Fake>,
    Metrics,
) {
    let dir = tempfile::tempdir().unwrap();
    let state = LocalState::open(dir.path()).unwrap();
    let fake = Fake::default();
    let dp = Dataplane::new(
        fake.clone(),
        LocalConfig {
            pod_interfaces: PodInterfaces::Auto,
            unknown_pods: UnknownPods::Deny,
        },
    );
    (dir, state, fake, dp, Metrics::default())
}

fn full(b: &mut Fake, l: &LocalPods) -> Result<Applied, BackendError> {
    b.apply_full(&snap(&[]), l)
}

#[test]
fn a_failed_apply_keeps_the_old_table_but_its_bindings_are_durable_first() {
    let (_d, state, fake, mut dp, m) = setup();
    let t = topo(&[("10.0.0.1", 5)]);
    *fake.fail.lock().unwrap() = true;
    assert!(
        dp.apply(&t, snap(&[(1, "10.0.0.1")]), &state, &m, full)
            .is_err()
    );
    assert!(dp.local().is_none(), "nothing enforced");
    // The binding the backend was about to rely on is on disk already: a crash right after
    // the backend took it can't forget it.
    assert_eq!(
        state.load_bindings().unwrap().by_addr[&ip("10.0.0.1")].iface,
        5
    );
    *fake.fail.lock().unwrap() = false;
    dp.apply(&t, snap(&[(1, "10.0.0.1")]), &state, &m, full)
        .unwrap();
    assert_eq!(
        dp.local().unwrap().get(5, ip("10.0.0.1")),
        Some(PodAddr::Known(EndpointId(1)))
    );
    assert_eq!(m.pod_addresses_known.get(), 1);
}

#[test]
fn refresh_waits_for_a_version_and_acts_only_on_change() {
    let (_d, state, fake, mut dp, m) = setup();
    let t = topo(&[("10.0.0.1", 5)]);
    assert_eq!(dp.refresh(&t, &state, &m).unwrap(), None);
    assert!(
        fake.ops().is_empty(),
        "no table before a version is enforced"
    );
    dp.apply(&t, snap(&[(1, "10.0.0.1")]), &state, &m, full)
        .unwrap();
    assert_eq!(dp.refresh(&t, &state, &m).unwrap(), None, "unchanged");
    // The address moves to another interface: unknown there, and the backend hears it.
    let moved = topo(&[("10.0.0.1", 6)]);
    let l = dp
        .refresh(&moved, &state, &m)
        .unwrap()
        .expect("a new table");
    assert_eq!(l.get(6, ip("10.0.0.1")), Some(PodAddr::Unknown));
    assert_eq!(fake.ops(), vec!["full", "set_local"]);
    assert_eq!(m.pod_addresses_unknown.get(), 1);
    // A failing set_local leaves the last table in place, so the next refresh tries again.
    *fake.fail.lock().unwrap() = true;
    assert!(dp.refresh(&t, &state, &m).is_err());
    assert_eq!(
        dp.local().unwrap().get(6, ip("10.0.0.1")),
        Some(PodAddr::Unknown)
    );
    *fake.fail.lock().unwrap() = false;
    assert!(dp.refresh(&t, &state, &m).unwrap().is_some());
    assert_eq!(
        dp.local().unwrap().get(5, ip("10.0.0.1")),
        Some(PodAddr::Known(EndpointId(1)))
    );
}

#[test]
fn adopting_binds_against_the_last_snapshot_and_the_persisted_bindings() {
    let (_d, state, fake, mut dp, m) = setup();
    let s = snap(&[(1, "10.0.0.1")]);
    dp.apply(&topo(&[("10.0.0.1", 5)]), s.clone(), &state, &m, full)
        .unwrap();
    // A restart: the address moved meanwhile.
    let mut again = Dataplane::new(fake.clone(), dp.cfg.clone());
    let loaded = state.load_bindings().unwrap();
    let adopted = again
        .adopt(
            loaded,
            &topo(&[("10.0.0.1", 6)]),
            Some(s.clone()),
            &state,
            &m,
        )
        .unwrap();
    assert_eq!(adopted, Adopted::Enforcing);
    assert_eq!(
        again.local().unwrap().get(6, ip("10.0.0.1")),
        Some(PodAddr::Unknown)
    );
    // Without the persisted bindings it would have been the old pod's.
    let mut amnesiac = Dataplane::new(fake, dp.cfg.clone());
    amnesiac
        .adopt(
            Bindings::default(),
            &topo(&[("10.0.0.1", 6)]),
            Some(s),
            &state,
            &m,
        )
        .unwrap();
    assert_eq!(
        amnesiac.local().unwrap().get(6, ip("10.0.0.1")),
        Some(PodAddr::Known(EndpointId(1)))
    );
}

#[test]
fn bindings_from_another_boot_name_no_interface() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        db.insert(
            "bindings",
            br#"{"boot":"another-boot","bindings":{"by_addr":{"10.0.0.1":{"iface":5,"endpoint":"0000000000000001","sandbox":0}}}}"#.to_vec(),
        )
        .unwrap();
        db.flush().unwrap();
    }
    crate::state::released(dir.path());
    let state = LocalState::open(dir.path()).unwrap();
    let b = state.load_bindings().unwrap();
    assert_eq!(
        b.by_addr[&ip("10.0.0.1")].iface,
        0,
        "interface indices restart with the kernel"
    );
    state.save_bindings(&b).unwrap();
    drop(state);
    crate::state::released(dir.path());
    let state = LocalState::open(dir.path()).unwrap();
    assert_eq!(state.load_bindings().unwrap(), b, "this boot's round-trip");
}

#[test]
fn ahead_keeps_what_the_new_bindings_forget() {
    let (_d, state, _fake, mut dp, m) = setup();
    dp.apply(
        &topo(&[("10.0.0.1", 5)]),
        snap(&[(1, "10.0.0.1")]),
        &state,
        &m,
        full,
    )
    .unwrap();
    let old = dp.bindings.clone();
    let (new, _) = dp.reconcile(&topo(&[("10.0.0.2", 6)]), Some(&snap(&[(2, "10.0.0.2")])));
    assert!(!new.by_addr.contains_key(&ip("10.0.0.1")));
    let u = ahead(&old, &new).expect("new bindings");
    assert!(u.by_addr.contains_key(&ip("10.0.0.1")) && u.by_addr.contains_key(&ip("10.0.0.2")));
    assert_eq!(ahead(&new, &new), None);
}

#[test]
fn degradations_survive_a_restart_until_a_version_fits() {
    let (_d, state, fake, mut dp, m) = setup();
    let d = Degraded {
        egress: false,
        rules: vec![moat_policy::ir::RuleId(7)],
        endpoints: vec![EndpointId(1)],
        reason: "needs more than the 10 table elements the dataplane can hold".into(),
    };
    let s = snap(&[(1, "10.0.0.1")]);
    let d2 = d.clone();
    dp.apply(
        &topo(&[("10.0.0.1", 5)]),
        s.clone(),
        &state,
        &m,
        move |b, l| {
            full(b, l)?;
            Ok(Applied { degraded: vec![d2] })
        },
    )
    .unwrap();
    assert_eq!(m.degraded.get(), 1);
    let m2 = Metrics::default();
    let mut again = Dataplane::new(fake.clone(), dp.cfg.clone());
    again
        .adopt(
            state.load_bindings().unwrap(),
            &topo(&[("10.0.0.1", 5)]),
            Some(s.clone()),
            &state,
            &m2,
        )
        .unwrap();
    assert_eq!(again.degraded(), [d]);
    assert_eq!(m2.degraded.get(), 1, "still degraded after the restart");
    again
        .apply(&topo(&[("10.0.0.1", 5)]), s.clone(), &state, &m2, full)
        .unwrap();
    assert_eq!(m2.degraded.get(), 0);
    let mut third = Dataplane::new(fake, dp.cfg.clone());
    third
        .adopt(
            state.load_bindings().unwrap(),
            &topo(&[("10.0.0.1", 5)]),
            Some(s),
            &state,
            &m2,
        )
        .unwrap();
    assert!(third.degraded().is_empty());
}
