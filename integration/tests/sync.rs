//! The sync plane with real processes and real TLS on loopback: `moat-server` and
//! `moat-test-enforcer` (the real agent with a recording backend).

use std::collections::BTreeMap;
use std::time::Duration;

use moat_harness::moat::tls_args;
use moat_integration::bed::{
    Bed, NOT_SERVING, SERVING, WAIT, health_status, metric, moatctl, scrape, wait_until,
};
use moat_policy::ir::digest::Digest;

fn ops(bed: &Bed, node: &str) -> Vec<String> {
    bed.events(node)
        .iter()
        .map(|e| e["op"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// Every (version → digest) ever applied, across nodes: a version must never name two contents.
fn versions(bed: &Bed, nodes: &[&str], seen: &mut BTreeMap<(String, u64), Digest>) {
    for n in nodes {
        for e in bed.events(n) {
            let (Some(v), Some(d)) = (e["version"].as_u64(), e["digest"].as_str()) else {
                continue;
            };
            let d: Digest = d.parse().unwrap();
            if let Some(prev) = seen.insert((n.to_string(), v), d) {
                assert_eq!(prev, d, "{n}: version {v} reused for different content");
            }
        }
    }
}

#[test]
fn policy_changes_reach_exactly_the_affected_nodes() {
    let nodes = ["n1", "n2", "n3"];
    let mut bed = Bed::new(&nodes);
    bed.start_server();
    for n in nodes {
        bed.start_enforcer(n);
    }
    bed.wait_in_sync(&nodes);
    for n in nodes {
        assert_eq!(ops(&bed, n), ["adopt", "full"], "{n}");
    }
    let before = bed.expected();

    // A policy for a label only n2's and n3's pods carry: add web pods' policy on n2/n3 only.
    std::fs::write(
        bed.manifests().join("policy-web.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web-only-n23, namespace: app}\nspec:\n  podSelector:\n    matchExpressions: [{key: app, operator: In, values: [web]}]\n  ingress: [{}]\n",
    )
    .unwrap();
    let after = bed.expected();
    let changed: Vec<&str> = nodes
        .iter()
        .copied()
        .filter(|n| before[*n] != after[*n])
        .collect();
    assert_eq!(changed, ["n1", "n2", "n3"], "every node has a web pod");
    bed.wait_in_sync(&nodes);
    for n in nodes {
        assert_eq!(ops(&bed, n), ["adopt", "full", "delta"], "{n}");
    }

    // Now change only what db pods on every node see, but delete n1's db pod first: the
    // db policy change then reaches n2 and n3 only.
    let cluster = std::fs::read_to_string(bed.manifests().join("cluster.yaml")).unwrap();
    let start = cluster
        .find("---\napiVersion: v1\nkind: Pod\nmetadata: {name: db-n1")
        .unwrap();
    let end = start + 4 + cluster[start + 4..].find("---").unwrap();
    std::fs::write(
        bed.manifests().join("cluster.yaml"),
        format!("{}{}", &cluster[..start], &cluster[end..]),
    )
    .unwrap();
    bed.wait_in_sync(&nodes);
    let n1_events = bed.events("n1").len();
    let before = bed.expected();
    bed.write_policy("db", "6543");
    let after = bed.expected();
    let changed: Vec<&str> = nodes
        .iter()
        .copied()
        .filter(|n| before[*n] != after[*n])
        .collect();
    assert_eq!(changed, ["n2", "n3"]);
    bed.wait_in_sync(&nodes);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        bed.events("n1").len(),
        n1_events,
        "n1 must not receive anything"
    );
    for n in ["n2", "n3"] {
        assert_eq!(
            ops(&bed, n).last().map(String::as_str),
            Some("delta"),
            "{n}"
        );
    }
    let s = bed.status();
    for n in s["nodes"].as_array().unwrap() {
        assert_eq!(n["in_sync"], true, "{n}");
        assert_eq!(n["backend"], "record");
        assert_eq!(n["connected"], true);
        assert_eq!(n["applied_version"], n["latest_version"]);
        assert_eq!(n["cluster"], "default");
        assert!(n["last_error"].as_str().unwrap().is_empty());
    }
    let mut seen = BTreeMap::new();
    versions(&bed, &nodes, &mut seen);

    // The readable table, too.
    let (code, out, err) = bed.moatctl_admin(&["status"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("cluster default (dir:"), "{out}");
    assert!(out.contains("synced; generation"), "{out}");
    assert!(out.contains("\nCLUSTER  NODE"), "{out}");
    assert!(out.contains("3 of 3 nodes in sync"), "{out}");
}

#[test]
fn refuses_wrong_ca_expired_unknown_and_mismatched_nodes() {
    let mut bed = Bed::new(&["n1", "n2"]);
    bed.start_server();
    let certs = bed.certs();

    // A certificate from another CA.
    let other = bed.path("other-ca");
    assert_eq!(
        moatctl(&["certs", "init", "--dir", other.to_str().unwrap()]).0,
        0
    );
    assert_eq!(
        moatctl(&[
            "certs",
            "issue-node",
            "--dir",
            other.to_str().unwrap(),
            "--node",
            "n1"
        ])
        .0,
        0
    );
    for f in ["node-n1.pem", "node-n1-key.pem"] {
        std::fs::copy(other.join(f), certs.join(format!("foreign-{f}"))).unwrap();
    }
    bed.start_enforcer_as("n1", "n1", "foreign-node-n1");
    // A certificate that has expired.
    assert_eq!(
        moatctl(&[
            "certs",
            "issue-node",
            "--dir",
            certs.to_str().unwrap(),
            "--node",
            "n2",
            "--valid-for",
            "1s"
        ])
        .0,
        0
    );
    std::thread::sleep(Duration::from_secs(2));
    bed.start_enforcer("n2");
    wait_until("TLS refusals logged", WAIT, || {
        bed.server_stderr()
            .matches("refused a TLS connection")
            .count()
            >= 2
    });
    assert!(
        bed.applied("n1").is_none() && bed.applied("n2").is_none(),
        "nothing was served"
    );
    bed.kill_enforcer("n1");
    bed.kill_enforcer("n2");

    // A valid certificate for n1 whose enforcer claims to be n2: refused, and logged.
    bed.issue_node("n1", "90d");
    bed.issue_node("n2", "90d");
    bed.start_enforcer_as("n1", "n2", "node-n1");
    wait_until("wrong-node refusal", WAIT, || {
        bed.server_stderr()
            .contains("enforcer asked for another node's rules")
    });
    assert!(
        bed.enforcer_stderr("n1")
            .contains("this certificate is for node \\\"n1\\\", not \\\"n2\\\"")
            || bed.enforcer_stderr("n1").contains("not \"n2\"")
    );
    assert!(bed.applied("n1").is_none());
    bed.kill_enforcer("n1");

    // A node the source does not know (never existed, or deleted).
    bed.issue_node("ghost", "90d");
    bed.start_enforcer("ghost");
    wait_until("unknown-node refusal", WAIT, || {
        bed.server_stderr()
            .contains("the source does not know this node")
    });
    assert!(bed.applied("ghost").is_none());
    let m = scrape(bed.metrics);
    assert!(
        metric(&m, "moat_server_refused_total{reason=\"tls\"}") >= 2.0,
        "{m}"
    );
    assert!(
        metric(&m, "moat_server_refused_total{reason=\"wrong-node\"}") >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "moat_server_refused_total{reason=\"unknown-node\"}") >= 1.0,
        "{m}"
    );

    // A node deleted from the source loses its stream, but keeps enforcing its last rules.
    bed.kill_enforcer("ghost");
    bed.start_enforcer("n2");
    bed.wait_in_sync(&["n2"]);
    let applied = bed.applied("n2");
    let cluster = std::fs::read_to_string(bed.manifests().join("cluster.yaml")).unwrap();
    let start = cluster
        .find("---\napiVersion: v1\nkind: Node\nmetadata: {name: n2}")
        .unwrap();
    let end = start + 4 + cluster[start + 4..].find("---").unwrap();
    std::fs::write(
        bed.manifests().join("cluster.yaml"),
        format!("{}{}", &cluster[..start], &cluster[end..]),
    )
    .unwrap();
    wait_until("n2's stream closed", WAIT, || {
        bed.enforcer_stderr("n2")
            .contains("node removed from the cluster")
    });
    assert_eq!(
        bed.applied("n2"),
        applied,
        "fail-static: the last rules stay"
    );
}

#[test]
fn node_certificates_are_refused_on_the_admin_api() {
    let mut bed = Bed::new(&["n1"]);
    bed.start_server();
    let c = bed.certs();
    let server = format!("https://{}", bed.listen);
    let tls = tls_args(&c, "node-n1");
    let mut args = vec![
        "status",
        "--server",
        &server,
        "--tls-server-name",
        "localhost",
    ];
    args.extend(tls.iter().map(String::as_str));
    let (code, _, err) = moatctl(&args);
    assert_ne!(code, 0);
    assert!(
        err.contains("the admin API needs an admin certificate"),
        "{err}"
    );
    wait_until("logged", WAIT, || {
        bed.server_stderr()
            .contains("refused an admin call from a non-admin certificate")
    });
    // And an admin certificate can't sync.
    bed.start_enforcer_as("n1", "n1", "admin-ops");
    wait_until("admin refused on sync", WAIT, || {
        bed.server_stderr().contains("not a node certificate")
    });
}

#[test]
fn server_crash_keeps_rules_and_resumes_by_delta() {
    let nodes = ["n1", "n2"];
    let mut bed = Bed::new(&nodes);
    bed.start_server();
    for n in nodes {
        bed.start_enforcer(n);
    }
    bed.wait_in_sync(&nodes);
    let mut seen = BTreeMap::new();
    versions(&bed, &nodes, &mut seen);
    let before: Vec<_> = nodes.iter().map(|n| bed.applied(n).unwrap()).collect();

    // kill -9 mid-stream: enforcers keep their rules.
    bed.kill_server();
    std::thread::sleep(Duration::from_millis(1500));
    let during: Vec<_> = nodes.iter().map(|n| bed.applied(n).unwrap()).collect();
    assert_eq!(
        before, during,
        "no enforcement gap while the server is down"
    );
    for n in nodes {
        wait_until("enforcer notices", WAIT, || {
            bed.enforcer_stderr(n).contains("sync stream ended")
        });
    }

    // A change while the server is down, then a restart: deltas, never full snapshots.
    bed.write_policy("db", "7777");
    bed.start_server();
    bed.wait_in_sync(&nodes);
    for n in nodes {
        let o = ops(&bed, n);
        assert_eq!(o, ["adopt", "full", "delta"], "{n}: resumed by delta");
    }
    versions(&bed, &nodes, &mut seen);
    for (n, (v0, _)) in nodes.iter().zip(&before) {
        let (v1, _) = bed.applied(n).unwrap();
        assert!(v1 > *v0, "{n}: versions never go backwards ({v0} → {v1})");
    }

    // Restart again with nothing changed: nothing is re-sent.
    let counts: Vec<usize> = nodes.iter().map(|n| bed.events(n).len()).collect();
    bed.kill_server();
    bed.start_server();
    for n in nodes {
        wait_until("reconnected", WAIT, || {
            bed.node_status(n)["connected"] == true
        });
    }
    std::thread::sleep(Duration::from_millis(500));
    let after: Vec<usize> = nodes.iter().map(|n| bed.events(n).len()).collect();
    assert_eq!(
        counts, after,
        "a reconnect with nothing changed sends no rules"
    );
    let m = scrape(bed.metrics);
    assert_eq!(
        metric(&m, "moat_server_messages_total{kind=\"snapshot\"}"),
        0.0,
        "{m}"
    );
    versions(&bed, &nodes, &mut seen);
}

#[test]
fn enforcer_restart_resumes_from_local_state() {
    let mut bed = Bed::new(&["n1"]);
    bed.start_server();
    bed.start_enforcer("n1");
    bed.wait_in_sync(&["n1"]);
    let applied = bed.applied("n1").unwrap();
    bed.kill_enforcer("n1");
    bed.start_enforcer("n1");
    wait_until("reconnected", WAIT, || {
        bed.node_status("n1")["connected"] == true
    });
    std::thread::sleep(Duration::from_millis(500));
    let e = bed.events("n1");
    let last = e.last().unwrap();
    assert_eq!(last["op"], "adopt");
    assert_eq!(last["version"], applied.0, "adopted what it had applied");
    assert_eq!(
        ops(&bed, "n1"),
        ["adopt", "full", "adopt"],
        "nothing re-sent"
    );
    // And it keeps receiving changes, by delta.
    bed.write_policy("db", "1111");
    bed.wait_in_sync(&["n1"]);
    assert_eq!(ops(&bed, "n1").last().map(String::as_str), Some("delta"));
}

#[test]
fn a_nack_keeps_the_last_good_version_and_shows_in_status() {
    let nodes = ["n1", "n2", "n3"];
    let mut bed = Bed::new(&nodes);
    bed.start_server();
    for n in nodes {
        bed.start_enforcer(n);
    }
    bed.wait_in_sync(&nodes);
    let good = bed.applied("n3").unwrap();
    std::fs::write(bed.path("rec/n3/fail"), "map would overflow (test)").unwrap();
    bed.write_policy("db", "2222");
    bed.wait_in_sync(&["n1", "n2"]);
    wait_until("n3's NACK in status", WAIT, || {
        bed.node_status("n3")["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("map would overflow (test)")
    });
    let s = bed.node_status("n3");
    assert_eq!(s["in_sync"], false);
    assert_eq!(s["applied_version"], good.0);
    assert_eq!(
        bed.applied("n3"),
        Some(good),
        "the last good version stays in force"
    );

    let (code, out, err) = bed.moatctl_admin(&["status"], &["--policy", "app/db-from-web"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("enforced on 2 of 3 nodes"), "{out}");
    assert!(out.contains("n3: applied version"), "{out}");
    assert!(out.contains("map would overflow (test)"), "{out}");
    let (_, table, _) = bed.moatctl_admin(&["status"], &[]);
    assert!(table.contains("2 of 3 nodes in sync"), "{table}");

    // Once the dataplane accepts again, the next change brings n3 back.
    std::fs::remove_file(bed.path("rec/n3/fail")).unwrap();
    bed.write_policy("db", "2223");
    bed.wait_in_sync(&nodes);
    let (_, out, _) =
        bed.moatctl_admin(&["status"], &["--policy", "app/db-from-web", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["enforced"].as_u64(), v["needed"].as_u64()),
        (Some(3), Some(3)),
        "{v}"
    );
}

#[test]
fn health_and_metrics_report_enforcement_and_sync_separately() {
    let mut bed = Bed::new(&["n1"]);
    bed.start_server();
    bed.start_enforcer("n1");
    bed.wait_in_sync(&["n1"]);
    let health = bed.enforcers["n1"].health;
    let check = health_status;
    wait_until("enforcer healthy", WAIT, || {
        check(health, "") == SERVING && check(health, "moat.sync") == SERVING
    });
    assert_eq!(check(bed.health, ""), SERVING, "server synced");
    let m = scrape(bed.enforcers["n1"].metrics);
    assert!(metric(&m, "moat_enforcer_applied_total") >= 1.0, "{m}");
    assert!(m.contains("moat_enforcer_apply_seconds_bucket"), "{m}");
    let s = scrape(bed.metrics);
    assert_eq!(metric(&s, "moat_server_connected_enforcers"), 1.0, "{s}");
    assert!(
        metric(&s, "moat_server_sent_bytes_total{kind=\"snapshot\"}") > 0.0,
        "{s}"
    );
    assert!(s.contains("moat_server_compile_seconds_bucket"), "{s}");

    // Server outage: still enforcing (""), no longer known to be in sync ("moat.sync").
    bed.kill_server();
    wait_until("sync not serving", WAIT, || {
        check(health, "moat.sync") == NOT_SERVING
    });
    assert_eq!(
        check(health, ""),
        SERVING,
        "readiness holds during an outage"
    );
}

#[test]
fn plaintext_requires_the_loud_flag() {
    let mut bed = Bed::new(&["n1"]);
    bed.start_server_with(&["--insecure-dev-plaintext"]);
    assert!(
        bed.server_stderr()
            .contains("--insecure-dev-plaintext: NO TLS, NO AUTHENTICATION")
    );
    let (code, out, err) = moatctl(&[
        "status",
        "--server",
        &format!("http://{}", bed.listen),
        "--insecure-dev-plaintext",
        "-o",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"node\": \"n1\""), "{out}");
}

mod raw {
    //! A gRPC client that sends arbitrary bytes as messages.
    use bytes::{Buf, BufMut};
    use tonic::Status;
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

    #[derive(Default, Clone)]
    pub struct Raw;
    pub struct Enc;
    pub struct Dec;

    impl Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = Enc;
        type Decoder = Dec;
        fn encoder(&mut self) -> Enc {
            Enc
        }
        fn decoder(&mut self) -> Dec {
            Dec
        }
    }

    impl Encoder for Enc {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for Dec {
        type Item = Vec<u8>;
        type Error = Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            let v = src.chunk().to_vec();
            src.advance(v.len());
            Ok(Some(v))
        }
    }
}

async fn node_channel(bed: &Bed, base: &str) -> tonic::transport::Channel {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let c = bed.certs();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(c.join("ca.pem")).unwrap(),
        ))
        .identity(Identity::from_pem(
            std::fs::read(c.join(format!("{base}.pem"))).unwrap(),
            std::fs::read(c.join(format!("{base}-key.pem"))).unwrap(),
        ))
        .domain_name("localhost");
    Endpoint::from_shared(format!("https://{}", bed.listen))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Sends `messages` (raw bytes each) on a sync stream; returns the stream's final status.
async fn raw_sync(ch: tonic::transport::Channel, messages: Vec<Vec<u8>>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.unwrap();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/moat.sync.v1.PolicySync/Sync");
    // Keep the request stream open so the server, not end-of-input, ends the call.
    let stream =
        tokio_stream::StreamExt::chain(tokio_stream::iter(messages), tokio_stream::pending());
    match grpc
        .streaming(tonic::Request::new(stream), path, raw::Raw)
        .await
    {
        Err(s) => s,
        Ok(resp) => {
            let mut s = resp.into_inner();
            loop {
                match tokio::time::timeout(Duration::from_secs(10), s.message()).await {
                    Ok(Ok(Some(_))) => continue,
                    Ok(Ok(None)) => return tonic::Status::ok("stream ended"),
                    Ok(Err(e)) => return e,
                    Err(_) => return tonic::Status::deadline_exceeded("still open"),
                }
            }
        }
    }
}

#[test]
fn malformed_and_oversized_messages_only_end_their_own_stream() {
    use prost::Message;
    let nodes = ["n1", "n2"];
    // n3 has no enforcer: a valid Hello makes a stream its node's one live stream, so the
    // oversized message follows a Hello of n3's, not of a node whose stream must survive.
    let mut bed = Bed::new(&["n1", "n2", "n3"]);
    bed.start_server();
    for n in nodes {
        bed.start_enforcer(n);
    }
    bed.wait_in_sync(&nodes);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Not protobuf at all.
        let s = raw_sync(node_channel(&bed, "node-n1").await, vec![vec![0xff; 64]]).await;
        assert_ne!(s.code(), tonic::Code::Ok, "{s:?}");
        assert_ne!(s.code(), tonic::Code::DeadlineExceeded, "{s:?}");
        // A valid Hello followed by a message far over the size limit.
        let hello = moat_proto::v1::EnforcerMessage {
            kind: Some(moat_proto::v1::enforcer_message::Kind::Hello(
                moat_proto::v1::Hello {
                    backend: "raw".into(),
                    node: "n3".into(),
                    ..Default::default()
                },
            )),
        };
        let s = raw_sync(
            node_channel(&bed, "node-n3").await,
            vec![hello.encode_to_vec(), vec![0u8; 4 << 20]],
        )
        .await;
        assert_eq!(s.code(), tonic::Code::OutOfRange, "{s:?}");
        // A message out of protocol order.
        let ack = moat_proto::v1::EnforcerMessage {
            kind: Some(moat_proto::v1::enforcer_message::Kind::Ack(
                Default::default(),
            )),
        };
        let s = raw_sync(
            node_channel(&bed, "node-n1").await,
            vec![ack.encode_to_vec()],
        )
        .await;
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    });
    // The real enforcers never noticed: still connected, and still receiving changes.
    for n in nodes {
        assert_eq!(bed.node_status(n)["connected"], true, "{n}");
    }
    let m = scrape(bed.enforcers["n1"].metrics);
    assert_eq!(metric(&m, "moat_enforcer_reconnects_total"), 0.0, "{m}");
    bed.write_policy("db", "3333");
    bed.wait_in_sync(&nodes);
}

#[test]
fn server_certificate_rotation_keeps_streams() {
    let nodes = ["n1", "n2"];
    let mut bed = Bed::new(&nodes);
    bed.start_server();
    for n in nodes {
        bed.start_enforcer(n);
    }
    bed.wait_in_sync(&nodes);
    let old = std::fs::read(bed.certs().join("server.pem")).unwrap();
    let (code, _, err) = moatctl(&[
        "certs",
        "issue-server",
        "--dir",
        bed.certs().to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_ne!(std::fs::read(bed.certs().join("server.pem")).unwrap(), old);
    wait_until("reload", WAIT, || {
        bed.server_stderr().contains("TLS certificates reloaded")
    });
    // New connections see the new certificate…
    let served = served_cert(&bed);
    let new_der =
        rustls_pemfile::certs(&mut &std::fs::read(bed.certs().join("server.pem")).unwrap()[..])
            .next()
            .unwrap()
            .unwrap();
    assert_eq!(
        served,
        new_der.as_ref(),
        "new connections present the rotated certificate"
    );
    // …and the existing streams were never dropped.
    for n in nodes {
        let m = scrape(bed.enforcers[n].metrics);
        assert_eq!(
            metric(&m, "moat_enforcer_reconnects_total"),
            0.0,
            "{n}: {m}"
        );
    }
    bed.write_policy("db", "4444");
    bed.wait_in_sync(&nodes);
    assert_eq!(
        metric(&scrape(bed.metrics), "moat_server_connected_enforcers"),
        2.0
    );
}

/// The certificate the server presents to a new TLS connection.
fn served_cert(bed: &Bed) -> Vec<u8> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = bed.certs();
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut &std::fs::read(c.join("ca.pem")).unwrap()[..]) {
            roots.add(cert.unwrap()).unwrap();
        }
        let certs =
            rustls_pemfile::certs(&mut &std::fs::read(c.join("admin-ops.pem")).unwrap()[..])
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
        let key = rustls_pemfile::private_key(
            &mut &std::fs::read(c.join("admin-ops-key.pem")).unwrap()[..],
        )
        .unwrap()
        .unwrap();
        let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .unwrap();
        let tcp = tokio::net::TcpStream::connect(bed.listen).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0]
            .as_ref()
            .to_vec()
    })
}

#[test]
fn an_expiring_client_certificate_closes_the_stream_and_resumes_without_a_gap() {
    let mut bed = Bed::new(&["n1"]);
    bed.issue_node("n1", "4s");
    bed.start_server();
    bed.start_enforcer("n1");
    bed.wait_in_sync(&["n1"]);
    let applied = bed.applied("n1").unwrap();
    // Renewed on disk before it expires (what a cert manager does).
    bed.issue_node("n1", "90d");
    wait_until("expiry closes the stream", Duration::from_secs(20), || {
        bed.server_stderr()
            .contains("client certificate expired; closing the stream")
    });
    wait_until("reconnected with the new certificate", WAIT, || {
        metric(
            &scrape(bed.enforcers["n1"].metrics),
            "moat_enforcer_reconnects_total",
        ) >= 1.0
            && bed.node_status("n1")["connected"] == true
    });
    assert_eq!(bed.applied("n1"), Some(applied), "no enforcement gap");
    assert_eq!(
        ops(&bed, "n1"),
        ["adopt", "full"],
        "resumed without a resend"
    );
    bed.write_policy("db", "5555");
    bed.wait_in_sync(&["n1"]);
    assert_eq!(ops(&bed, "n1").last().map(String::as_str), Some("delta"));
}

#[test]
fn live_explain_answers_from_the_servers_state() {
    let mut bed = Bed::new(&["n1", "n2"]);
    bed.start_server();
    let (code, out, err) = bed.moatctl_admin(
        &[
            "explain",
            "--from",
            "app/web-n1",
            "--to",
            "app/db-n2",
            "--port",
            "5432",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("app/web-n1 (10.50.0.1) -> app/db-n2 (10.50.1.2) TCP/5432: ALLOWED"),
        "{out}"
    );
    assert!(
        out.contains("      app/db-from-web spec.ingress[0]\n"),
        "{out}"
    );
    // The live state follows the files.
    bed.write_policy("db", "6000");
    wait_until("live state updated", WAIT, || {
        let (_, out, _) = bed.moatctl_admin(
            &[
                "explain",
                "--from",
                "app/web-n1",
                "--to",
                "app/db-n2",
                "--port",
                "5432",
            ],
            &[],
        );
        out.contains("DENIED")
    });
    // Node certificates can't ask.
    let c = bed.certs();
    let server = format!("https://{}", bed.listen);
    let tls = tls_args(&c, "node-n1");
    let mut args = vec![
        "explain",
        "--from",
        "app/web-n1",
        "--to",
        "app/db-n2",
        "--server",
        &server,
        "--tls-server-name",
        "localhost",
    ];
    args.extend(tls.iter().map(String::as_str));
    let (code, _, err) = moatctl(&args);
    assert_ne!(code, 0);
    assert!(err.contains("admin certificate"), "{err}");
}

/// The file source judges every policy of the directory: an invalid ClusterNetworkPolicy is
/// refused, and `moatctl status --policy` names its file, object and field and says what
/// stays enforced; a valid one is accepted.
#[test]
fn a_refused_manifest_policy_says_why_in_its_status() {
    let nodes = ["n1"];
    let mut bed = Bed::new(&nodes);
    let cnp = |name: &str, priority: u32| {
        format!(
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  tier: Admin\n  priority: {priority}\n  subject: {{namespaces: {{}}}}\n  ingress:\n  - action: Deny\n    from: [{{namespaces: {{}}}}]\n"
        )
    };
    let write = |bed: &Bed, name: &str, priority: u32| {
        std::fs::write(
            bed.manifests().join(format!("{name}.yaml")),
            cnp(name, priority),
        )
        .unwrap()
    };
    write(&bed, "guard", 3);
    write(&bed, "bad", 5000);
    bed.start_server();
    bed.start_enforcer("n1");
    bed.wait_in_sync(&nodes);
    let status = |name: &str| {
        let (code, out, err) = bed.moatctl_admin(&["status"], &["--policy", name]);
        assert_eq!(code, 0, "{err}");
        out
    };
    let refused = |out: &str, kept: &str| {
        out.lines().any(|l| {
            l.starts_with("REFUSED (Invalid): ")
                && l.contains("ClusterNetworkPolicy bad: spec.priority: ")
                && l.ends_with(kept)
        })
    };

    let out = status("guard");
    assert!(out.lines().any(|l| l == "accepted"), "{out}");
    let out = status("bad");
    assert!(
        out.starts_with("ClusterNetworkPolicy bad: no valid version, enforced nowhere\n")
            && refused(&out, " — nothing enforced")
            && out.contains("bad.yaml: "),
        "{out}"
    );
    let (_, out, _) = bed.moatctl_admin(&["status"], &["--policy", "bad", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["acceptance"]["reason"], "Invalid", "{v}");
    let (_, out, _) = bed.moatctl_admin(&["status"], &[]);
    assert!(
        out.contains("warning: 1 refused policy") && out.contains("ClusterNetworkPolicy bad"),
        "{out}"
    );

    // Valid again: accepted and enforced.
    write(&bed, "bad", 4);
    wait_until("bad accepted", WAIT, || {
        status("bad").lines().any(|l| l == "accepted")
    });
    bed.wait_in_sync(&nodes);
    let enforced = bed.applied("n1");
    // Invalid after being valid: the last valid version stays, and the status says so.
    write(&bed, "bad", 5000);
    wait_until("bad refused again", WAIT, || {
        refused(&status("bad"), " — last valid version in force")
    });
    // Not `wait_in_sync`: the manifests now compile without the version the server keeps.
    bed.wait_served_in_sync(&nodes);
    assert_eq!(bed.applied("n1"), enforced);
    assert!(status("bad").contains("enforced on 1 of 1 nodes"));
}

/// `moatctl status --policy NAME` for a ClusterNetworkPolicy: needed where its subject's pods
/// run, enforced once those nodes hold a version compiled since its content.
#[test]
fn a_cluster_policy_status_counts_the_nodes_of_its_subject() {
    let nodes = ["n1", "n2", "n3"];
    let mut bed = Bed::new(&nodes);
    // Only the web pod of n2 is selected.
    std::fs::write(
        bed.manifests().join("guard.yaml"),
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: guard}\nspec:\n  tier: Admin\n  priority: 3\n  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}}\n  egress:\n  - action: Deny\n    to: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}}]\n",
    )
    .unwrap();
    let cluster = std::fs::read_to_string(bed.manifests().join("cluster.yaml")).unwrap();
    std::fs::write(
        bed.manifests().join("cluster.yaml"),
        cluster
            .replace(
                "name: web-n1, namespace: app, uid: uid-web-n1, labels: {app: web}",
                "name: web-n1, namespace: app, uid: uid-web-n1, labels: {app: other}",
            )
            .replace(
                "name: web-n3, namespace: app, uid: uid-web-n3, labels: {app: web}",
                "name: web-n3, namespace: app, uid: uid-web-n3, labels: {app: other}",
            ),
    )
    .unwrap();
    bed.start_server();
    for n in nodes {
        bed.start_enforcer(n);
    }
    bed.wait_in_sync(&nodes);
    let (code, out, err) = bed.moatctl_admin(&["status"], &["--policy", "guard"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("ClusterNetworkPolicy guard (generation"),
        "{out}"
    );
    assert!(out.contains("enforced on 1 of 1 nodes"), "{out}");
    let (_, out, _) = bed.moatctl_admin(&["status"], &["--policy", "guard", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["nodes"][0]["node"], "n2", "{v}");
    let (code, _, err) = bed.moatctl_admin(&["status"], &["--policy", "nope"]);
    assert_ne!(code, 0);
    assert!(err.contains("no ClusterNetworkPolicy nope"), "{err}");
}
