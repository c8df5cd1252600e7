//! Command-line options and startup shared by every enforcer binary; only the backend differs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{Instrument, info, warn};

use crate::agent::{Agent, Config, Transport};
use crate::bootstrap::Bootstrap;
use crate::metrics::Metrics;
use crate::state::LocalState;
use moat_dataplane::Backend;
use moat_dataplane::local::{PodInterfaces, UnknownPods};

use crate::pods::LocalConfig;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Policy server URL; repeat it (or separate with commas) for several replicas. A
    /// name is resolved on every connection attempt and each of its addresses is a replica
    /// (a headless Service). The enforcer spreads over them at random, and moves to another
    /// when its stream ends.
    #[arg(
        long,
        env = "MOAT_SERVER",
        value_delimiter = ',',
        default_value = "https://127.0.0.1:7443"
    )]
    pub server: Vec<String>,
    /// HTTP/2 keepalive interval, in seconds: a server that answers no ping within as long
    /// again is dead, and the enforcer moves to another replica.
    #[arg(long, env = "MOAT_KEEPALIVE_SECONDS", default_value_t = 5)]
    pub keepalive_seconds: u64,
    /// This node's name (in Kubernetes: the downward API's spec.nodeName). Must match the
    /// certificate; the server refuses anything else. A Kubernetes node name (DNS-1123
    /// subdomain): it names the node's directory under the bpffs.
    #[arg(long, env = "MOAT_NODE", value_parser = node_name)]
    pub node: String,
    /// The cluster name (used by bootstrap and --insecure-dev-plaintext; with a static
    /// certificate it is in the certificate).
    #[arg(long, env = "MOAT_CLUSTER", default_value = "default", value_parser = cluster_name)]
    pub cluster: String,
    /// CA certificate (PEM) the server's certificate must chain to.
    #[arg(long, env = "MOAT_TLS_CA", default_value = ".moat/certs/ca.pem")]
    pub tls_ca: PathBuf,
    /// This node's certificate (PEM), read again on every reconnect.
    #[arg(long, env = "MOAT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, env = "MOAT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The name in the server's certificate, if not the URL's host.
    #[arg(long, env = "MOAT_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// Bootstrap (Kubernetes): the server's bootstrap listener, `https://host:port`. With
    /// `--bootstrap-token-file`, the node certificate is obtained and renewed from there
    /// (written to `--tls-cert`/`--tls-key`, default in `--state-dir`).
    #[arg(long, env = "MOAT_BOOTSTRAP_SERVER")]
    pub bootstrap_server: Option<String>,
    /// The projected ServiceAccount token (audience-bound), re-read at every renewal.
    #[arg(long, env = "MOAT_BOOTSTRAP_TOKEN_FILE")]
    pub bootstrap_token_file: Option<PathBuf>,
    /// DANGER: connect without TLS, asserting the node identity in a header. Development only.
    #[arg(long)]
    pub insecure_dev_plaintext: bool,
    /// Where the last applied snapshot is kept (sled).
    #[arg(long, env = "MOAT_STATE_DIR", default_value = "/var/lib/moat-enforcer")]
    pub state_dir: PathBuf,
    /// Plaintext gRPC health (grpc.health.v1): "" = a valid snapshot is enforced, "moat.sync"
    /// = the newest version the server offered is applied.
    #[arg(long, env = "MOAT_HEALTH_ADDR", default_value = "127.0.0.1:7446")]
    pub health_addr: SocketAddr,
    /// Prometheus metrics (`/metrics`).
    #[arg(long, env = "MOAT_METRICS_ADDR", default_value = "127.0.0.1:7447")]
    pub metrics_addr: SocketAddr,
    /// Longest wait between reconnection attempts, in seconds.
    #[arg(long, env = "MOAT_BACKOFF_MAX_SECONDS", default_value_t = 30)]
    pub backoff_max_seconds: u64,
    /// Seconds between status reports to the server.
    #[arg(long, env = "MOAT_REPORT_SECONDS", default_value_t = 30)]
    pub report_seconds: u64,
    /// Which interfaces are pods: `auto` (every veth or netkit device without a global
    /// address or a master, as Calico, Cilium and the AWS VPC CNI make them) or interface
    /// name patterns (`cali*,lxc*`). A pod's addresses are the host routes to its interface.
    #[arg(long, env = "MOAT_POD_INTERFACES", default_value = "auto")]
    pub pod_interfaces: PodInterfaces,
    /// A local pod address no enforced snapshot names yet: `deny` isolates it from its first
    /// packet until a snapshot names it (a pod may wait for its allow rules), `allow` leaves
    /// it open meanwhile (a pod a policy will isolate may talk before it is).
    #[arg(long, env = "MOAT_UNKNOWN_PODS", default_value = "deny")]
    pub unknown_pods: UnknownPods,
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "MOAT_LOG", default_value = "info")]
    pub log: String,
}

fn node_name(s: &str) -> Result<String, String> {
    checked_name("node", s)
}

fn cluster_name(s: &str) -> Result<String, String> {
    checked_name("cluster", s)
}

fn checked_name(what: &str, s: &str) -> Result<String, String> {
    if moat_proto::identity::valid_name(s) {
        Ok(s.to_string())
    } else {
        Err(moat_proto::identity::name_error(what, s))
    }
}

/// The server URLs must use TLS exactly when the flags say so: an `http://` URL would send
/// the bootstrap token and the node's traffic in cleartext whatever TLS flags are given.
pub fn check_urls(args: &Args) -> Result<()> {
    use moat_proto::url::check_server_url;
    if args.insecure_dev_plaintext {
        if args.bootstrap_token_file.is_some() || args.bootstrap_server.is_some() {
            anyhow::bail!(
                "--bootstrap-server/--bootstrap-token-file issue real certificates: they cannot run with --insecure-dev-plaintext"
            );
        }
        for s in &args.server {
            check_server_url("--server", s, false)?;
        }
        return Ok(());
    }
    for s in &args.server {
        check_server_url("--server", s, true)?;
    }
    if let Some(b) = &args.bootstrap_server {
        check_server_url("--bootstrap-server", b, true)?;
    }
    Ok(())
}

/// Runs the enforcer with `backend` until SIGTERM/ctrl-c; `selection` says how the backend
/// was chosen (logged).
pub async fn run<B: Backend>(args: Args, backend: B, selection: &str) -> Result<()> {
    // A binary may have set up logging already (to log its backend probe).
    if let Err(e) = moat_telemetry::init_logging(&args.log)
        && !tracing::dispatcher::has_been_set()
    {
        return Err(e);
    }
    check_urls(&args)?;
    // Before anything else starts: a URL that does not parse is a clear error, not a default.
    let servers = crate::servers::Servers::parse(&args.server).map_err(|e| anyhow::anyhow!(e))?;
    let transport = if args.insecure_dev_plaintext {
        warn!(
            "!!! --insecure-dev-plaintext: NO TLS. The server is not authenticated and this node's identity is only asserted. Development only. !!!"
        );
        Transport::Plaintext {
            cluster: args.cluster.clone(),
        }
    } else if let Some(token_file) = &args.bootstrap_token_file {
        let b = Bootstrap {
            server: args
                .bootstrap_server
                .clone()
                .context("--bootstrap-token-file needs --bootstrap-server")?,
            ca: args.tls_ca.clone(),
            server_name: args.tls_server_name.clone(),
            token_file: token_file.clone(),
            cluster: args.cluster.clone(),
            node: args.node.clone(),
            cert: args
                .tls_cert
                .clone()
                .unwrap_or_else(|| args.state_dir.join("node.pem")),
            key: args
                .tls_key
                .clone()
                .unwrap_or_else(|| args.state_dir.join("node-key.pem")),
        };
        let transport = Transport::Tls {
            ca: b.ca.clone(),
            cert: b.cert.clone(),
            key: b.key.clone(),
            server_name: b.server_name.clone(),
        };
        // In the background: the last rules stay enforced (and adopted) while the first
        // certificate is fetched; the agent connects as soon as it lands.
        tokio::spawn(b.run().instrument(tracing::info_span!("bootstrap")));
        transport
    } else {
        Transport::Tls {
            ca: args.tls_ca.clone(),
            cert: args.tls_cert.clone().context(
                "--tls-cert is required (or --bootstrap-token-file, or --insecure-dev-plaintext)",
            )?,
            key: args.tls_key.clone().context(
                "--tls-key is required (or --bootstrap-token-file, or --insecure-dev-plaintext)",
            )?,
            server_name: args.tls_server_name.clone(),
        }
    };
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let state = LocalState::open(&args.state_dir)
        .with_context(|| format!("opening {}", args.state_dir.display()))?;
    let metrics = Arc::new(Metrics::default());
    let (health, health_svc) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind(args.health_addr)
        .await
        .with_context(|| format!("--health-addr {}", args.health_addr))?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_svc)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let m = metrics.clone();
    moat_telemetry::serve_metrics(args.metrics_addr, Arc::new(move || m.encode()))
        .await
        .with_context(|| format!("--metrics-addr {}", args.metrics_addr))?;
    let cfg = Config {
        servers,
        keepalive: Duration::from_secs(args.keepalive_seconds.max(1)),
        node: args.node.clone(),
        transport,
        backoff_min: Duration::from_millis(200),
        backoff_max: Duration::from_secs(args.backoff_max_seconds.max(1)),
        report_every: Duration::from_secs(args.report_seconds.max(1)),
        local: LocalConfig {
            pod_interfaces: args.pod_interfaces.clone(),
            unknown_pods: args.unknown_pods,
        },
    };
    // The node's pods, before anything is adopted: adopting binds them.
    let watcher = tokio::task::spawn_blocking(crate::host::Watcher::start)
        .await
        .context("starting the topology watcher")?
        .context("reading the node's interfaces and routes (rtnetlink)")?;
    info!(
        node = %args.node,
        server = %args.server.join(","),
        backend = backend.name(),
        selection,
        pod_interfaces = ?args.pod_interfaces,
        unknown_pods = ?args.unknown_pods,
        "enforcer starting"
    );
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        let _ = tx.send(true);
    });
    let span = tracing::info_span!("agent", node = %args.node);
    Agent::new(cfg, backend, state, health, metrics, watcher.subscribe())
        .run(rx)
        .instrument(span)
        .await?;
    drop(watcher);
    info!("stopped; the last applied rules stay in force");
    Ok(())
}
