//! The sync stream's state machine against the real hub over loopback (plaintext dev mode,
//! so the test controls identities): one version in flight at a time, and a slow enforcer
//! gets the newest state, coalesced, never a queue of every intermediate version.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use moat_policy::model::{Namespace, Node, Object, Pod, Selector};
use moat_policy::{Event, Index};
use moat_proto::convert::{self, FromProto, ToProto};
use moat_proto::v1;
use moat_proto::v1::enforcer_message::Kind as Out;
use moat_proto::v1::server_message::Kind as In;
use moat_server::hub::{ClusterState, Hub};
use moat_server::metrics::Metrics;
use moat_server::source::SourceEvent;
use moat_server::status::Fleet;
use moat_server::store::Store;
use moat_server::sync::SyncService;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

fn pod(name: &str, app: &str, i: u8) -> Object {
    Object::Pod(Pod {
        namespace: "ns".into(),
        name: name.into(),
        labels: BTreeMap::from([("app".to_string(), app.to_string())]),
        node: Some("n1".into()),
        ips: vec![format!("10.0.0.{i}").parse().unwrap()],
        ports: vec![],
        host_network: false,
        terminal: false,
        uid: None,
        sandbox: None,
    })
}

fn policy() -> Object {
    Object::Policy(moat_policy::model::Policy {
        namespace: "ns".into(),
        name: "p".into(),
        pod_selector: Selector::everything(),
        ingress: Some(vec![moat_policy::model::Rule {
            peers: vec![moat_policy::model::Peer::Pods {
                namespaces: None,
                pods: Selector::everything(),
            }],
            ports: vec![],
        }]),
        egress: None,
    })
}

struct Setup {
    cluster: Arc<ClusterState>,
    fleet: Arc<Fleet>,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 4).unwrap();
    let fleet = Arc::new(Fleet::default());
    let cluster = ClusterState::new("c", 0);
    let hub = Hub::new(
        vec![cluster.clone()],
        fleet.clone(),
        store,
        Arc::new(Metrics::default()),
    );
    let objects = vec![
        Object::Node(Node {
            name: "n1".into(),
            addrs: vec![],
            labels: Default::default(),
        }),
        Object::Namespace(Namespace {
            name: "ns".into(),
            labels: Namespace::implicit_labels("ns"),
        }),
        pod("a", "x", 1),
        policy(),
    ];
    let changes = cluster.apply(SourceEvent::Reset(objects), |_| None);
    cluster.publish(&changes, &fleet);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_tx, shutdown) = watch::channel(false);
    std::mem::forget(_tx);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                SyncService::new(hub, shutdown, moat_server::sync::PeerAuth::Plaintext).svc(),
            )
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    Setup {
        cluster,
        fleet,
        addr,
        _dir: dir,
    }
}

async fn open(
    addr: std::net::SocketAddr,
    node: &str,
) -> (
    mpsc::Sender<v1::EnforcerMessage>,
    tonic::Streaming<v1::ServerMessage>,
) {
    open_enforcing(addr, node, None).await
}

/// [`open`] with a Hello that names the version the enforcer already enforces.
async fn open_enforcing(
    addr: std::net::SocketAddr,
    node: &str,
    enforcing: Option<v1::Version>,
) -> (
    mpsc::Sender<v1::EnforcerMessage>,
    tonic::Streaming<v1::ServerMessage>,
) {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = v1::policy_sync_client::PolicySyncClient::new(ch);
    let (tx, rx) = mpsc::channel(4);
    tx.send(v1::EnforcerMessage {
        kind: Some(Out::Hello(v1::Hello {
            backend: "test".into(),
            node: node.into(),
            enforcing,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut().insert(
        "x-moat-identity",
        moat_proto::Identity::node("c", node).uri().parse().unwrap(),
    );
    (tx, client.sync(req).await.unwrap().into_inner())
}

async fn next(s: &mut tonic::Streaming<v1::ServerMessage>) -> In {
    tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .expect("a message in time")
        .expect("no error")
        .expect("stream open")
        .kind
        .expect("kind")
}

async fn quiet(s: &mut tonic::Streaming<v1::ServerMessage>) {
    assert!(
        tokio::time::timeout(Duration::from_millis(300), s.message())
            .await
            .is_err(),
        "nothing more may arrive"
    );
}

#[tokio::test]
async fn one_in_flight_and_slow_enforcers_get_the_newest_state() {
    let s = setup().await;
    let (tx, mut rx) = open(s.addr, "n1").await;
    let In::Snapshot(first) = next(&mut rx).await else {
        panic!("first message is a full snapshot")
    };
    let v1 =
        moat_policy::ir::delta::VersionRef::from_proto(first.version.as_ref().unwrap()).unwrap();
    let snap1 = convert::snapshot_from_proto("n1", &v1, first.content.as_ref().unwrap()).unwrap();
    assert_eq!(snap1.content_digest(), v1.digest);

    // Five changes while the first version is unacknowledged: nothing else is sent yet.
    for i in 2..7u8 {
        let c = s.cluster.apply(
            SourceEvent::Batch(vec![Event::Apply(pod(&format!("p{i}"), "x", i))]),
            |_| None,
        );
        s.cluster.publish(&c, &s.fleet);
    }
    quiet(&mut rx).await;
    let latest = s.cluster.read(|i: &Index| i.snapshot("n1").unwrap());
    assert!(latest.version >= v1.version + 5);

    // Acknowledge: the next message is one delta straight to the newest version.
    tx.send(v1::EnforcerMessage {
        kind: Some(Out::Ack(v1::Ack {
            nonce: first.nonce.clone(),
            applied: Some(v1.to_proto()),
            apply_micros: 1,
            degraded: Vec::new(),
        })),
    })
    .await
    .unwrap();
    let In::Delta(dp) = next(&mut rx).await else {
        panic!("a delta")
    };
    let nonce = dp.nonce.clone();
    let d = convert::delta_from_proto(&dp).unwrap();
    assert_eq!(d.base, v1);
    assert_eq!(
        d.version.version, latest.version,
        "coalesced to the newest version"
    );
    let applied = moat_policy::ir::delta::apply(&snap1, &d).unwrap();
    assert_eq!(applied, latest);
    quiet(&mut rx).await;

    // A NACK keeps the enforcer where it was, and the same content is not offered again.
    tx.send(v1::EnforcerMessage {
        kind: Some(Out::Nack(v1::Nack {
            nonce,
            rejected: Some(d.version.to_proto()),
            error: "no room".into(),
            enforcing: Some(v1.to_proto()),
        })),
    })
    .await
    .unwrap();
    quiet(&mut rx).await;
    let view = s.fleet.view(Some("c"));
    assert!(view[0].last_error.contains("no room"), "{view:?}");
    assert!(!view[0].in_sync);

    // New content is offered again, as a delta from the version the enforcer kept.
    let c = s.cluster.apply(
        SourceEvent::Batch(vec![Event::Apply(pod("late", "x", 40))]),
        |_| None,
    );
    s.cluster.publish(&c, &s.fleet);
    let In::Delta(d2) = next(&mut rx).await else {
        panic!("a delta")
    };
    let d2 = convert::delta_from_proto(&d2).unwrap();
    assert_eq!(d2.base, v1, "from the version still in force");
}

/// An enforcer that applied the newest version and stopped before its ACK went out comes
/// back naming that version: the server has nothing to send it, and the fleet view must
/// still show the node in sync (it once waited forever for an ACK that could not come).
#[tokio::test]
async fn a_hello_naming_the_newest_version_counts_as_applied() {
    let s = setup().await;
    let status = |fleet: &Fleet| {
        let n = fleet
            .view(None)
            .into_iter()
            .find(|n| n.node == "n1")
            .unwrap();
        (n.applied_version, n.in_sync)
    };
    let (tx, mut rx) = open(s.addr, "n1").await;
    let In::Snapshot(first) = next(&mut rx).await else {
        panic!("first message is a full snapshot")
    };
    drop((tx, rx));
    let v = first.version.unwrap();
    assert_eq!(status(&s.fleet), (0, false), "never acknowledged");

    let (_tx, mut rx) = open_enforcing(s.addr, "n1", Some(v.clone())).await;
    quiet(&mut rx).await;
    assert_eq!(status(&s.fleet), (v.version, true));
}

#[tokio::test]
async fn a_second_hello_or_a_stray_ack_ends_the_stream() {
    let s = setup().await;
    let (tx, mut rx) = open(s.addr, "n1").await;
    let In::Snapshot(_) = next(&mut rx).await else {
        panic!()
    };
    tx.send(v1::EnforcerMessage {
        kind: Some(Out::Hello(Default::default())),
    })
    .await
    .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), rx.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // A node the source doesn't know.
    let (_tx, mut rx) = open(s.addr, "nobody").await;
    let e = tokio::time::timeout(Duration::from_secs(5), rx.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
}

#[test]
fn snapshot_messages_round_trip() {
    // Sanity: what the server would send for a node converts back exactly.
    let index = Index::build(vec![
        Object::Node(Node {
            name: "n1".into(),
            addrs: vec![],
            labels: Default::default(),
        }),
        pod("a", "x", 1),
        policy(),
    ]);
    let snap = index.snapshot("n1").unwrap();
    let v = moat_policy::ir::delta::VersionRef {
        version: snap.version,
        digest: snap.digest,
    };
    assert_eq!(
        convert::snapshot_from_proto("n1", &v, &snap.to_proto()).unwrap(),
        snap
    );
}
