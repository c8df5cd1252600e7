//! Attackers for the abuse tests, all on loopback: idle-connection floods (`moat-test-flood`
//! processes), sync streams opened with a given certificate from a chosen source address, and
//! bootstrap requests with chosen tokens and keys; plus a bootstrap-enabled test bed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use moat_proto::v1;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::bed::{Bed, free_port};
use crate::binary;
use crate::kubeapi::{ApiServer, Bound, Kind, Options};
use crate::process::Proc;

/// A loopback source address other than 127.0.0.1 (which the legitimate enforcers use).
pub fn attacker(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 10 + n)
}

/// `connections` idle TCP connections to `target` from `sources` addresses starting at
/// `source`, reopened `reopen_ms` after the server closes them, for `seconds` at most.
pub fn flood(
    target: SocketAddr,
    source: Ipv4Addr,
    sources: u32,
    connections: usize,
    seconds: u64,
) -> Proc {
    let mut p = Proc::spawn(
        Command::new(binary("moat-test-flood"))
            .arg("--target")
            .arg(target.to_string())
            .arg("--source")
            .arg(source.to_string())
            .arg("--sources")
            .arg(sources.to_string())
            .arg("--connections")
            .arg(connections.to_string())
            .arg("--seconds")
            .arg(seconds.to_string()),
    );
    p.until(Duration::from_secs(30), |l| l.starts_with("open "));
    p
}

/// A TLS channel to `addr` from `source`, presenting `identity` (cert, key PEMs) if given.
pub async fn channel(
    addr: SocketAddr,
    ca_pem: &[u8],
    identity: Option<(&[u8], &[u8])>,
    source: Ipv4Addr,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .local_address(Some(IpAddr::V4(source)))
        .connect_timeout(Duration::from_secs(5))
        .tls_config(tls)?
        .connect()
        .await
}

/// A sync stream that sent its Hello: the sender for further messages and the inbound side.
pub type Opened = (
    mpsc::Sender<v1::EnforcerMessage>,
    tonic::Streaming<v1::ServerMessage>,
);

/// Opens a sync stream for `node` on `ch` and sends its Hello.
pub async fn hello(ch: Channel, node: &str) -> Result<Opened, tonic::Status> {
    let mut client = v1::policy_sync_client::PolicySyncClient::new(ch)
        .max_decoding_message_size(moat_proto::MAX_SERVER_MESSAGE);
    let (tx, rx) = mpsc::channel(4);
    tx.send(v1::EnforcerMessage {
        kind: Some(v1::enforcer_message::Kind::Hello(v1::Hello {
            backend: "attacker".into(),
            node: node.into(),
            ..Default::default()
        })),
    })
    .await
    .expect("queue hello");
    let inbound = client.sync(ReceiverStream::new(rx)).await?.into_inner();
    Ok((tx, inbound))
}

/// Acknowledges whatever version `m` offers.
pub fn ack(m: &v1::ServerMessage) -> v1::EnforcerMessage {
    use v1::server_message::Kind;
    let (nonce, version) = match m.kind.as_ref().expect("message kind") {
        Kind::Snapshot(s) => (s.nonce.clone(), s.version.clone()),
        Kind::Delta(d) => (d.nonce.clone(), d.version.clone()),
        Kind::Current(c) => (c.nonce.clone(), c.version.clone()),
    };
    v1::EnforcerMessage {
        kind: Some(v1::enforcer_message::Kind::Ack(v1::Ack {
            nonce,
            applied: version,
            apply_micros: 0,
            degraded: Vec::new(),
        })),
    }
}

/// Asks the bootstrap listener at `addr` for a certificate for `key`; the certificate PEM.
pub async fn issue(
    addr: SocketAddr,
    ca_pem: &[u8],
    source: Ipv4Addr,
    node: &str,
    token: &str,
    key: &rcgen::KeyPair,
) -> Result<String, tonic::Status> {
    let ch = channel(addr, ca_pem, None, source)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(key)
        .expect("csr")
        .pem()
        .expect("csr pem");
    Ok(v1::bootstrap_client::BootstrapClient::new(ch)
        .issue(v1::IssueRequest {
            cluster: "default".into(),
            node: node.into(),
            token: token.into(),
            csr_pem: csr,
        })
        .await?
        .into_inner()
        .cert_pem)
}

pub const NS: &str = "moat-system";
pub const SA: &str = "moat-enforcer";

/// A bed on the test Kubernetes API server with bootstrap on: nodes `nodes`, an enforcer pod
/// per node in moat-system, node certificates living `ttl`. Returns the bed, the API server
/// and the bootstrap address.
pub fn bootstrap_bed(
    nodes: &[&str],
    ttl: &str,
    opts: Options,
    extra: &[&str],
) -> (Bed, ApiServer, SocketAddr) {
    let mut bed = Bed::new(nodes);
    let mut y = format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n");
    for n in nodes {
        y += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {SA}-{n}, namespace: {NS}}}\nspec: {{nodeName: {n}, hostNetwork: true, serviceAccountName: {SA}, containers: [{{name: enforcer}}]}}\nstatus: {{phase: Running}}\n"
        );
    }
    std::fs::write(bed.manifests().join("moat.yaml"), y).unwrap();
    let api = ApiServer::start(opts);
    let source = bed.kube_source(&api, "prod");
    let bootstrap = free_port();
    let ca_key = bed.certs().join("ca-key.pem");
    let mut args: Vec<String> = vec![
        "--bootstrap-listen".into(),
        bootstrap.to_string(),
        "--bootstrap-ca-key".into(),
        ca_key.display().to_string(),
        "--bootstrap-cert-ttl".into(),
        ttl.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    bed.start_server_from(&source, &args, Some("synced "));
    wait_for_port(bootstrap);
    wait_for_port(bed.listen);
    (bed, api, bootstrap)
}

/// Waits until something listens on `addr`.
pub fn wait_for_port(addr: SocketAddr) {
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(std::time::Instant::now() < until, "{addr} never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A projected token of `node`'s enforcer pod, as kubelet mounts it.
pub fn token(api: &ApiServer, node: &str) -> String {
    let pod = format!("{SA}-{node}");
    let uid = api.get(Kind::Pod, NS, &pod).unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    api.token(&Bound {
        namespace: NS.into(),
        service_account: SA.into(),
        pod,
        pod_uid: uid,
        node: node.into(),
        audiences: vec!["moat".into()],
        ttl: 3600,
    })
}

/// The enforcer arguments that bootstrap `node` from `bootstrap` with the token in `file`.
pub fn bootstrap_args(
    bed: &Bed,
    bootstrap: SocketAddr,
    token_file: &std::path::Path,
) -> Vec<String> {
    vec![
        "--tls-ca".into(),
        bed.certs().join("ca.pem").display().to_string(),
        "--bootstrap-server".into(),
        format!("https://{bootstrap}"),
        "--bootstrap-token-file".into(),
        token_file.display().to_string(),
        "--cluster".into(),
        "default".into(),
    ]
}
