//! `moat-server` on the file source: first sync, live updates, invalid updates, deletions.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use moat_integration::process::Proc;
use moat_integration::{binary, copy_dir, repo};

const T: Duration = Duration::from_secs(20);

/// `snapshot node=X version=V digest=D …` → (X, (V, D)).
fn parse(line: &str) -> Option<(String, (u64, String))> {
    let rest = line.strip_prefix("snapshot ")?;
    let f: BTreeMap<&str, &str> = rest
        .split(' ')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    Some((
        f["node"].to_string(),
        (f["version"].parse().ok()?, f["digest"].to_string()),
    ))
}

/// The server on the file source; the sync side (plaintext here, port 0) is not under test.
fn server(dir: &std::path::Path, state: &std::path::Path) -> Proc {
    Proc::spawn(
        Command::new(binary("moat-server"))
            .arg("--source")
            .arg(format!("dir:{}", dir.display()))
            .args(["--poll-seconds", "1", "--insecure-dev-plaintext"])
            .args([
                "--listen",
                "127.0.0.1:0",
                "--health-addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .arg("--state-dir")
            .arg(state)
            .env("MOAT_LOG", "info")
            .env("NO_COLOR", "1"),
    )
}

#[test]
fn prints_snapshots_and_follows_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&repo().join("examples"), dir.path());
    let state = tempfile::tempdir().unwrap();
    let mut s = server(dir.path(), state.path());

    let first = s.line(T);
    assert_eq!(first, "synced generation=1 nodes=3");
    let mut versions: BTreeMap<String, (u64, String)> = (0..3)
        .map(|_| parse(&s.line(T)).expect("snapshot line"))
        .collect();
    assert_eq!(
        versions.keys().cloned().collect::<Vec<_>>(),
        ["node-1", "node-2", "node-3"]
    );

    // Tighten the database policy: only node-3 (the database's node) changes.
    let shop = dir.path().join("three-tier/shop.yaml");
    let text = std::fs::read_to_string(&shop).unwrap();
    std::fs::write(&shop, text.replace("- {port: 5432}\n", "- {port: 5433}\n")).unwrap();
    let lines = s.until(T, |l| l.starts_with("snapshot node=node-3"));
    let quiet = s.quiet_for(Duration::from_millis(2500));
    let changed: BTreeMap<_, _> = lines
        .iter()
        .chain(&quiet)
        .filter_map(|l| parse(l))
        .collect();
    // The backend's egress rule (5432 → 5433) is on node-2, the database ingress on node-3.
    assert_eq!(
        changed.keys().cloned().collect::<Vec<_>>(),
        ["node-2", "node-3"],
        "{lines:?} {quiet:?}"
    );
    for (n, (v, d)) in &changed {
        assert!(*v > versions[n].0, "{n}: version must grow");
        assert_ne!(*d, versions[n].1, "{n}: digest must change");
        versions.insert(n.clone(), (*v, d.clone()));
    }

    // An invalid update keeps the last valid version in force: no snapshot changes.
    let text = std::fs::read_to_string(&shop).unwrap();
    std::fs::write(&shop, text.replace("- {port: 5433}\n", "- {port: 70000}\n")).unwrap();
    s.wait_stderr("NetworkPolicy shop/database: spec.ingress[0].ports[0].port: 70000 is not a valid port number", T);
    let quiet = s.quiet_for(Duration::from_millis(2500));
    assert!(
        quiet.is_empty(),
        "an invalid update changed snapshots: {quiet:?}"
    );

    // Malformed YAML in the same file: still nothing changes (nothing fails open).
    std::fs::write(&shop, "this: [is not yaml\n").unwrap();
    s.wait_stderr("malformed YAML", T);
    assert!(s.quiet_for(Duration::from_millis(2500)).is_empty());

    // Removing a node's object removes its snapshot.
    let cluster = dir.path().join("cluster.yaml");
    let text = std::fs::read_to_string(&cluster).unwrap();
    let start = text
        .find("---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node-3")
        .expect("node-3 in cluster.yaml");
    let end = start + 4 + text[start + 4..].find("---").expect("next document");
    std::fs::write(&cluster, format!("{}{}", &text[..start], &text[end..])).unwrap();
    s.until(T, |l| l == "removed node=node-3");
}

#[test]
fn refuses_an_unreadable_directory() {
    let out = Command::new(binary("moat-server"))
        .args(["--source", "dir:/nonexistent/manifests"])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read manifest directory /nonexistent/manifests"),
        "{err}"
    );
    let out = Command::new(binary("moat-server"))
        .args(["--source", "http:prod"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("unknown source \"http:prod\": expected dir:PATH, kube")
    );
    let out = Command::new(binary("moat-server"))
        .args(["--source", "kube:/nonexistent/kubeconfig", "--once"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("reading kubeconfig /nonexistent/kubeconfig"),
        "{err}"
    );
}
