//! The Kubernetes source against the test API server (real HTTPS, the real kube client in
//! the real `moat-server`), with real enforcer processes (recording backend).

use std::time::Duration;

use moat_integration::bed::{
    Bed, NOT_SERVING, SERVING, WAIT, health_status, metric, moatctl, scrape, wait_until,
};
use moat_integration::kubeapi::{ApiServer, Kind, Options};

/// The watcher's lists of `path`: neither its watches nor the source's one-item probes of
/// whether the API server answers again. A probe goes out as soon as a watch fails (then
/// every 2 s), so a cut that surfaces as a watch error rather than a clean end sends one.
fn lists(api: &ApiServer, path: &str) -> usize {
    api.requests()
        .iter()
        .filter(|r| {
            r.contains(&format!("{path}?"))
                && !r.contains("watch=true")
                && !r.contains("&limit=1 ->")
        })
        .count()
}

/// [`Bed::served_from_kube`] with nothing prepared.
fn served(nodes: &[&str], extra: &[&str]) -> (Bed, ApiServer) {
    Bed::served_from_kube(nodes, extra, |_, _| {})
}

#[test]
fn first_full_sync_is_atomic_and_nothing_is_served_before_it() {
    let nodes = ["n1", "n2"];
    let mut bed = Bed::new(&nodes);
    let api = ApiServer::start(Options::default());
    api.hold_lists();
    let src = bed.kube_source(&api, "prod");
    bed.start_server_from(&src, &[], None);
    bed.start_enforcer("n1");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        bed.applied("n1"),
        None,
        "a node was served before the first full sync"
    );
    let s = bed.status();
    assert_eq!(s["synced"], false);
    assert_eq!(s["clusters"][0]["synced"], false);
    api.release_lists();
    bed.wait_in_sync(&["n1"]);
    let log = api.requests();
    // Forced pagination: the pods (4 of them) took two pages with a continue token.
    assert!(
        log.iter()
            .any(|r| r.starts_with("GET /api/v1/pods?") && r.contains("continue=")),
        "{log:#?}"
    );
    // One version for the whole initial state, not one per object.
    assert_eq!(bed.ops("n1"), ["adopt", "full"]);
}

#[test]
fn watch_events_flow_and_a_broken_watch_resumes_without_relisting() {
    let nodes = ["n1", "n2"];
    let (bed, api) = served(&nodes, &[]);
    bed.write_policy_to(&api, "db", "6432");
    bed.wait_in_sync(&nodes);
    let before = lists(&api, "/api/v1/pods");
    api.drop_connections();
    std::thread::sleep(Duration::from_secs(2));
    bed.write_policy_to(&api, "db", "7432");
    bed.wait_in_sync(&nodes);
    assert_eq!(
        lists(&api, "/api/v1/pods"),
        before,
        "the watch relisted instead of resuming"
    );
    let rewatch = api
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?") && r.contains("watch=true"))
        .count();
    assert!(rewatch >= 2, "no re-watch after the cut");
}

#[test]
fn gone_relists_without_transient_deletes_both_as_event_and_as_status() {
    let nodes = ["n1", "n2", "n3"];
    let (mut bed, api) = served(&nodes, &[]);
    let v_n1 = bed.applied("n1").unwrap();

    // Taken away; meanwhile n3's db pod goes and history is compacted.
    api.stop();
    std::thread::sleep(Duration::from_secs(1));
    assert!(api.delete(Kind::Pod, "app", "db-n3"));
    let y = std::fs::read_to_string(bed.manifests().join("cluster.yaml")).unwrap();
    let kept: Vec<&str> = y
        .split("---\n")
        .filter(|d| !d.contains("name: db-n3,"))
        .collect();
    std::fs::write(bed.manifests().join("cluster.yaml"), kept.join("---\n")).unwrap();
    api.compact();
    // And the relist's second page will find its continue token expired (HTTP 410).
    api.expire_next_continue();
    api.resume();
    bed.wait_in_sync(&nodes);
    let log = api.requests();
    assert!(log.iter().any(|r| r.contains("ERROR 410")), "{log:#?}");
    assert!(log.iter().any(|r| r.ends_with("-> 410")), "{log:#?}");
    // n1's content did not change: no new version, no delete-and-re-add on the way.
    assert_eq!(bed.applied("n1"), Some(v_n1));
    let out = bed.server.as_mut().unwrap().stdout_so_far();
    assert!(
        !out.iter().any(|l| l.starts_with("removed node=")),
        "{out:#?}"
    );
    assert!(
        !out.iter()
            .any(|l| l.starts_with("snapshot node=n1 ")
                && !l.contains(&format!("version={} ", v_n1.0))),
        "n1 got a new version during the relist: {out:#?}"
    );
}

#[test]
fn an_unreachable_api_server_leaves_the_last_state_served_and_shows_stale() {
    let nodes = ["n1"];
    let (bed, api) = served(&nodes, &[]);
    let applied = bed.applied("n1");
    api.stop();
    wait_until("stale in status", WAIT, || {
        bed.status()["clusters"][0]["stale"] == true
    });
    let m = scrape(bed.metrics);
    assert_eq!(
        metric(&m, "moat_server_source_up{cluster=\"default\"}"),
        0.0,
        "{m}"
    );
    let (code, table, _) = bed.moatctl_admin(&["status"], &[]);
    assert_eq!(code, 0);
    assert!(table.contains("STALE"), "{table}");
    // Still served: the node keeps its version and stays in sync.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(bed.applied("n1"), applied);
    assert_eq!(bed.node_status("n1")["in_sync"], true);
    api.resume();
    wait_until("fresh again", WAIT, || {
        bed.status()["clusters"][0]["stale"] == false
    });
    assert_eq!(
        metric(
            &scrape(bed.metrics),
            "moat_server_source_up{cluster=\"default\"}"
        ),
        1.0
    );
    bed.write_policy_to(&api, "db", "6543");
    bed.wait_in_sync(&nodes);
}

#[test]
fn streaming_lists_sync_the_same_state() {
    let nodes = ["n1", "n2"];
    let (bed, api) = served(&nodes, &["--kube-streaming-list"]);
    let log = api.requests();
    assert!(log.iter().any(|r| r.contains("sendInitialEvents=true")));
    assert_eq!(
        lists(&api, "/api/v1/pods"),
        0,
        "listed instead of streaming"
    );
    bed.write_policy_to(&api, "db", "6432");
    bed.wait_in_sync(&nodes);
}

/// A second bed-like cluster: nodes, pods and a policy, in its own API server.
fn cluster_yaml(nodes: &[&str], octet: u8) -> String {
    let mut y = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: app}\n");
    for (i, n) in nodes.iter().enumerate() {
        y += &format!(
            "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {n}}}\nstatus: {{addresses: [{{type: InternalIP, address: 192.168.{octet}.{}}}]}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web-{n}, namespace: app, labels: {{app: web}}}}\nspec: {{nodeName: {n}, containers: [{{name: c}}]}}\nstatus: {{phase: Running, podIPs: [{{ip: 10.{octet}.{i}.1}}]}}\n",
            i + 1
        );
    }
    y
}

fn policy_yaml(port: u16) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: web, namespace: app}}\nspec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  ingress: [{{ports: [{{port: {port}}}]}}]\n"
    )
}

fn applied_version(bed: &Bed, node: &str) -> u64 {
    bed.applied(node).map_or(0, |(v, _)| v)
}

/// Two clusters, `east` (node e1) and `west` (node w1), each in its own test API server with
/// a kubeconfig (contexts `east-admin`, `west-admin`), and node certificates for both.
fn east_and_west() -> (
    Bed,
    ApiServer,
    ApiServer,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let bed = Bed::new(&[]);
    let c = bed.certs();
    for (cluster, node) in [("east", "e1"), ("west", "w1")] {
        let (code, _, err) = moatctl(&[
            "certs",
            "issue-node",
            "--dir",
            c.to_str().unwrap(),
            "--cluster",
            cluster,
            "--node",
            node,
        ]);
        assert_eq!(code, 0, "{err}");
    }
    let east = ApiServer::start(Options::default());
    let west = ApiServer::start(Options::default());
    east.apply_yaml(&cluster_yaml(&["e1"], 61));
    west.apply_yaml(&cluster_yaml(&["w1"], 62));
    let (ke, kw) = (bed.path("east.kubeconfig"), bed.path("west.kubeconfig"));
    east.kubeconfig(&ke, "east-admin");
    west.kubeconfig(&kw, "west-admin");
    (bed, east, west, ke, kw)
}

#[test]
fn two_clusters_at_once_and_one_going_away_does_not_stall_the_other() {
    let (mut bed, east, west, ke, kw) = east_and_west();
    // West by flag with an explicit context; east from a clusters file.
    let file = bed.path("clusters.yaml");
    std::fs::write(
        &file,
        format!("clusters:\n- name: east\n  kubeconfig: {}\n", ke.display()),
    )
    .unwrap();
    let args = vec![
        "--cluster".to_string(),
        format!("west={}:west-admin", kw.display()),
        "--clusters-file".into(),
        file.display().to_string(),
    ];
    bed.start_server_from(&args, &[], None);
    bed.start_enforcer("e1");
    bed.start_enforcer("w1");
    wait_until("both clusters' nodes applied", WAIT, || {
        applied_version(&bed, "e1") > 0 && applied_version(&bed, "w1") > 0
    });
    let s = bed.status();
    let clusters: Vec<&str> = s["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(clusters.len(), 2);
    let (_, table, _) = bed.moatctl_admin(&["status"], &[]);
    assert!(table.contains("cluster east (kube:"), "{table}");
    assert!(table.contains("cluster west (kube:"), "{table}");

    // A policy in west changes w1 only: policies stay within their cluster.
    let (e0, w0) = (applied_version(&bed, "e1"), applied_version(&bed, "w1"));
    west.apply_yaml(&policy_yaml(8080));
    wait_until("w1 applies west's policy", WAIT, || {
        applied_version(&bed, "w1") > w0
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        applied_version(&bed, "e1"),
        e0,
        "east's node changed for west's policy"
    );

    // East goes away: west keeps flowing; east shows stale and its node keeps its rules.
    east.stop();
    wait_until("east stale", WAIT, || {
        bed.status()["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "east" && c["stale"] == true)
    });
    let w1 = applied_version(&bed, "w1");
    west.apply_yaml(&policy_yaml(9090));
    wait_until("w1 applies during east's outage", WAIT, || {
        applied_version(&bed, "w1") > w1
    });
    assert_eq!(applied_version(&bed, "e1"), e0);
    east.resume();
    east.apply_yaml(&policy_yaml(7070));
    wait_until("east flows again", WAIT, || {
        applied_version(&bed, "e1") > e0
    });
}

#[test]
fn bad_cluster_arguments_are_clear_errors() {
    let bed = Bed::new(&[]);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(moat_integration::binary("moat-server"))
            .args(args)
            .arg("--state-dir")
            .arg(bed.path("s"))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run(&["--cluster", "a=/nonexistent/kubeconfig", "--once"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/kubeconfig"), "{err}");
    let (ok, err) = run(&["--cluster", "a=/x", "--source", "dir:examples"]);
    assert!(!ok);
    assert!(err.contains("give every cluster that way"), "{err}");
    let (ok, err) = run(&["--cluster", "Bad_Name=/x"]);
    assert!(!ok);
    assert!(err.contains("bad cluster name"), "{err}");
    let kc = bed.path("k");
    std::fs::write(&kc, "not: [a kubeconfig").unwrap();
    let (ok, err) = run(&[
        "--cluster",
        &format!("a={}", kc.display()),
        "--cluster",
        &format!("a={}", kc.display()),
    ]);
    assert!(!ok);
    assert!(
        err.contains("given twice") || err.contains("kubeconfig"),
        "{err}"
    );
}

#[test]
fn a_cluster_unreachable_at_start_holds_back_only_itself() {
    let (mut bed, east, _west, ke, kw) = east_and_west();
    east.stop();
    let args = vec![
        "--cluster".to_string(),
        format!("east={}", ke.display()),
        "--cluster".into(),
        format!("west={}", kw.display()),
    ];
    bed.start_server_from(&args, &[], None);
    bed.start_enforcer("w1");
    wait_until("w1 served while east is down", WAIT, || {
        applied_version(&bed, "w1") > 0
    });
    assert_eq!(health_status(bed.health, "moat.cluster/west"), SERVING);
    assert_eq!(health_status(bed.health, "moat.cluster/east"), NOT_SERVING);
    assert_eq!(health_status(bed.health, ""), NOT_SERVING);
    let (_, table, _) = bed.moatctl_admin(&["status"], &[]);
    assert!(
        table.contains("cluster east (kube:") && table.contains("NOT SYNCED YET"),
        "{table}"
    );
    east.resume();
    wait_until("east synced", WAIT, || {
        health_status(bed.health, "") == SERVING
    });
    assert_eq!(health_status(bed.health, "moat.cluster/east"), SERVING);
}

/// The endpoint of the node's recorded snapshot holding `addr`, if any.
fn endpoint(bed: &Bed, node: &str, addr: &str) -> Option<serde_json::Value> {
    let raw = std::fs::read(bed.path(&format!("rec/{node}/applied.json"))).ok()?;
    let snap: serde_json::Value = serde_json::from_slice(&raw).ok()?;
    snap["endpoints"]
        .as_array()?
        .iter()
        .find(|e| {
            e["addrs"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == addr))
        })
        .cloned()
}

/// A db pod on n1 as the API server shows it: `phase`, its sandbox ready since `sandbox`.
fn db_pod(name: &str, ip: &str, phase: &str, sandbox: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "app", "labels": {"app": "db"}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"name": "main", "containerPort": 5432}]}]},
        "status": {
            "phase": phase,
            "podIPs": [{"ip": ip}],
            "conditions": [
                {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": sandbox},
                {"type": "ContainersReady", "status": if phase == "Running" { "True" } else { "False" }}
            ]
        }
    })
}

#[test]
fn a_pod_recreated_under_its_name_is_a_new_endpoint_and_a_pending_pod_is_enforced() {
    let (bed, api) = served(&["n1"], &[]);
    let before = endpoint(&bed, "n1", "10.50.0.2").expect("db-n1");
    let old_uid = api.get(Kind::Pod, "app", "db-n1").unwrap()["metadata"]["uid"].clone();

    // Deleted and created again under the same name and address: the API server gives it a
    // new UID, and its sandbox is new. The node must see another pod, not the same one.
    assert!(api.delete(Kind::Pod, "app", "db-n1"));
    api.apply(db_pod(
        "db-n1",
        "10.50.0.2",
        "Running",
        "2026-01-01T00:00:00Z",
    ));
    let new_uid = api.get(Kind::Pod, "app", "db-n1").unwrap()["metadata"]["uid"].clone();
    assert_ne!(old_uid, new_uid);
    wait_until("the recreated pod enforced", WAIT, || {
        endpoint(&bed, "n1", "10.50.0.2").is_some_and(|e| e["id"] != before["id"])
    });
    let after = endpoint(&bed, "n1", "10.50.0.2").unwrap();
    assert_ne!(
        after["sandbox"], 0,
        "the sandbox generation reached the node: {after}"
    );
    assert_ne!(after["sandbox"], before["sandbox"]);
    // Same policy, same rules: only the identity changed.
    assert_eq!(after["ingress"], before["ingress"]);

    // Pending with a node and an address, containers not started: its sandbox is up, so
    // traffic can reach it, so it is in the node's snapshot with its policy's rules.
    api.apply(db_pod(
        "db-pending",
        "10.50.0.9",
        "Pending",
        "2026-01-01T00:00:05Z",
    ));
    wait_until("the pending pod enforced", WAIT, || {
        endpoint(&bed, "n1", "10.50.0.9").is_some()
    });
    let pending = endpoint(&bed, "n1", "10.50.0.9").unwrap();
    assert_eq!(pending["ingress"]["isolated"], true, "{pending}");
    assert_eq!(pending["ingress"], after["ingress"], "{pending}");
}
