use super::*;
use moat_policy::model::{Namespace, Node};

fn node(n: &str, addr: &str) -> Object {
    Object::Node(Node {
        name: n.into(),
        addrs: vec![addr.parse().unwrap()],
        labels: Default::default(),
    })
}

fn ns(n: &str) -> Object {
    Object::Namespace(Namespace {
        name: n.into(),
        labels: Namespace::implicit_labels(n),
    })
}

fn ok(o: Object) -> Converted {
    Converted {
        key: o.key(),
        result: Ok((o, vec![])),
        observed: None,
    }
}

fn bad(key: ObjectKey) -> Converted {
    Converted {
        key,
        result: Err(ValidationError {
            object: "x".into(),
            field: "spec".into(),
            message: "bad".into(),
        }),
        observed: None,
    }
}

/// A ClusterNetworkPolicy, through the real parser.
fn cnp(name: &str, priority: i64) -> Converted {
    let v = serde_json::json!({
        "metadata": {"name": name},
        "spec": {"tier": "Admin", "priority": priority, "subject": {"namespaces": {}},
                 "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}
    });
    let p: moat_policy::model::cnp_api::ClusterNetworkPolicy = serde_json::from_value(v).unwrap();
    Converted {
        key: ObjectKey::ClusterPolicy(name.into()),
        result: moat_policy::model::parse::cluster_network_policy(&p)
            .map(|p| (Object::ClusterPolicy(p.value), vec![])),
        observed: Some(Observed {
            name: name.into(),
            uid: None,
            generation: Some(1),
            condition: None,
        }),
    }
}

fn list(m: &mut Merger, kind: Kind, objects: Vec<Object>) {
    list_converted(m, kind, objects.into_iter().map(ok).collect());
}

fn list_converted(m: &mut Merger, kind: Kind, objects: Vec<Converted>) {
    m.take(kind, Item::Init);
    for c in objects {
        m.take(kind, Item::InitApply(c));
    }
    m.take(kind, Item::InitDone);
}

fn synced() -> Merger {
    let mut m = Merger::default();
    for k in KINDS {
        list(&mut m, k, vec![]);
    }
    assert!(matches!(m.flush(), Some(SourceEvent::Reset(_))));
    m
}

#[test]
fn nothing_before_every_kind_listed_then_one_reset() {
    let mut m = Merger::default();
    list(&mut m, Kind::Node, vec![node("n1", "10.0.0.1")]);
    list(&mut m, Kind::Namespace, vec![ns("a")]);
    list(&mut m, Kind::Pod, vec![]);
    m.absent(Kind::ClusterPolicy);
    assert!(m.flush().is_none());
    // A change before the sync lands in the reset, not in a batch.
    m.take(Kind::Node, Item::Apply(ok(node("n2", "10.0.0.2"))));
    assert!(m.flush().is_none());
    list(&mut m, Kind::Policy, vec![]);
    match m.flush() {
        Some(SourceEvent::Reset(o)) => assert_eq!(o.len(), 3),
        other => panic!("{other:?}"),
    }
    assert!(m.flush().is_none());
}

#[test]
fn the_first_sync_waits_for_the_crd_answer_and_holds_its_policies() {
    let mut m = Merger::default();
    for k in &KINDS[..4] {
        list(&mut m, *k, vec![]);
    }
    // Present but not listed yet: nothing is served without the admin tier.
    assert!(m.flush().is_none());
    list_converted(&mut m, Kind::ClusterPolicy, vec![cnp("a", 1)]);
    match m.flush() {
        Some(SourceEvent::Reset(o)) => assert_eq!(o.len(), 1),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_crd_installed_later_arrives_whole_and_its_removal_deletes() {
    let mut m = synced();
    m.take(Kind::ClusterPolicy, Item::Init);
    m.take(Kind::ClusterPolicy, Item::InitApply(cnp("a", 1)));
    // Half a list is no state to serve.
    assert!(m.flush().is_none());
    m.take(Kind::ClusterPolicy, Item::InitApply(cnp("b", 2)));
    m.take(Kind::ClusterPolicy, Item::InitDone);
    let Some(SourceEvent::Batch(ev)) = m.flush() else {
        panic!("no batch")
    };
    assert_eq!(ev.len(), 2);
    m.absent(Kind::ClusterPolicy);
    let Some(SourceEvent::Batch(ev)) = m.flush() else {
        panic!("no batch")
    };
    assert_eq!(ev.len(), 2);
    assert!(ev.iter().all(|e| matches!(e, Event::Delete(_))));
    assert!(
        m.acceptance
            .get(&ObjectKey::ClusterPolicy("a".into()))
            .is_none()
    );
    let forgotten = m
        .status
        .iter()
        .filter(|w| matches!(w, Work::Forget(_)))
        .count();
    assert_eq!(forgotten, 2);
}

#[test]
fn a_refused_policy_is_judged_and_keeps_its_last_valid_version() {
    let mut m = synced();
    let key = ObjectKey::ClusterPolicy("a".into());
    m.take(Kind::ClusterPolicy, Item::Apply(cnp("a", 1)));
    assert!(m.flush().is_some());
    assert!(m.acceptance.get(&key).unwrap().accepted());
    m.take(Kind::ClusterPolicy, Item::Apply(cnp("a", 5000)));
    assert!(m.flush().is_none(), "an invalid update changed the index");
    match m.acceptance.get(&key).unwrap() {
        Verdict::Refused {
            why,
            message,
            last_valid_in_force,
        } => {
            assert_eq!(why, Refusal::Invalid);
            assert!(message.contains("spec.priority"), "{message}");
            assert!(last_valid_in_force);
        }
        v => panic!("{v:?}"),
    }
    // Each judgement goes to the status writer with what the object said.
    let judged = m
        .status
        .iter()
        .filter(|w| matches!(w, Work::Judge { .. }))
        .count();
    assert_eq!(judged, 2);
    // Never valid: refused, nothing in force. Deleted: no verdict left.
    m.take(Kind::ClusterPolicy, Item::Apply(cnp("b", -1)));
    let b = ObjectKey::ClusterPolicy("b".into());
    assert!(matches!(
        m.acceptance.get(&b),
        Some(Verdict::Refused {
            last_valid_in_force: false,
            ..
        })
    ));
    // A relist without b drops its verdict too.
    list_converted(&mut m, Kind::ClusterPolicy, vec![cnp("a", 5000)]);
    assert!(m.acceptance.get(&b).is_none());
    assert!(m.acceptance.get(&key).is_some());
    m.take(Kind::ClusterPolicy, Item::Delete(key.clone()));
    assert!(m.acceptance.get(&key).is_none());
}

#[test]
fn a_relist_is_a_diff_without_transient_deletes() {
    let mut m = synced();
    list(
        &mut m,
        Kind::Node,
        vec![node("n1", "10.0.0.1"), node("n2", "10.0.0.2")],
    );
    m.flush();
    // Relist: n1 unchanged, n2 changed, n3 new, and (say) n4 would have been deleted.
    list(
        &mut m,
        Kind::Node,
        vec![
            node("n1", "10.0.0.1"),
            node("n2", "10.0.0.9"),
            node("n3", "10.0.0.3"),
        ],
    );
    let Some(SourceEvent::Batch(ev)) = m.flush() else {
        panic!("no batch")
    };
    assert_eq!(ev.len(), 2, "{ev:?}");
    assert!(ev.iter().all(|e| matches!(e, Event::Apply(_))));
    list(&mut m, Kind::Node, vec![node("n1", "10.0.0.1")]);
    let Some(SourceEvent::Batch(ev)) = m.flush() else {
        panic!("no batch")
    };
    assert_eq!(ev.len(), 2);
    assert!(ev.iter().all(|e| matches!(e, Event::Delete(_))));
}

#[test]
fn an_invalid_update_keeps_the_last_valid_version() {
    let mut m = synced();
    m.take(Kind::Node, Item::Apply(ok(node("n1", "10.0.0.1"))));
    m.flush();
    let key = ObjectKey::Node("n1".into());
    m.take(Kind::Node, Item::Apply(bad(key.clone())));
    assert!(m.flush().is_none());
    // Also across a relist: invalid now, so it is neither deleted nor changed.
    m.take(Kind::Node, Item::Init);
    m.take(Kind::Node, Item::InitApply(bad(key)));
    m.take(Kind::Node, Item::InitDone);
    assert!(m.flush().is_none());
    // An identical re-apply is no event either.
    m.take(Kind::Node, Item::Apply(ok(node("n1", "10.0.0.1"))));
    assert!(m.flush().is_none());
}
