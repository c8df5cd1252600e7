//! The control plane under abuse (issue #13, items 1–4): real `moat-server` and enforcer
//! processes, attackers as real processes and connections on loopback (their own source
//! addresses, 127.0.0.10 and up), and each time a legitimate enforcer that must still be
//! served within the issue's bounds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use moat_integration::abuse::{
    self, ack, attacker, bootstrap_args, bootstrap_bed, channel, flood, hello, issue, token,
};
use moat_integration::bed::{Bed, SERVING, WAIT, health_status, metric, read, scrape, wait_until};
use moat_integration::kubeapi::Options;
use moat_proto::v1;
use std::net::Ipv4Addr;

const LOCAL: Ipv4Addr = Ipv4Addr::LOCALHOST;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Restarts `node`'s enforcer and publishes a new version at once; returns how long until
/// the enforcer applied exactly what the manifests now compile to.
fn reconnect_and_update(bed: &mut Bed, node: &str, port: &str) -> Duration {
    bed.kill_enforcer(node);
    bed.write_policy("db", port);
    let t = Instant::now();
    bed.start_enforcer(node);
    let want = bed.expected()[node];
    wait_until("the new version applied", WAIT, || {
        bed.applied(node).map(|(_, d)| d) == Some(want)
    });
    t.elapsed()
}

/// Opens `n` sync streams for `node` with its certificate from `source`, over `n / 16 + 1`
/// connections, each sending its Hello and never reading; returns those the server took.
fn hello_only(rt: &tokio::runtime::Runtime, bed: &Bed, node: &str, n: usize) -> Vec<abuse::Opened> {
    let ca = read(&bed.certs().join("ca.pem"));
    let cert = read(&bed.certs().join(format!("node-{node}.pem")));
    let key = read(&bed.certs().join(format!("node-{node}-key.pem")));
    let addr = bed.listen;
    let node = node.to_string();
    rt.block_on(async move {
        let mut chans = Vec::new();
        for _ in 0..n / 16 + 1 {
            chans.push(
                channel(addr, &ca, Some((&cert, &key)), attacker(9))
                    .await
                    .expect("attacker connects with a valid certificate"),
            );
        }
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let ch = chans[i % chans.len()].clone();
                let node = node.clone();
                tokio::spawn(async move {
                    tokio::time::timeout(Duration::from_secs(10), hello(ch, &node)).await
                })
            })
            .collect();
        let mut opened = Vec::new();
        for t in tasks {
            if let Ok(Ok(Ok(o))) = t.await {
                opened.push(o);
            }
        }
        opened
    })
}

/// Log lines of the server mentioning refusals: bounded however many there were.
fn refusal_lines(bed: &mut Bed) -> usize {
    bed.server_stderr()
        .lines()
        .filter(|l| l.contains("refused") || l.contains("accept failing"))
        .count()
}

#[test]
fn idle_connections_at_the_descriptor_limit_and_hello_only_streams_leave_an_enforcer_served() {
    let mut bed = Bed::new(&["n1", "n2"]);
    // The descriptor limit the flood runs into: far below 15,000.
    bed.server_wrapper = ["prlimit", "--nofile=1024:1024", "--"]
        .map(String::from)
        .to_vec();
    // Per-source shares would turn three sources away long before the descriptor limit; open
    // them (and the handshake table) so the descriptor limit itself is what holds.
    bed.start_server_with(&[
        "--max-connections-per-source",
        "100000",
        "--max-handshakes-per-source",
        "100000",
        "--max-handshakes",
        "100000",
        "--ack-timeout",
        "3s",
    ]);
    bed.start_enforcer("n1");
    bed.wait_in_sync(&["n1"]);
    let err = bed.server_stderr();
    assert!(
        err.contains("--max-connections lowered to fit the file-descriptor limit")
            && err.contains("holding=896"),
        "{err}"
    );

    let floods: Vec<_> = (0..3)
        .map(|i| flood(bed.listen, attacker(i), 1, 5000, 60))
        .collect();
    let rt = rt();
    let streams = hello_only(&rt, &bed, "n2", 500);
    assert!(
        streams.len() >= 400,
        "only {} streams opened",
        streams.len()
    );

    // The server still answers its probes (descriptors were kept for them) …
    assert_eq!(health_status(bed.health, ""), SERVING);
    let m = scrape(bed.metrics);
    assert!(
        metric(
            &m,
            "moat_server_refused_total{reason=\"handshake-evicted\"}"
        ) > 1000.0,
        "the flood never reached the connection cap:\n{m}"
    );
    // … and a real enforcer reconnects and gets a new version within 5 s.
    let took = reconnect_and_update(&mut bed, "n1", "6432");
    assert!(took <= Duration::from_secs(5), "took {took:?}");

    // One certificate holds one stream: every hello-only stream but the newest was replaced,
    // and that one, never acknowledging, is closed after --ack-timeout.
    wait_until("the last hello-only stream timed out", WAIT, || {
        metric(
            &scrape(bed.metrics),
            "moat_server_disconnected_total{reason=\"ack-timeout\"}",
        ) >= 1.0
    });
    let m = scrape(bed.metrics);
    let replaced = metric(&m, "moat_server_disconnected_total{reason=\"replaced\"}");
    assert!(
        replaced >= streams.len() as f64 - 1.0,
        "{replaced} replaced of {}:\n{m}",
        streams.len()
    );
    assert!(
        metric(&m, "moat_server_connected_enforcers") <= 1.0,
        "only n1 is connected now:\n{m}"
    );
    assert_eq!(health_status(bed.health, ""), SERVING);
    let lines = refusal_lines(&mut bed);
    assert!(lines < 200, "{lines} refusal log lines: not rate-limited");
    eprintln!(
        "reconnect + new version in {took:?}; {} hello-only streams, {replaced} replaced; evicted {}, accept errors {}, {lines} refusal log lines",
        streams.len(),
        metric(
            &m,
            "moat_server_refused_total{reason=\"handshake-evicted\"}"
        ),
        metric(&m, "moat_server_accept_errors_total"),
    );
    drop(floods);
    drop(streams);
}

#[test]
fn a_flood_from_three_addresses_is_refused_at_their_share() {
    let mut bed = Bed::new(&["n1"]);
    bed.start_server();
    bed.start_enforcer("n1");
    bed.wait_in_sync(&["n1"]);
    let floods: Vec<_> = (0..3)
        .map(|i| flood(bed.listen, attacker(3 + i), 1, 5000, 30))
        .collect();
    wait_until("the flood refused", WAIT, || {
        metric(
            &scrape(bed.metrics),
            "moat_server_refused_total{reason=\"source-handshakes\"}",
        ) > 5000.0
    });
    // The enforcer's own stream was never disturbed, and a reconnect is served at once.
    let m = scrape(bed.enforcers["n1"].metrics);
    assert_eq!(metric(&m, "moat_enforcer_reconnects_total"), 0.0, "{m}");
    let took = reconnect_and_update(&mut bed, "n1", "6432");
    assert!(took <= Duration::from_secs(5), "took {took:?}");
    let m = scrape(bed.metrics);
    assert_eq!(
        metric(
            &m,
            "moat_server_refused_total{reason=\"handshake-evicted\"}"
        ),
        0.0,
        "three sources never fill the table:\n{m}"
    );
    let lines = refusal_lines(&mut bed);
    assert!(lines < 100, "{lines} refusal log lines: not rate-limited");
    drop(floods);
}

/// A JWT with the enforcer's claims and a signature nobody made: it passes every check a
/// token's own claims allow, so only the rate limit stands between it and a TokenReview.
fn forged() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "aud": ["moat"], "exp": now + 600, "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": format!("system:serviceaccount:{}:{}", abuse::NS, abuse::SA),
        "kubernetes.io": {"namespace": abuse::NS, "pod": {"name": "moat-enforcer-n1", "uid": "0"}},
    });
    format!(
        "{}.{}.{}",
        B64.encode(br#"{"alg":"ES256","kid":"moat-test"}"#),
        B64.encode(serde_json::to_vec(&claims).unwrap()),
        B64.encode(rand::random::<[u8; 64]>())
    )
}

#[test]
fn a_thousand_garbage_bootstrap_requests_do_not_starve_an_enforcer() {
    // Each TokenReview takes 200 ms, as on a busy API server.
    let (bed, api, bootstrap) = bootstrap_bed(
        &["n1"],
        "1h",
        Options {
            review_delay: Duration::from_millis(200),
            ..Options::default()
        },
        &[],
    );
    let ca = read(&bed.certs().join("ca.pem"));
    let legit = token(&api, "n1");
    let rt = rt();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    // 1,000 requests in flight at all times from ten addresses (four connections each):
    // random bytes, and forgeries.
    let garbage = {
        let (stop, sent, ca) = (stop.clone(), sent.clone(), ca.clone());
        rt.spawn(async move {
            let csr = rcgen::CertificateParams::default()
                .serialize_request(&rcgen::KeyPair::generate().unwrap())
                .unwrap()
                .pem()
                .unwrap();
            let mut tasks = Vec::new();
            for s in 0..10u8 {
                for _ in 0..4 {
                    let ch = channel(bootstrap, &ca, None, attacker(20 + s))
                        .await
                        .expect("attacker connects");
                    for i in 0..25 {
                        let (stop, sent, ch, csr) =
                            (stop.clone(), sent.clone(), ch.clone(), csr.clone());
                        tasks.push(tokio::spawn(async move {
                            let mut c = v1::bootstrap_client::BootstrapClient::new(ch);
                            while !stop.load(Ordering::Relaxed) {
                                let token = if i % 2 == 0 {
                                    forged()
                                } else {
                                    B64.encode(rand::random::<[u8; 48]>())
                                };
                                let _ = c
                                    .issue(v1::IssueRequest {
                                        cluster: "default".into(),
                                        node: "n1".into(),
                                        token,
                                        csr_pem: csr.clone(),
                                    })
                                    .await;
                                sent.fetch_add(1, Ordering::Relaxed);
                            }
                        }));
                    }
                }
            }
            for t in tasks {
                let _ = t.await;
            }
        })
    };
    wait_until("the flood under way", WAIT, || {
        sent.load(Ordering::Relaxed) >= 1000
    });
    let mut took = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let key = rcgen::KeyPair::generate().unwrap();
        rt.block_on(issue(bootstrap, &ca, LOCAL, "n1", &legit, &key))
            .expect("the enforcer's own request is refused");
        took.push(t.elapsed());
        // Within the enforcer's own address's budget (a burst of 10, then 1 a second).
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, Ordering::Relaxed);
    rt.block_on(garbage).unwrap();
    took.sort();
    // p99 of 20 (nearest rank): the slowest.
    let p99 = took[19];
    assert!(p99 <= Duration::from_secs(5), "p99 {p99:?} ({took:?})");
    let sent = sent.load(Ordering::Relaxed);
    let reviews = api
        .requests()
        .iter()
        .filter(|l| l.contains("tokenreviews"))
        .count();
    let m = scrape(bed.metrics);
    // Garbage never reaches the API server; forgeries only at each address's rate.
    assert!(
        reviews * 10 < sent,
        "{reviews} TokenReviews for {sent} requests:\n{m}"
    );
    assert!(
        metric(
            &m,
            "moat_server_refused_total{reason=\"bootstrap-malformed-token\"}"
        ) > 100.0,
        "{m}"
    );
    assert!(
        metric(&m, "moat_server_refused_total{reason=\"bootstrap-rate\"}") > 100.0,
        "{m}"
    );
    eprintln!("legit p99 {p99:?}; {sent} garbage requests, {reviews} TokenReviews");
}

#[test]
fn a_renewal_extends_only_the_stream_on_the_renewed_key() {
    let (mut bed, api, bootstrap) = bootstrap_bed(&["n1", "n2"], "60s", Options::default(), &[]);
    let ca = read(&bed.certs().join("ca.pem"));
    let rt = rt();
    // n2's enforcer bootstraps 60-second certificates and renews them (same key) at 40 s.
    let file = bed.path("token-n2");
    std::fs::write(&file, token(&api, "n2")).unwrap();
    let args = bootstrap_args(&bed, bootstrap, &file);
    bed.start_enforcer_args("n2", "n2", &args);
    bed.wait_in_sync(&["n2"]);
    let n2_since = Instant::now();
    // (Attempts before the first certificate landed end before a stream exists.)
    let stream_ends = |e: &str| e.matches("sync stream ended").count();
    let n2_ended = stream_ends(&bed.enforcer_stderr("n2"));

    // A certificate of n1 for a key n1 no longer uses (stolen from its previous run). While it
    // is n1's newest, its stream is n1's stream.
    let stolen_key = rcgen::KeyPair::generate().unwrap();
    let stolen = rt
        .block_on(issue(
            bootstrap,
            &ca,
            LOCAL,
            "n1",
            &token(&api, "n1"),
            &stolen_key,
        ))
        .unwrap();
    let thief = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            let ch = channel(
                bed.listen,
                &ca,
                Some((stolen.as_bytes(), stolen_key.serialize_pem().as_bytes())),
                attacker(40),
            )
            .await
            .expect("TLS with the stolen certificate");
            hello(ch, "n1").await
        })
    };
    let (tx, mut inbound) = thief(&rt).expect("the stolen certificate's first stream");
    let first = rt.block_on(inbound.message()).unwrap().unwrap();
    rt.block_on(tx.send(ack(&first))).unwrap();
    wait_until("n1 in sync through the stolen certificate", WAIT, || {
        bed.node_status("n1")["in_sync"] == true
    });

    // n1's restarted enforcer gets a certificate for its new key (certificate times are whole
    // seconds: one later than the stolen one's).
    std::thread::sleep(Duration::from_millis(1100));
    let new_key = rcgen::KeyPair::generate().unwrap();
    rt.block_on(issue(
        bootstrap,
        &ca,
        LOCAL,
        "n1",
        &token(&api, "n1"),
        &new_key,
    ))
    .unwrap();
    // The thief's stream ends at once (a renewal of another key never extends it) …
    let ended = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), inbound.message()).await })
        .expect("the stolen certificate's stream outlived the newer certificate");
    match ended {
        Err(s) => assert!(s.message().contains("newer certificate"), "{s:?}"),
        Ok(m) => panic!("the stream went on: {m:?}"),
    }
    // … cannot come back …
    match thief(&rt) {
        Err(s) => {
            assert_eq!(s.code(), tonic::Code::PermissionDenied);
            assert!(s.message().contains("newer certificate"), "{s:?}");
        }
        Ok(_) => panic!("a stream on the superseded certificate was accepted"),
    }
    // … and never makes n1 look in sync with a newer version.
    bed.write_policy_to(&api, "db", "6432");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(bed.node_status("n1")["in_sync"], false);

    // n1's real enforcer is served at once.
    let file = bed.path("token-n1");
    std::fs::write(&file, token(&api, "n1")).unwrap();
    let args = bootstrap_args(&bed, bootstrap, &file);
    bed.start_enforcer_args("n1", "n1", &args);
    bed.wait_in_sync(&["n1", "n2"]);

    // Past the end of n2's first certificate, its one stream (extended by the renewal of its
    // key) still delivers.
    let past = Duration::from_secs(63).saturating_sub(n2_since.elapsed());
    std::thread::sleep(past);
    bed.write_policy_to(&api, "db", "7432");
    bed.wait_in_sync(&["n1", "n2"]);
    let err = bed.enforcer_stderr("n2");
    assert_eq!(stream_ends(&err), n2_ended, "n2's stream dropped:\n{err}");
    let m = scrape(bed.enforcers["n2"].metrics);
    assert_eq!(metric(&m, "moat_enforcer_reconnects_total"), 0.0, "{m}");
    let m = scrape(bed.metrics);
    assert!(
        metric(&m, "moat_server_disconnected_total{reason=\"superseded\"}") >= 1.0
            && metric(
                &m,
                "moat_server_refused_total{reason=\"superseded-certificate\"}"
            ) >= 1.0,
        "{m}"
    );
    wait_until("n1 connected", WAIT, || {
        bed.node_status("n1")["connected"] == true
    });
}
