//! Node identity bootstrap against the test API server: real JWTs, real TokenReview, real
//! TLS, the real server issuing and the real enforcer renewing.

use std::time::Duration;

use moat_integration::bed::{Bed, WAIT, free_port, metric, scrape, wait_until};
use moat_integration::kubeapi::{ApiServer, Bound, Kind, Options};
use moat_proto::v1;
use serde_json::json;

const NS: &str = "moat-system";
const SA: &str = "moat-enforcer";

struct World {
    bed: Bed,
    api: ApiServer,
    bootstrap: std::net::SocketAddr,
}

/// Nodes n1, n2 with the bed's workload, plus an enforcer pod per node in moat-system.
fn world(ttl: &str) -> World {
    let mut bed = Bed::new(&["n1", "n2"]);
    let mut y = format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n");
    for n in ["n1", "n2"] {
        y += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {SA}-{n}, namespace: {NS}}}\nspec: {{nodeName: {n}, hostNetwork: true, serviceAccountName: {SA}, containers: [{{name: enforcer}}]}}\nstatus: {{phase: Running}}\n"
        );
    }
    std::fs::write(bed.manifests().join("moat.yaml"), y).unwrap();
    let api = ApiServer::start(Options::default());
    let args = bed.kube_source(&api, "prod");
    let bootstrap = free_port();
    let ca_key = bed.certs().join("ca-key.pem");
    bed.start_server_from(
        &args,
        &[
            "--bootstrap-listen",
            &bootstrap.to_string(),
            "--bootstrap-ca-key",
            ca_key.to_str().unwrap(),
            "--bootstrap-cert-ttl",
            ttl,
        ],
        Some("synced "),
    );
    // "synced" can come before the bootstrap listener is bound (the index task and main's
    // listener set-up race); wait for the port itself.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(bootstrap).is_err() {
        assert!(
            std::time::Instant::now() < until,
            "bootstrap port {bootstrap} never opened"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    World {
        bed,
        api,
        bootstrap,
    }
}

fn uid(api: &ApiServer, pod: &str) -> String {
    api.get(Kind::Pod, NS, pod).unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string()
}

fn bound(api: &ApiServer, pod: &str, node: &str) -> Bound {
    Bound {
        namespace: NS.into(),
        service_account: SA.into(),
        pod: pod.into(),
        pod_uid: uid(api, pod),
        node: node.into(),
        audiences: vec!["moat".into()],
        ttl: 3600,
    }
}

/// Calls Issue directly; `Ok(identity URI)` or the refusal.
fn issue(w: &World, cluster: &str, node: &str, token: &str) -> Result<String, tonic::Status> {
    let ca = std::fs::read(w.bed.certs().join("ca.pem")).unwrap();
    let addr = w.bootstrap;
    let (cluster, node, token) = (cluster.to_string(), node.to_string(), token.to_string());
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                .domain_name("localhost");
            let ch = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .unwrap();
            let key = rcgen::KeyPair::generate().unwrap();
            let csr = rcgen::CertificateParams::default()
                .serialize_request(&key)
                .unwrap()
                .pem()
                .unwrap();
            let r = v1::bootstrap_client::BootstrapClient::new(ch)
                .issue(v1::IssueRequest {
                    cluster,
                    node,
                    token,
                    csr_pem: csr,
                })
                .await?
                .into_inner();
            let der = rustls_pemfile::certs(&mut r.cert_pem.as_bytes())
                .next()
                .unwrap()
                .unwrap();
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            let san = cert.subject_alternative_name().unwrap().unwrap();
            Ok(format!("{:?}", san.value.general_names))
        })
}

fn refused(r: Result<String, tonic::Status>, code: tonic::Code, needle: &str) {
    match r {
        Ok(id) => panic!("issued {id}; expected a refusal containing {needle:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{}", s.message());
            assert!(
                s.message().contains(needle),
                "{:?} lacks {needle:?}",
                s.message()
            );
        }
    }
}

#[test]
fn only_moats_enforcer_account_on_its_own_node_gets_a_certificate() {
    let w = world("1h");
    let ok = w.api.token(&bound(&w.api, "moat-enforcer-n1", "n1"));
    let id = issue(&w, "default", "n1", &ok).expect("a valid token is refused");
    assert!(
        id.contains("spiffe://moat/cluster/default/node/n1")
            || id.contains("/cluster/default/node/n1"),
        "{id}"
    );

    // Any tenant pod can mint a token for its own account: never a node certificate.
    let tenant_uid = w.api.get(Kind::Pod, "app", "web-n1").unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let tenant = w.api.token(&Bound {
        namespace: "app".into(),
        service_account: "default".into(),
        pod: "web-n1".into(),
        pod_uid: tenant_uid,
        ..bound(&w.api, "moat-enforcer-n1", "n1")
    });
    refused(
        issue(&w, "default", "n1", &tenant),
        tonic::Code::PermissionDenied,
        "not Moat's enforcer ServiceAccount",
    );

    // Minted for another audience (refused on its own claims, before any TokenReview).
    let other_aud = w.api.token(&Bound {
        audiences: vec!["https://kubernetes.default.svc.cluster.local".into()],
        ..bound(&w.api, "moat-enforcer-n1", "n1")
    });
    refused(
        issue(&w, "default", "n1", &other_aud),
        tonic::Code::PermissionDenied,
        "not for audience \"moat\"",
    );

    // n2's enforcer asking for n1's rules.
    let n2 = w.api.token(&bound(&w.api, "moat-enforcer-n2", "n2"));
    refused(
        issue(&w, "default", "n1", &n2),
        tonic::Code::PermissionDenied,
        "not \"n1\"",
    );

    // Legacy secret-based token.
    refused(
        issue(&w, "default", "n1", &w.api.legacy_token(NS, SA)),
        tonic::Code::PermissionDenied,
        "legacy secret-based tokens are refused",
    );
    // Expired.
    let expired = w.api.token(&Bound {
        ttl: -10,
        ..bound(&w.api, "moat-enforcer-n1", "n1")
    });
    refused(
        issue(&w, "default", "n1", &expired),
        tonic::Code::Unauthenticated,
        "expired",
    );
    // A cluster this server does not serve.
    refused(
        issue(&w, "elsewhere", "n1", &ok),
        tonic::Code::NotFound,
        "elsewhere",
    );

    // Deleted pod: its token dies with it, also if a pod of the same name comes back.
    assert!(w.api.delete(Kind::Pod, NS, "moat-enforcer-n1"));
    refused(
        issue(&w, "default", "n1", &ok),
        tonic::Code::Unauthenticated,
        "not found",
    );
    w.api.apply(
        json!({"kind": "Pod", "metadata": {"name": "moat-enforcer-n1", "namespace": NS},
        "spec": {"nodeName": "n1", "hostNetwork": true, "containers": [{"name": "enforcer"}]}}),
    );
    refused(
        issue(&w, "default", "n1", &ok),
        tonic::Code::Unauthenticated,
        "different UID",
    );

    let m = scrape(w.bed.metrics);
    assert_eq!(
        metric(&m, "moat_server_certificates_issued_total"),
        1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "moat_server_refused_total{reason=\"bootstrap-account\"}"
        ) >= 1.0,
        "{m}"
    );
}

#[test]
fn an_enforcer_bootstraps_and_renews_without_dropping_its_stream() {
    let mut w = world("6s");
    let token = w.bed.path("token");
    std::fs::write(
        &token,
        w.api.token(&bound(&w.api, "moat-enforcer-n1", "n1")),
    )
    .unwrap();
    let args = vec![
        "--tls-ca".to_string(),
        w.bed.certs().join("ca.pem").display().to_string(),
        "--bootstrap-server".into(),
        format!("https://{}", w.bootstrap),
        "--bootstrap-token-file".into(),
        token.display().to_string(),
        "--cluster".into(),
        "default".into(),
    ];
    w.bed.start_enforcer_args("n1", "n1", &args);
    w.bed.wait_in_sync(&["n1"]);
    // (Attempts before the first certificate landed end before a stream exists.)
    let ended = |e: &str| e.matches("sync stream ended").count();
    let before = ended(&w.bed.enforcer_stderr("n1"));
    // Three certificate lifetimes: renewed at two thirds each time, the stream stays.
    std::thread::sleep(Duration::from_secs(15));
    let err = w.bed.enforcer_stderr("n1");
    let issued = err.matches("node certificate issued").count();
    assert!(
        issued >= 3,
        "{issued} certificates in 15 s of 6 s lifetimes:\n{err}"
    );
    assert_eq!(ended(&err), before, "the stream dropped:\n{err}");
    let m = scrape(w.bed.enforcers["n1"].metrics);
    assert_eq!(metric(&m, "moat_enforcer_reconnects_total"), 0.0, "{m}");
    // Long after the first certificate expired, the same stream still delivers.
    w.bed.write_policy_to(&w.api, "db", "6432");
    w.bed.wait_in_sync(&["n1"]);
    let err = w.bed.enforcer_stderr("n1");
    assert_eq!(ended(&err), before, "{err}");
    wait_until("status connected", WAIT, || {
        w.bed.node_status("n1")["connected"] == true
    });
}
