//! Faults and abuse on real processes (issue #13, items 5–8), each showing that legitimate
//! enforcers keep being served: garbage in every sled tree on both sides, TLS footguns
//! (cleartext URLs, plaintext on a network address, planted key-file links, node names that
//! are paths, overflowing lifetimes, terminal escapes from nodes), nodes deleted from the
//! source, a stolen node CA key, and the enforcer under the chart's seccomp profile.
//!
//! Tests named `in_netns_…` need root and run in a private network namespace (nextest group
//! `serial`).

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_harness::moat::tls_args;
use moat_integration::bed::{
    Bed, SERVING, WAIT, free_port, health_status, metric, moatctl, scrape, wait_until,
};
use moat_integration::binary;
use moat_integration::process::Proc;
use moat_integration::sled_fixture::SledFixture;
use serde_json::Value;

// ---------------------------------------------------------------------------------------
// Helpers

/// Runs `cmd` until it exits or `timeout` passes; `None` if it was still running (killed).
fn exits_within(cmd: &mut Command, timeout: Duration) -> Option<(i32, String)> {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut err = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return Some((st.code().unwrap_or(-1), reader.join().unwrap_or_default()));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts that `cmd` fails fast (exit code 2 for usage errors, 1 for runtime errors: not a
/// panic) with `needle` in its error output.
fn fails_with(what: &str, cmd: &mut Command, needle: &str) -> String {
    let (code, err) = exits_within(cmd, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("{what}: still running after 20 s; it must refuse"));
    assert!(
        code == 1 || code == 2,
        "{what}: exit code {code} (a panic is 101):\n{err}"
    );
    assert!(err.contains(needle), "{what}: {needle:?} not in:\n{err}");
    err
}

/// A listener that records every connection made to it, to show nothing was ever sent.
struct Trap {
    addr: std::net::SocketAddr,
    got: Arc<Mutex<Vec<u8>>>,
    connections: Arc<Mutex<usize>>,
}

impl Trap {
    fn new() -> Trap {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(Mutex::new(0));
        let (g, c) = (got.clone(), connections.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                *c.lock().unwrap() += 1;
                let g = g.clone();
                std::thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        g.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        Trap {
            addr,
            got,
            connections,
        }
    }
}

/// The server's sled trees, opened while the server is stopped.
fn server_db(bed: &Bed) -> SledFixture {
    SledFixture::open(&bed.path("state/server"))
}

fn skey(cluster: &str, node: &str) -> Vec<u8> {
    let mut k = cluster.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(node.as_bytes());
    k
}

fn ops(bed: &Bed, node: &str) -> Vec<String> {
    bed.events(node)
        .iter()
        .map(|e| e["op"].as_str().unwrap_or("?").to_string())
        .collect()
}

fn node_entry(status: &Value, node: &str) -> Option<Value> {
    status["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["node"] == node)
        .cloned()
}

/// Waits until the server's status says each node applied what the manifests compile to
/// (for enforcers without a recording backend); on time-out, shows `enforcer`'s log.
fn wait_status_in_sync(bed: &Bed, nodes: &[&str], enforcer: &mut Proc) {
    let want = bed.expected();
    let deadline = Instant::now() + WAIT;
    loop {
        let s = bed.status();
        let synced = nodes.iter().all(|n| {
            node_entry(&s, n).is_some_and(|e| {
                e["in_sync"] == true
                    && e["applied_digest"].as_str()
                        == want.get(*n).map(|d| d.to_string()).as_deref()
            })
        });
        if synced {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{nodes:?} never in sync: {s}\nenforcer:\n{}",
            enforcer.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the server has persisted the snapshot `node` acknowledged last (its status's
/// applied version), so a delta base survives what the test does next.
fn persisted(bed: &mut Bed, node: &str) {
    let v = status_version(bed, node);
    let tail = format!("node={node} version={v}");
    let server = bed.server.as_mut().expect("a server");
    wait_until(&format!("{node}'s version {v} persisted"), WAIT, || {
        server
            .stderr()
            .lines()
            .any(|l| l.contains("acknowledged snapshot persisted") && l.ends_with(&tail))
    });
}

fn status_version(bed: &Bed, node: &str) -> u64 {
    bed.node_status(node)["applied_version"]
        .as_u64()
        .unwrap_or(0)
}

/// Rewrites the bed's cluster without `node` (its Node object and its pods).
fn delete_node(bed: &Bed, node: &str) {
    let path = bed.manifests().join("cluster.yaml");
    let y = std::fs::read_to_string(&path).unwrap();
    let kept: Vec<&str> = y
        .split("---\n")
        .filter(|d| {
            !d.contains(&format!("name: {node}}}")) && !d.contains(&format!("nodeName: {node},"))
        })
        .collect();
    std::fs::write(&path, kept.join("---\n")).unwrap();
}

// ---------------------------------------------------------------------------------------
// Item 5: corrupt state never crash-loops

#[test]
fn a_corrupt_enforcer_record_keeps_the_dataplane_and_gets_a_full_snapshot() {
    let mut bed = Bed::new(&["n1"]);
    bed.start_server();
    bed.start_enforcer("n1");
    bed.wait_in_sync(&["n1"]);
    let before = bed.applied("n1").unwrap();
    bed.kill_enforcer("n1");
    bed.kill_server();
    {
        let db = SledFixture::open(&bed.path("state/n1"));
        db.insert(
            "applied",
            &b"\x0a\xff\xff\xff garbage where the record was"[..],
        )
        .unwrap();
        db.flush().unwrap();
    }
    let events_before = bed.events("n1").len();

    // No server: the restarted enforcer must neither exit nor touch what is enforced.
    bed.start_enforcer("n1");
    let e = &bed.enforcers["n1"];
    let health = e.health;
    wait_until("the enforcer's health endpoint", WAIT, || {
        health_status(health, "") >= 0
    });
    bed.enforcers
        .get_mut("n1")
        .unwrap()
        .proc
        .wait_stderr("was discarded", WAIT);
    std::thread::sleep(Duration::from_secs(1));
    let after_restart: Vec<Value> = bed.events("n1")[events_before..].to_vec();
    assert_eq!(after_restart.len(), 1, "{after_restart:?}");
    assert_eq!(after_restart[0]["op"], "adopt");
    assert_eq!(
        after_restart[0]["version"],
        Value::Null,
        "garbage must never be adopted"
    );
    assert_eq!(
        bed.applied("n1"),
        Some(before),
        "enforcement left as it was"
    );

    // The server is back: the enforcer named no version, so it gets a full snapshot.
    bed.start_server();
    // (The record on disk still matches, so "in sync" alone proves nothing here.)
    wait_until("a full snapshot", WAIT, || {
        ops(&bed, "n1").len() > events_before + 1
    });
    bed.wait_in_sync(&["n1"]);
    let after: Vec<String> = ops(&bed, "n1")[events_before..].to_vec();
    assert_eq!(after, ["adopt", "full"], "no remove_all, no delta");
    let m = scrape(bed.metrics);
    assert_eq!(
        metric(&m, "moat_server_messages_total{kind=\"snapshot\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "moat_server_messages_total{kind=\"current\"}"),
        0.0
    );
}

#[test]
fn a_server_survives_garbage_in_every_tree_and_never_reuses_a_version() {
    let nodes = ["n1", "n2"];
    let mut bed = Bed::new(&nodes);
    bed.start_server();
    for n in nodes {
        bed.start_enforcer(n);
    }
    bed.wait_in_sync(&nodes);
    bed.write_policy("db", "6543");
    bed.wait_in_sync(&nodes);
    for n in nodes {
        persisted(&mut bed, n);
    }
    bed.kill_server();
    let orphan_rule = [0xeeu8; 8];
    let orphan_group = [0xeeu8; 40];
    {
        let db = server_db(&bed);
        let status = db.open_tree("status").unwrap();
        status
            .insert(skey("default", "n1"), &b"\xff\xff\xff"[..])
            .unwrap();
        status.insert(&b"no separator"[..], &b"x"[..]).unwrap();
        let snaps = db.open_tree("snapshots").unwrap();
        let n2: Vec<_> = snaps
            .scan_prefix([skey("default", "n2"), vec![0]].concat())
            .keys()
            .map(Result::unwrap)
            .collect();
        assert!(!n2.is_empty(), "n2's acknowledged snapshots were stored");
        for k in n2 {
            snaps.insert(k, &b"\x0a\xff garbage"[..]).unwrap();
        }
        let mut stray = [skey("default", "n9"), vec![0]].concat();
        stray.extend_from_slice(&7u64.to_be_bytes());
        snaps.insert(stray, &b"\x12"[..]).unwrap();
        db.open_tree("rules")
            .unwrap()
            .insert(orphan_rule, &b"\xff"[..])
            .unwrap();
        db.open_tree("groups")
            .unwrap()
            .insert(orphan_group, &b"\xff"[..])
            .unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("someday", &b"\xff"[..])
            .unwrap();
        db.flush().unwrap();
    }

    bed.start_server();
    let server = bed.server.as_mut().unwrap();
    server.wait_stderr("skipping an unreadable node status", WAIT);
    server.wait_stderr("state store garbage collected", WAIT);
    assert!(
        server
            .stderr()
            .contains("dropping an unreadable stored snapshot")
    );
    bed.wait_in_sync(&nodes);
    // n1's status was lost, so its content got a new version number: that is its delta
    // base once the server has it.
    persisted(&mut bed, "n1");
    let (n1_events, n2_events) = (bed.events("n1").len(), bed.events("n2").len());
    bed.write_policy("db", "7654");
    bed.wait_in_sync(&nodes);
    assert_eq!(
        ops(&bed, "n1")[n1_events..],
        ["delta"],
        "n1's delta base is intact"
    );
    assert_eq!(
        ops(&bed, "n2")[n2_events..],
        ["full"],
        "n2's unreadable base costs it one full snapshot, nothing else"
    );
    assert_eq!(bed.node_status("n1")["in_sync"], true);
    let highest = bed
        .applied("n1")
        .unwrap()
        .0
        .max(bed.applied("n2").unwrap().0);
    persisted(&mut bed, "n1");
    bed.kill_server();
    {
        let db = server_db(&bed);
        assert!(
            db.open_tree("rules")
                .unwrap()
                .get(orphan_rule)
                .unwrap()
                .is_none()
        );
        assert!(
            db.open_tree("groups")
                .unwrap()
                .get(orphan_group)
                .unwrap()
                .is_none()
        );
        let snaps = db.open_tree("snapshots").unwrap();
        assert!(
            snaps.scan_prefix(skey("default", "n9")).next().is_none(),
            "the unreadable snapshot is gone"
        );
        let status = db.open_tree("status").unwrap();
        assert!(status.get(b"no separator").unwrap().is_none());
        assert!(
            status.get(skey("default", "n1")).unwrap().is_some(),
            "rewritten"
        );
    }

    // A reservation that cannot be read: the server refuses to start (it would reuse
    // versions), naming the way out.
    for bad in [&[1u8, 2, 3][..], &[0xff; 8][..]] {
        {
            let db = server_db(&bed);
            db.open_tree("meta")
                .unwrap()
                .insert("reserved", bad)
                .unwrap();
            db.flush().unwrap();
        }
        let c = bed.certs();
        let err = fails_with(
            "a server with an unreadable version reservation",
            Command::new(binary("moat-server"))
                .arg("--source")
                .arg(format!("dir:{}", bed.manifests().display()))
                .arg("--listen")
                .arg(free_port().to_string())
                .arg("--health-addr")
                .arg(free_port().to_string())
                .arg("--metrics-addr")
                .arg(free_port().to_string())
                .args(tls_args(&c, "server"))
                .arg("--state-dir")
                .arg(bed.path("state/server")),
            "version reservation",
        );
        assert!(err.contains("--first-version"), "{err}");
    }

    // The way out: a fresh directory and --first-version; versions continue above it, also
    // after a restart without the flag.
    std::fs::rename(bed.path("state/server"), bed.path("state/server.broken")).unwrap();
    let first = (highest + 100_000).to_string();
    bed.start_server_with(&["--first-version", &first]);
    bed.wait_in_sync(&nodes);
    wait_until("renamed above --first-version", WAIT, || {
        nodes
            .iter()
            .all(|n| status_version(&bed, n) > highest + 100_000)
    });
    bed.kill_server();
    bed.start_server();
    bed.write_policy("db", "8765");
    bed.wait_in_sync(&nodes);
    for n in nodes {
        assert!(status_version(&bed, n) > highest + 100_000, "{n}");
        assert!(bed.applied(n).unwrap().0 > highest + 100_000, "{n}");
    }
}

// ---------------------------------------------------------------------------------------
// Item 6: TLS footguns

#[test]
fn http_urls_with_tls_flags_are_refused_before_anything_is_sent() {
    let bed = Bed::new(&["n1"]);
    let trap = Trap::new();
    let plain = format!("http://{}", trap.addr);
    let token = bed.path("token");
    std::fs::write(&token, "TOKEN-SECRET-1234").unwrap();
    let node_tls = tls_args(&bed.certs(), "node-n1");
    let state = |n: &str| bed.path(&format!("state/{n}")).display().to_string();
    let enforcer = |bin: &str| {
        let mut c = Command::new(binary(bin));
        if bin == "moat-test-enforcer" {
            c.arg("--record-dir").arg(bed.path("rec"));
        }
        c.args(["--node", "n1", "--health-addr"])
            .arg(free_port().to_string())
            .arg("--metrics-addr")
            .arg(free_port().to_string())
            .env("NO_COLOR", "1");
        c
    };
    for bin in ["moat-test-enforcer", "moat-enforcer"] {
        fails_with(
            &format!("{bin} --server http:// with certificates"),
            enforcer(bin)
                .args(["--server", &plain])
                .args(&node_tls)
                .args(["--state-dir", &state("a")]),
            "use https://",
        );
    }
    fails_with(
        "bootstrap over http://",
        enforcer("moat-test-enforcer")
            .args(["--bootstrap-server", &plain, "--bootstrap-token-file"])
            .arg(&token)
            .args([
                "--tls-ca",
                &bed.certs().join("ca.pem").display().to_string(),
            ])
            .args(["--state-dir", &state("b")]),
        "--bootstrap-server http://",
    );
    fails_with(
        "plaintext enforcer with an https:// URL",
        enforcer("moat-test-enforcer")
            .args([
                "--insecure-dev-plaintext",
                "--server",
                "https://127.0.0.1:1",
            ])
            .args(["--state-dir", &state("c")]),
        "use http://",
    );
    fails_with(
        "bootstrap with plaintext",
        enforcer("moat-test-enforcer")
            .args(["--insecure-dev-plaintext", "--server", &plain])
            .args(["--bootstrap-server", &plain, "--bootstrap-token-file"])
            .arg(&token)
            .args(["--state-dir", &state("d")]),
        "cannot run with --insecure-dev-plaintext",
    );
    let admin = tls_args(&bed.certs(), "admin-ops");
    let (code, _, err) = moatctl(
        &[
            &["status", "--server", &plain][..],
            &admin.iter().map(String::as_str).collect::<Vec<_>>(),
        ]
        .concat(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("use https://"), "{err}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(*trap.connections.lock().unwrap(), 0, "nothing may connect");
    assert!(trap.got.lock().unwrap().is_empty());
}

#[test]
fn plaintext_on_a_network_address_needs_a_second_flag() {
    let bed = Bed::new(&["n1"]);
    let server = |listen: String, extra: &[&str]| {
        let mut c = Command::new(binary("moat-server"));
        c.arg("--source")
            .arg(format!("dir:{}", bed.manifests().display()))
            .args(["--listen", &listen, "--insecure-dev-plaintext"])
            .args(extra)
            .arg("--health-addr")
            .arg(free_port().to_string())
            .arg("--metrics-addr")
            .arg(free_port().to_string())
            .arg("--state-dir")
            .arg(bed.path("state/server"))
            .env("NO_COLOR", "1");
        c
    };
    let port = free_port().port();
    fails_with(
        "plaintext on 0.0.0.0",
        &mut server(format!("0.0.0.0:{port}"), &[]),
        "--insecure-dev-plaintext-non-loopback",
    );
    fails_with(
        "plaintext on ::",
        &mut server(format!("[::]:{port}"), &[]),
        "not a loopback address",
    );
    // Both flags: it runs, and says so loudly.
    let mut p = Proc::spawn(&mut server(
        format!("0.0.0.0:{port}"),
        &["--insecure-dev-plaintext-non-loopback"],
    ));
    p.until(WAIT, |l| l.starts_with("synced "));
    assert!(p.stderr().contains("NO TLS, NO AUTHENTICATION"));
}

/// Unmounts a bpffs mounted for a test (also on failure), before its directory goes.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn mount_bpffs(dir: &Path) -> Unmount {
    std::fs::create_dir_all(dir).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(ok.success(), "mounting a bpffs on {}", dir.display());
    Unmount(dir.to_path_buf())
}

#[test]
fn in_netns_a_node_name_that_is_a_path_never_reaches_the_bpffs() {
    if !moat_integration::netns::inside(
        "in_netns_a_node_name_that_is_a_path_never_reaches_the_bpffs",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bpffs = dir.path().join("bpffs");
    let _mounted = mount_bpffs(&bpffs);
    // Another node's pins and something outside Moat's directory: `--node ..` would make
    // `<bpffs>/moat/..` the bpffs itself, and uninstall delete it recursively.
    let other = bpffs.join("moat/other-node");
    let outside = bpffs.join("someone-else");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let state = dir.path().join("state");
    for (node, by_env) in [
        ("..", false),
        ("..", true),
        (".", false),
        ("moat/../..", false),
        ("", false),
        ("a/b", true),
    ] {
        let mut c = Command::new(binary("moat-enforcer"));
        c.args(["--backend", "nft", "--uninstall", "--bpffs"])
            .arg(&bpffs)
            .arg("--state-dir")
            .arg(&state);
        if by_env {
            c.env("MOAT_NODE", node);
        } else {
            c.args(["--node", node]);
        }
        fails_with(&format!("--node {node:?}"), &mut c, "not a valid name");
        assert!(
            other.is_dir() && outside.is_dir(),
            "--node {node:?} deleted pins"
        );
    }
    // The check sits in the dataplane too, whatever a caller passed.
    assert!(moat_enforcer_ebpf::remove_leftover(&bpffs, "..").is_err());
    assert!(other.is_dir() && outside.is_dir());
}

#[test]
fn key_files_are_never_written_through_planted_links_and_lifetimes_never_overflow() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Links where the keys go and where earlier versions put their temporary files, and a
    // world-readable file in a temporary file's place.
    for l in [
        "ca-key.pem",
        "ca-key.tmp",
        "server-key.tmp",
        "node-n1-key.pem",
    ] {
        std::os::unix::fs::symlink(&victim, certs.join(l)).unwrap();
    }
    std::fs::write(certs.join("node-n2-key.tmp"), "").unwrap();
    std::fs::set_permissions(
        certs.join("node-n2-key.tmp"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let d = certs.to_str().unwrap();
    let (code, _, err) = moatctl(&["certs", "init", "--dir", d]);
    assert_eq!(code, 0, "{err}");
    for n in ["n1", "n2"] {
        let (code, _, err) = moatctl(&["certs", "issue-node", "--dir", d, "--node", n]);
        assert_eq!(code, 0, "{err}");
    }
    let (code, _, err) = moatctl(&["certs", "init-node-ca", "--dir", d]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    for k in [
        "ca-key.pem",
        "server-key.pem",
        "node-n1-key.pem",
        "node-n2-key.pem",
        "node-ca-key.pem",
    ] {
        let meta = std::fs::symlink_metadata(certs.join(k)).unwrap();
        assert!(meta.file_type().is_file(), "{k} is a regular file");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{k}");
        let text = std::fs::read_to_string(certs.join(k)).unwrap();
        assert!(text.contains("PRIVATE KEY"), "{k}");
    }

    // Names are identities and file names: never a path.
    for (flag, bad) in [
        ("--node", ".."),
        ("--node", "../../escape"),
        ("--node", "N1"),
        ("--cluster", "a/b"),
    ] {
        let (code, _, err) = moatctl(&[
            "certs",
            "issue-node",
            "--dir",
            d,
            "--node",
            if flag == "--node" { bad } else { "n3" },
            "--cluster",
            if flag == "--cluster" { bad } else { "default" },
        ]);
        assert_eq!(code, 2, "{flag} {bad}: {err}");
        assert!(err.contains("not a valid name"), "{err}");
    }
    let (code, _, err) = moatctl(&["certs", "issue-admin", "--dir", d, "--name", ".."]);
    assert_eq!(code, 2, "{err}");
    assert!(!dir.path().join("escape-key.pem").exists() && !dir.path().join("escape.pem").exists());

    // Lifetimes: errors, never a panic (exit 101) or a wrapped expiry.
    for v in [
        "213503982334601d",
        "18446744073709551615s",
        "3000000d",
        "99999999999999999999d",
    ] {
        let (code, _, err) = moatctl(&[
            "certs",
            "issue-node",
            "--dir",
            d,
            "--node",
            "n4",
            "--valid-for",
            v,
        ]);
        assert_eq!(code, 2, "--valid-for {v}: {err}");
        assert!(err.contains("duration"), "{err}");
    }
    fails_with(
        "moat-server --bootstrap-cert-ttl overflowing",
        Command::new(binary("moat-server")).args(["--bootstrap-cert-ttl", "213503982334601d"]),
        "too long",
    );
}

#[test]
fn node_supplied_strings_cannot_drive_the_terminal() {
    let mut bed = Bed::new(&["n1"]);
    bed.start_server();
    bed.start_enforcer("n1");
    bed.wait_in_sync(&["n1"]);
    // The node's dataplane refuses the next version with a message made to clear the
    // screen, retitle the terminal and forge a status line.
    let evil =
        "\u{1b}[2J\u{1b}]0;pwned\u{7}\u{202e}EVIL\r\nn2      record  6.0  yes  9  9  yes  -  -";
    std::fs::write(bed.path("rec/n1/fail"), evil).unwrap();
    bed.write_policy("db", "6543");
    wait_until("the NACK in status", WAIT, || {
        bed.node_status("n1")["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("EVIL"))
    });
    for args in [
        &["status"][..],
        &["status", "--policy", "app/db-from-web"][..],
    ] {
        let (code, out, err) = bed.moatctl_admin(args, &[]);
        assert_eq!(code, 0, "{err}");
        for c in ['\u{1b}', '\r', '\u{7}', '\u{202e}'] {
            assert!(!out.contains(c), "{args:?} printed {c:?}:\n{out}");
        }
        assert!(out.contains("\\u{1b}[2J"), "{out}");
        assert!(out.contains("\\r\\nn2"), "{out}");
        assert!(
            !out.lines().any(|l| l.starts_with("n2 ")),
            "a forged line:\n{out}"
        );
    }
    // JSON carries the string as it is (escaped by JSON itself).
    assert!(
        bed.node_status("n1")["last_error"]
            .as_str()
            .unwrap()
            .contains('\u{1b}')
    );
}

// ---------------------------------------------------------------------------------------
// Item 7: deleted nodes leave

fn fleet_metric(bed: &Bed, state: &str) -> f64 {
    metric(
        &scrape(bed.metrics),
        &format!("moat_server_fleet_nodes{{cluster=\"default\",state=\"{state}\"}}"),
    )
}

#[test]
fn deleted_nodes_leave_the_status_the_store_and_the_metrics() {
    let nodes = ["n1", "n2", "n3"];
    let mut bed = Bed::new(&nodes);
    let grace = ["--deleted-node-grace", "3s"];
    bed.start_server_with(&grace);
    for n in nodes {
        bed.start_enforcer(n);
    }
    bed.wait_in_sync(&nodes);
    wait_until("fleet metric", WAIT, || {
        fleet_metric(&bed, "existing") == 3.0
    });

    delete_node(&bed, "n3");
    wait_until("n3 marked deleted", WAIT, || {
        node_entry(&bed.status(), "n3").is_some_and(|n| n["deleted_unix_micros"].as_u64() > Some(0))
    });
    let marked = Instant::now();
    wait_until("deleted metric", WAIT, || {
        fleet_metric(&bed, "deleted") == 1.0
    });
    let (code, table, err) = bed.moatctl_admin(&["status"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(table.contains("2 of 2 nodes in sync (1 deleted"), "{table}");
    assert!(table.contains("deleted "), "{table}");
    wait_until("n3 gone from the status", WAIT, || {
        node_entry(&bed.status(), "n3").is_none()
    });
    assert!(
        marked.elapsed() >= Duration::from_secs(2),
        "left after {:?}, before its grace period",
        marked.elapsed()
    );
    let m = scrape(bed.metrics);
    assert_eq!(metric(&m, "moat_server_nodes_forgotten_total"), 1.0, "{m}");
    assert_eq!(fleet_metric(&bed, "existing"), 2.0);
    assert_eq!(fleet_metric(&bed, "deleted"), 0.0);
    // n3's enforcer keeps knocking; that never brings it back.
    let refused = |b: &Bed| {
        metric(
            &scrape(b.metrics),
            "moat_server_refused_total{reason=\"unknown-node\"}",
        )
    };
    let knocks = refused(&bed);
    wait_until("n3's enforcer retries", WAIT, || refused(&bed) > knocks);
    assert!(node_entry(&bed.status(), "n3").is_none());

    // Nor does a restart: the store has forgotten it.
    bed.kill_server();
    {
        let db = server_db(&bed);
        assert!(
            db.open_tree("status")
                .unwrap()
                .get(skey("default", "n3"))
                .unwrap()
                .is_none()
        );
        let snaps = db.open_tree("snapshots").unwrap();
        assert!(
            snaps
                .scan_prefix([skey("default", "n3"), vec![0]].concat())
                .next()
                .is_none()
        );
    }
    // A node deleted while the server was down leaves after its grace period too.
    delete_node(&bed, "n2");
    bed.start_server_with(&grace);
    let s = bed.status();
    assert!(node_entry(&s, "n3").is_none(), "{s}");
    assert!(
        node_entry(&s, "n2").is_some_and(|n| n["deleted_unix_micros"].as_u64() > Some(0)),
        "{s}"
    );
    wait_until("n2 gone", WAIT, || {
        node_entry(&bed.status(), "n2").is_none()
    });
    bed.kill_server();
    bed.start_server_with(&grace);
    let s = bed.status();
    assert_eq!(s["nodes"].as_array().unwrap().len(), 1, "{s}");
    bed.wait_in_sync(&["n1"]);
}

// ---------------------------------------------------------------------------------------
// Item 8: least authority

/// A client certificate for `uri`, signed by the CA in `<dir>/<ca>.pem` / `<ca>-key.pem`
/// (as a thief holding that key would make it), written as `<dir>/<base>{,-key}.pem`.
fn mint(dir: &Path, ca: &str, issuer_cn: Option<&str>, uri: &str, base: &str) {
    let ca_key = rcgen::KeyPair::from_pem(
        &std::fs::read_to_string(dir.join(format!("{ca}-key.pem"))).unwrap(),
    )
    .unwrap();
    let issuer = match issuer_cn {
        // A look-alike of the main CA (same name) made with the stolen key.
        Some(cn) => {
            let mut p = rcgen::CertificateParams::default();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.distinguished_name
                .push(rcgen::DnType::OrganizationName, "Moat");
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            let ca_pem = p.self_signed(&ca_key).unwrap().pem();
            rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap()
        }
        None => rcgen::Issuer::from_ca_cert_pem(
            &std::fs::read_to_string(dir.join(format!("{ca}.pem"))).unwrap(),
            ca_key,
        )
        .unwrap(),
    };
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join(format!("{base}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{base}-key.pem")), key.serialize_pem()).unwrap();
}

#[test]
fn the_node_ca_vouches_for_nodes_on_the_sync_api_and_never_for_an_admin() {
    let mut bed = Bed::new(&["n1", "n2"]);
    let certs = bed.certs();
    let (code, _, err) = moatctl(&["certs", "init-node-ca", "--dir", certs.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let node_ca = certs.join("node-ca.pem").display().to_string();
    bed.start_server_with(&["--tls-node-ca", &node_ca]);
    // A node certificate from the node CA (what bootstrap issues), and one from the main CA.
    mint(
        &certs,
        "node-ca",
        None,
        "spiffe://moat/cluster/default/node/n1",
        "nodeca-n1",
    );
    bed.start_enforcer_as("n1", "n1", "nodeca-n1");
    bed.start_enforcer("n2");
    bed.wait_in_sync(&["n1", "n2"]);

    // With the node CA's key, an attacker mints admin certificates: refused, whatever they
    // are called, and logged.
    mint(
        &certs,
        "node-ca",
        None,
        "spiffe://moat/admin/root",
        "admin-stolen",
    );
    mint(
        &certs,
        "node-ca",
        Some("Moat CA"),
        "spiffe://moat/admin/root",
        "admin-lookalike",
    );
    for base in ["admin-stolen", "admin-lookalike"] {
        let mut args = vec![
            "status".to_string(),
            "--server".into(),
            format!("https://{}", bed.listen),
            "--tls-server-name".into(),
            "localhost".into(),
        ];
        args.extend(tls_args(&certs, base));
        let (code, out, err) = moatctl(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_ne!(code, 0, "{base} read the fleet:\n{out}");
        assert!(!out.contains("n1"), "{out}");
        assert!(
            // The handshake's refusal reaches the client as whichever of these the race
            // between the server's alert and its close produces.
            err.contains("node CA")
                || err.contains("transport error")
                || err.contains("connecting")
                || err.contains("operation was canceled"),
            "{base}: {err}"
        );
    }
    let m = scrape(bed.metrics);
    assert!(
        metric(&m, "moat_server_refused_total{reason=\"node-ca-on-admin\"}") >= 1.0,
        "{m}"
    );
    assert!(bed.server_stderr().contains("certificate of the node CA"));
    // The main CA's admin still works, and the node CA's node keeps being served.
    assert_eq!(bed.node_status("n1")["connected"], true);
    bed.write_policy("db", "6543");
    bed.wait_in_sync(&["n1", "n2"]);
}

// ---------------------------------------------------------------------------------------
// Item 8 (seccomp) with item 5 (a corrupt record on a real dataplane): the real enforcer,
// both backends, confined by the chart's seccomp profile exactly as a runtime applies it.

struct Confined {
    // Unmounted before the bed's directory goes.
    _mounted: Unmount,
    bed: Bed,
    bpffs: PathBuf,
}

impl Confined {
    fn new() -> Confined {
        let ok = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(ok.success());
        let mut bed = Bed::new(&["n1"]);
        let bpffs = bed.path("bpffs");
        let mounted = mount_bpffs(&bpffs);
        bed.start_server();
        Confined {
            bed,
            bpffs,
            _mounted: mounted,
        }
    }

    fn enforcer(&mut self, backend: &str, extra: &[&str]) -> Command {
        let profile = moat_integration::repo().join("charts/moat/files/seccomp-enforcer.json");
        let mut c = Command::new(binary("moat-seccomp-exec"));
        c.arg("--profile")
            .arg(profile)
            .arg("--")
            .arg(binary("moat-enforcer"))
            .args(["--backend", backend, "--node", "n1", "--bpffs"])
            .arg(&self.bpffs)
            .arg("--server")
            .arg(format!("https://{}", self.bed.listen))
            .args(["--tls-server-name", "localhost"])
            .args(tls_args(&self.bed.certs(), "node-n1"))
            .arg("--state-dir")
            .arg(self.bed.path("state/n1"))
            .args(["--backoff-max-seconds", "1", "--report-seconds", "1"])
            .args(extra)
            .env("NO_COLOR", "1")
            .env("MOAT_LOG", "info");
        c
    }

    fn start(&mut self, backend: &str) -> (Proc, std::net::SocketAddr) {
        let health = free_port();
        let metrics = free_port().to_string();
        let p = Proc::spawn(&mut self.enforcer(
            backend,
            &[
                "--health-addr",
                &health.to_string(),
                "--metrics-addr",
                &metrics,
            ],
        ));
        (p, health)
    }

    fn applied(&self) -> u64 {
        status_version(&self.bed, "n1")
    }
}

/// What the kernel enforces for n1: (backend's record of) the version.
fn kernel_version(c: &Confined, backend: &str) -> Option<u64> {
    if backend == "nft" {
        moat_enforcer_nft::nft::recorded().unwrap().map(|(v, _)| v)
    } else {
        moat_enforcer_ebpf::dataplane::pinned_meta(&c.bpffs, "n1")
            .unwrap()
            .filter(|m| m.flags & moat_enforcer_ebpf::META_VALID != 0)
            .map(|m| m.version)
    }
}

fn confined_enforcer_survives_a_corrupt_record(backend: &str) {
    let mut c = Confined::new();
    let (mut p, _) = c.start(backend);
    wait_status_in_sync(&c.bed, &["n1"], &mut p);
    c.bed.write_policy("db", "6543");
    wait_status_in_sync(&c.bed, &["n1"], &mut p);
    let v = c.applied();
    assert_eq!(kernel_version(&c, backend), Some(v));
    let err = p.stderr();
    assert!(
        !err.contains("Operation not permitted") && !err.contains("os error 1)"),
        "something the profile refuses:\n{err}"
    );
    drop(p);

    // Garbage over the record, server gone: the confined enforcer restarts, keeps the
    // kernel's rules exactly as they are, and stays up.
    c.bed.kill_server();
    {
        let db = SledFixture::open(&c.bed.path("state/n1"));
        db.insert("applied", &b"\xde\xad\xbe\xef"[..]).unwrap();
        db.flush().unwrap();
    }
    let (mut p, health) = c.start(backend);
    p.wait_stderr("was discarded", WAIT);
    wait_until("health", WAIT, || health_status(health, "") == SERVING);
    assert_eq!(
        kernel_version(&c, backend),
        Some(v),
        "enforcement kept as it was"
    );

    // The server is back: a full snapshot replaces it.
    c.bed.start_server();
    let snapshots = |b: &Bed| {
        metric(
            &scrape(b.metrics),
            "moat_server_messages_total{kind=\"snapshot\"}",
        )
    };
    // (The server's own record of the node is in sync already: wait for what it sends.)
    wait_until("a full snapshot", WAIT, || snapshots(&c.bed) >= 1.0);
    wait_status_in_sync(&c.bed, &["n1"], &mut p);
    wait_until("its ACK", WAIT, || {
        kernel_version(&c, backend) == Some(c.applied())
    });
    let m = scrape(c.bed.metrics);
    assert_eq!(
        metric(&m, "moat_server_messages_total{kind=\"snapshot\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(kernel_version(&c, backend), Some(c.applied()));
    let err = p.stderr();
    assert!(
        !err.contains("Operation not permitted"),
        "something the profile refuses:\n{err}"
    );
    drop(p);
    // Uninstall, confined too.
    let (code, err) =
        exits_within(&mut c.enforcer(backend, &["--uninstall"]), WAIT).expect("uninstall finishes");
    assert_eq!(code, 0, "{err}");
    assert_eq!(kernel_version(&c, backend), None);
}

#[test]
fn in_netns_the_nft_enforcer_runs_under_the_chart_seccomp_profile_and_survives_a_corrupt_record() {
    if !moat_integration::netns::inside(
        "in_netns_the_nft_enforcer_runs_under_the_chart_seccomp_profile_and_survives_a_corrupt_record",
    ) {
        return;
    }
    confined_enforcer_survives_a_corrupt_record("nft");
}

#[test]
fn in_netns_the_ebpf_enforcer_runs_under_the_chart_seccomp_profile_and_survives_a_corrupt_record() {
    if !moat_integration::netns::inside(
        "in_netns_the_ebpf_enforcer_runs_under_the_chart_seccomp_profile_and_survives_a_corrupt_record",
    ) {
        return;
    }
    confined_enforcer_survives_a_corrupt_record("ebpf");
}
