//! Fail closed, as operators see it: what a node denies instead of enforcing exactly — cut
//! by the server to fit a message, or reported by the node's dataplane — shown by `moatctl
//! status` (text and JSON, node strings escaped), per policy, and as a metric; and what a
//! policy is estimated to cost, shown and warned about. Real `moat-server` processes.

use std::time::Duration;

use moat_integration::bed::{Bed, WAIT, metric, scrape, wait_until};
use moat_proto::v1;
use moat_proto::v1::enforcer_message::Kind as Out;
use moat_proto::v1::server_message::Kind as In;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// A policy admitting `n` distinct /24s to the db pods: one rule, `n` groups.
fn write_block_policy(bed: &Bed, n: u32) {
    let mut y = String::from(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db-from-blocks, namespace: app}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress:\n  - from:\n",
    );
    for i in 0..n {
        y += &format!(
            "    - ipBlock: {{cidr: 10.{}.{}.0/24}}\n",
            100 + i / 256,
            i % 256
        );
    }
    std::fs::write(bed.manifests().join("policy-blocks.yaml"), y).unwrap();
}

fn node<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == name)
        .unwrap_or_else(|| panic!("no node {name} in {status}"))
}

fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| {
            format!(
                "{}/{} {}[{}]",
                p["namespace"].as_str().unwrap(),
                p["name"].as_str().unwrap(),
                p["direction"].as_str().unwrap(),
                p["rule"]
            )
        })
        .collect()
}

/// The recorded snapshot's endpoint with this address.
fn applied_endpoint(bed: &Bed, node: &str, addr: &str) -> Value {
    let raw = std::fs::read(bed.path(&format!("rec/{node}/applied.json"))).unwrap();
    let snap: Value = serde_json::from_slice(&raw).unwrap();
    snap["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["addrs"].as_array().unwrap().iter().any(|a| a == addr))
        .cloned()
        .unwrap_or_else(|| panic!("no endpoint {addr} in {snap}"))
}

#[test]
fn an_oversized_snapshot_is_degraded_by_the_server_shown_and_warned_about() {
    let nodes = ["n1", "n2"];
    let mut bed = Bed::new(&nodes);
    // 3,000 blocks: far more than 64 KiB as groups, far fewer than the default cost limit.
    write_block_policy(&bed, 3000);
    bed.start_server_with(&["--max-message-bytes", "65536", "--policy-cost-warn", "5000"]);
    for n in nodes {
        bed.start_enforcer(n);
    }
    let uncut = bed.expected();
    wait_until("both nodes degraded and in sync", WAIT, || {
        let s = bed.status();
        nodes.iter().all(|n| {
            let x = node(&s, n);
            x["in_sync"] == true && x["degraded"].as_array().is_some_and(|d| !d.is_empty())
        })
    });
    let s = bed.status();
    for (i, n) in nodes.iter().enumerate() {
        let x = node(&s, n);
        // The node enforces the served content, not what the index compiled.
        let (_, applied) = bed.applied(n).unwrap();
        assert_ne!(applied, uncut[*n], "{n} got the uncut snapshot");
        assert_eq!(x["applied_digest"], applied.to_string());
        let d = &x["degraded"].as_array().unwrap()[..];
        assert_eq!(d.len(), 1, "{x}");
        assert_eq!(d[0]["by"], "server");
        assert_eq!(d[0]["direction"], "ingress");
        assert!(
            d[0]["reason"]
                .as_str()
                .unwrap()
                .contains("65536-byte message limit"),
            "{}",
            d[0]["reason"]
        );
        // db's whole ingress list: both policies selecting it, mapped back by name.
        assert_eq!(
            names(&d[0]["policies"]),
            [
                "app/db-from-blocks ingress[0]",
                "app/db-from-web ingress[0]"
            ]
        );
        assert_eq!(d[0]["pods"], serde_json::json!([format!("app/db-{n}")]));
        assert_eq!(
            (
                d[0]["unmapped_rules"].as_u64(),
                d[0]["unmapped_endpoints"].as_u64()
            ),
            (Some(0), Some(0))
        );
        // Denied, not opened: db stays isolated with no rule; web keeps its exact rules.
        let db = applied_endpoint(&bed, n, &format!("10.50.{i}.2"));
        assert_eq!(db["ingress"]["isolated"], true, "{db}");
        assert_eq!(db["ingress"]["rules"], serde_json::json!([]), "{db}");
    }
    let m = scrape(bed.metrics);
    assert_eq!(metric(&m, "moat_server_nodes_degraded"), 2.0, "{m}");

    let (code, out, err) = bed.moatctl_admin(&["status"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 degraded"), "{out}");
    assert!(out.contains("DEGRADED"), "{out}");
    assert!(out.contains("ingress denied (cut by the server)"), "{out}");
    assert!(out.contains("app/db-from-blocks spec.ingress[0]"), "{out}");
    assert!(out.contains("pods: app/db-n1"), "{out}");

    // Per policy: where it is degraded, and what it is estimated to cost.
    let (code, out, err) = bed.moatctl_admin(&["status", "--policy", "app/db-from-blocks"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("degraded on 2 of 2 nodes"), "{out}");
    assert!(
        out.contains("above the server's --policy-cost-warn 5000"),
        "{out}"
    );
    let (code, out, err) = bed.moatctl_admin(
        &["status", "--policy", "app/db-from-blocks", "-o", "json"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let p: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(p["degraded_nodes"], 2);
    assert_eq!(p["cost_warn"], 5000);
    // 3,000 peers × 1 port + 3,000 groups + 1 address: an estimate from the index, per node.
    assert_eq!(p["estimated_elements"], 6001, "{p}");
    for n in p["nodes"].as_array().unwrap() {
        assert_eq!(n["estimated_elements"], 6001, "{n}");
        assert_eq!(n["degraded"][0]["by"], "server");
    }
    // The server log warned, once, naming the policy.
    let log = bed.server_stderr();
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("app/db-from-blocks") && l.contains("--policy-cost-warn"))
        .collect();
    assert_eq!(warned.len(), 1, "{log}");
    assert!(warned[0].contains("6001"), "{}", warned[0]);
    assert!(!log.contains("app/db-from-web is estimated"), "{log}");

    // Smaller again: exact everywhere, nothing degraded, no metric left behind.
    std::fs::remove_file(bed.manifests().join("policy-blocks.yaml")).unwrap();
    bed.wait_in_sync(&nodes);
    wait_until("degradation cleared", WAIT, || {
        let s = bed.status();
        nodes
            .iter()
            .all(|n| node(&s, n)["degraded"] == serde_json::json!([]))
    });
    let m = scrape(bed.metrics);
    assert_eq!(metric(&m, "moat_server_nodes_degraded"), 0.0, "{m}");
}

/// A sync stream as node `node` with its own certificate; the Hello is sent.
async fn open(
    bed: &Bed,
    node: &str,
) -> (
    mpsc::Sender<v1::EnforcerMessage>,
    tonic::Streaming<v1::ServerMessage>,
) {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let c = bed.certs();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(c.join("ca.pem")).unwrap(),
        ))
        .identity(Identity::from_pem(
            std::fs::read(c.join(format!("node-{node}.pem"))).unwrap(),
            std::fs::read(c.join(format!("node-{node}-key.pem"))).unwrap(),
        ))
        .domain_name("localhost");
    let ch = Endpoint::from_shared(format!("https://{}", bed.listen))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = v1::policy_sync_client::PolicySyncClient::new(ch);
    let (tx, rx) = mpsc::channel(4);
    tx.send(v1::EnforcerMessage {
        kind: Some(Out::Hello(v1::Hello {
            backend: "raw".into(),
            node: node.into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let s = client
        .sync(tonic::Request::new(ReceiverStream::new(rx)))
        .await
        .unwrap()
        .into_inner();
    (tx, s)
}

#[test]
fn what_a_node_reports_it_denies_shows_mapped_back_and_escaped() {
    let nodes = ["n1", "n2"];
    let mut bed = Bed::new(&nodes);
    bed.start_server();
    bed.start_enforcer("n2");
    let rt = tokio::runtime::Runtime::new().unwrap();
    // n1 speaks the protocol by hand: its dataplane "could not hold" db's ingress list.
    let (tx, _rx) = rt.block_on(async {
        let (tx, mut rx) = open(&bed, "n1").await;
        let msg = tokio::time::timeout(Duration::from_secs(10), rx.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let Some(In::Snapshot(snap)) = msg.kind else {
            panic!("first message is a snapshot: {msg:?}")
        };
        let content = snap.content.unwrap();
        let db = content
            .endpoints
            .iter()
            .find(|e| e.addrs == [vec![10, 50, 0, 2]])
            .expect("db-n1");
        let d = v1::Degradation {
            egress: false,
            rules: db.ingress.as_ref().unwrap().rules.clone(),
            endpoints: vec![db.id, 77],
            reason: "needs more than the 10 table elements\u{1b}[2J the dataplane can hold".into(),
        };
        tx.send(v1::EnforcerMessage {
            kind: Some(Out::Ack(v1::Ack {
                nonce: snap.nonce,
                applied: snap.version.clone(),
                apply_micros: 1,
                degraded: vec![d.clone()],
            })),
        })
        .await
        .unwrap();
        tx.send(v1::EnforcerMessage {
            kind: Some(Out::Report(v1::Report {
                enforcing: snap.version,
                degraded: vec![d],
                local: Some(v1::LocalPods {
                    known: 2,
                    unknown: 1,
                    unsupported: "pod veths on bridge cni0\nn9: forged line".into(),
                    unknown_pods: "deny".into(),
                }),
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        (tx, rx)
    });
    wait_until("n1 degraded with its local pods", WAIT, || {
        let s = bed.status();
        let x = node(&s, "n1");
        x["degraded"].as_array().is_some_and(|d| !d.is_empty()) && x["local"]["unknown"] == 1
    });
    let s = bed.status();
    let x = node(&s, "n1");
    assert_eq!(x["in_sync"], true, "{x}");
    let d = &x["degraded"][0];
    assert_eq!(d["by"], "node");
    assert_eq!(names(&d["policies"]), ["app/db-from-web ingress[0]"]);
    assert_eq!(d["pods"], serde_json::json!(["app/db-n1"]));
    // The endpoint the server does not know is counted, not guessed.
    assert_eq!(
        (d["endpoints"].as_u64(), d["unmapped_endpoints"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(x["local"]["known"], 2);
    assert_eq!(x["local"]["unknown_pods"], "deny");
    assert_eq!(node(&s, "n2")["degraded"], serde_json::json!([]));
    let m = scrape(bed.metrics);
    assert_eq!(metric(&m, "moat_server_nodes_degraded"), 1.0, "{m}");

    let (code, out, err) = bed.moatctl_admin(&["status"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains('\u{1b}'),
        "a node's string reached the terminal raw: {out:?}"
    );
    assert!(!out.contains("\nn9: forged"), "{out}");
    assert!(
        out.contains(
            "ingress denied (the node's dataplane): needs more than the 10 table elements\\u{1b}[2J"
        ),
        "{out}"
    );
    assert!(out.contains("app/db-from-web spec.ingress[0]"), "{out}");
    assert!(out.contains("pods: app/db-n1, 1 pods since gone"), "{out}");
    assert!(
        out.contains("n1: 2 known, 1 unknown (denied); source validation unsupported: pod veths on bridge cni0\\nn9: forged line"),
        "{out}"
    );
    let (code, out, err) = bed.moatctl_admin(&["status", "--policy", "app/db-from-web"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("degraded on 1 of 2 nodes"), "{out}");

    // The record survives a server restart (sled), before n1 is even back.
    drop(tx);
    bed.kill_server();
    bed.start_server();
    let x = bed.node_status("n1");
    assert_eq!(x["connected"], false, "{x}");
    assert_eq!(x["degraded"][0]["by"], "node", "{x}");
    let m = scrape(bed.metrics);
    assert_eq!(metric(&m, "moat_server_nodes_degraded"), 1.0, "{m}");
}

/// Two cluster policies of one tier with one priority: upstream leaves their order
/// undefined, so `moatctl status` says which order Moat took.
#[test]
fn equal_cluster_policy_priorities_are_warned_about_in_status() {
    let mut bed = Bed::new(&["n1"]);
    for name in ["first-guard", "second-guard"] {
        std::fs::write(
            bed.manifests().join(format!("{name}.yaml")),
            format!("apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  tier: Admin\n  priority: 7\n  subject: {{namespaces: {{}}}}\n  ingress:\n  - action: Deny\n    from: [{{namespaces: {{}}}}]\n"),
        )
        .unwrap();
    }
    bed.start_server();
    let (code, out, err) = bed.moatctl_admin(&["status"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("warning: ClusterNetworkPolicies")
            && out.contains("share Admin priority 7")
            && out.contains("first-guard")
            && out.contains("second-guard"),
        "{out}"
    );
    let s = bed.status();
    assert_eq!(
        s["clusters"][0]["warnings"].as_array().unwrap().len(),
        1,
        "{s}"
    );
}
