//! `moat-server`: the one place that wires source, index, store, sync and admin services.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use moat_policy::{Changes, Index};
use moat_server::admin::AdminService;
use moat_server::hub::{ClusterState, Hub};
use moat_server::metrics::Metrics;
use moat_server::source::{self, SourceSpec};
use moat_server::status::Fleet;
use moat_server::store::Store;
use moat_server::sync::SyncService;
use moat_server::tls::{self, TlsFiles};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::ServingStatus;
use tracing::{Instrument, info, warn};

#[derive(Parser, Debug)]
#[command(name = "moat-server", version, about = "Moat policy server")]
struct Args {
    /// Where cluster state comes from: `dir:PATH` (a directory of Kubernetes manifests).
    #[arg(long, env = "MOAT_SOURCE", default_value = "dir:examples")]
    source: SourceSpec,
    /// The cluster's name, as it appears in node certificates.
    #[arg(long, env = "MOAT_CLUSTER", default_value = "default")]
    cluster: String,
    /// Seconds between full rescans of a directory source (changes are also watched).
    #[arg(long, env = "MOAT_POLL_SECONDS", default_value_t = 5)]
    poll_seconds: u64,
    /// Address of the sync and admin gRPC services (mutual TLS).
    #[arg(long, env = "MOAT_LISTEN", default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// CA certificate (PEM) that signs every node, admin and server certificate.
    #[arg(long, env = "MOAT_TLS_CA", default_value = ".moat/certs/ca.pem")]
    tls_ca: PathBuf,
    /// This server's certificate (PEM).
    #[arg(long, env = "MOAT_TLS_CERT", default_value = ".moat/certs/server.pem")]
    tls_cert: PathBuf,
    /// This server's private key (PEM).
    #[arg(
        long,
        env = "MOAT_TLS_KEY",
        default_value = ".moat/certs/server-key.pem"
    )]
    tls_key: PathBuf,
    /// Seconds between checks of the TLS files for rotation.
    #[arg(long, env = "MOAT_TLS_RELOAD_SECONDS", default_value_t = 2)]
    tls_reload_seconds: u64,
    /// DANGER: serve without TLS and take identities from an unauthenticated header.
    /// For local development only; never with real nodes.
    #[arg(long)]
    insecure_dev_plaintext: bool,
    /// Directory of the server's state (sled): versions, node status, snapshot history.
    #[arg(long, env = "MOAT_STATE_DIR", default_value = ".moat/server")]
    state_dir: PathBuf,
    /// Acknowledged snapshots kept per node as delta bases across restarts.
    #[arg(long, env = "MOAT_HISTORY", default_value_t = 4)]
    history: usize,
    /// Plaintext gRPC health (grpc.health.v1) for probes.
    #[arg(long, env = "MOAT_HEALTH_ADDR", default_value = "127.0.0.1:7444")]
    health_addr: SocketAddr,
    /// Prometheus metrics (`/metrics`).
    #[arg(long, env = "MOAT_METRICS_ADDR", default_value = "127.0.0.1:7445")]
    metrics_addr: SocketAddr,
    /// Print every node's snapshot once and exit (no gRPC).
    #[arg(long)]
    once: bool,
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "MOAT_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let Args {
        source,
        cluster,
        poll_seconds,
        listen,
        tls_ca,
        tls_cert,
        tls_key,
        tls_reload_seconds,
        insecure_dev_plaintext,
        state_dir,
        history,
        health_addr,
        metrics_addr,
        once,
        log,
    } = args;
    moat_telemetry::init_logging(&log)?;
    if insecure_dev_plaintext {
        warn!(
            "!!! --insecure-dev-plaintext: NO TLS, NO AUTHENTICATION. Any process that can reach {listen} may read any node's rules and act as admin. Development only. !!!"
        );
    }

    let (tx, rx) = mpsc::channel(64);
    let SourceSpec::Dir(dir) = source;
    let metrics = Arc::new(Metrics::default());
    let _source = source::file::spawn(
        dir.clone(),
        tx,
        Duration::from_secs(poll_seconds.max(1)),
        metrics.source_reloads.clone(),
    )
    .await
    .with_context(|| format!("starting the file source on {}", dir.display()))?;

    if once {
        let cluster = ClusterState::new(&cluster, 0);
        let fleet = Arc::new(Fleet::default());
        moat_server::index::run(
            rx,
            cluster,
            fleet,
            metrics.clone(),
            HashMap::new(),
            |c, i, first| {
                print_changes(c, i, first);
                std::process::exit(0);
            },
        )
        .await;
        bail!("the source ended before its first full sync");
    }

    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let store = Store::open(&state_dir, history)
        .with_context(|| format!("opening the state store in {}", state_dir.display()))?;
    let saved = store.statuses()?;
    let previous = Fleet::saved_published(&saved, &cluster);
    let fleet = Arc::new(Fleet::default());
    fleet.restore(saved);
    info!(
        reserved = store.reserved(),
        nodes = previous.len(),
        "state loaded"
    );

    let cluster_state = ClusterState::new(&cluster, store.reserved());
    let hub = Hub::new(
        vec![cluster_state.clone()],
        fleet.clone(),
        store.clone(),
        metrics.clone(),
    );

    // Health: SERVING once the source's first full sync is in.
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_service_status("moat.sync.v1.PolicySync", ServingStatus::NotServing)
        .await;
    let health_listener = tokio::net::TcpListener::bind(health_addr)
        .await
        .with_context(|| format!("--health-addr {health_addr}"))?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_svc)
            .serve_with_incoming(TcpListenerStream::new(health_listener)),
    );
    let m = metrics.clone();
    let bound = moat_telemetry::serve_metrics(metrics_addr, Arc::new(move || m.encode()))
        .await
        .with_context(|| format!("--metrics-addr {metrics_addr}"))?;
    info!(health = %health_addr, metrics = %bound, "probe endpoints up");

    let index_task = moat_server::index::run(
        rx,
        cluster_state.clone(),
        fleet,
        metrics.clone(),
        previous,
        {
            let health = health.clone();
            move |c, i, first| {
                print_changes(c, i, first);
                if first {
                    let health = health.clone();
                    tokio::spawn(async move {
                        health.set_service_status("", ServingStatus::Serving).await;
                        health
                            .set_service_status("moat.sync.v1.PolicySync", ServingStatus::Serving)
                            .await;
                    });
                }
            }
        },
    )
    .instrument(tracing::info_span!("index"));
    tokio::spawn(index_task);

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(
            SyncService::new(hub.clone(), shutdown_rx.clone(), insecure_dev_plaintext).svc(),
        )
        .add_service(AdminService::new(hub.clone(), insecure_dev_plaintext).svc());
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("--listen {listen}"))?;
    info!(%listen, tls = !insecure_dev_plaintext, "serving sync and admin");
    let shutdown = async move {
        shutdown_signal().await;
        info!("shutting down");
        let _ = shutdown_tx.send(true);
    };
    if insecure_dev_plaintext {
        router
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
            .await?;
    } else {
        let files = TlsFiles {
            ca: tls_ca,
            cert: tls_cert,
            key: tls_key,
        };
        let tls = tls::Reloading::new(files.clone()).with_context(|| {
            format!(
                "loading TLS files {}, {}, {} (create them with `moatctl certs init`)",
                files.ca.display(),
                files.cert.display(),
                files.key.display()
            )
        })?;
        tls.watch(Duration::from_secs(tls_reload_seconds.max(1)));
        router
            .serve_with_incoming_shutdown(tls::incoming(listener, tls, metrics.clone()), shutdown)
            .await?;
    }
    store.flush().await?;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// One line per changed node: what the node would receive now.
fn print_changes(changes: &Changes, idx: &Index, first: bool) {
    let mut out = std::io::stdout().lock();
    let mut nodes: Vec<_> = if first {
        idx.nodes().into_iter().map(|n| n.node).collect()
    } else {
        changes.updated.iter().map(|u| u.node.clone()).collect()
    };
    nodes.sort();
    if first {
        let _ = writeln!(
            out,
            "synced generation={} nodes={}",
            changes.generation,
            nodes.len()
        );
    }
    for name in nodes {
        if let Some(s) = idx.snapshot(&name) {
            let size = s.size();
            let _ = writeln!(
                out,
                "snapshot node={} version={} digest={} endpoints={} rules={} groups={} members={}",
                s.node,
                s.version,
                s.digest.short(),
                size.endpoints,
                size.rules,
                size.groups,
                size.members
            );
        }
    }
    let mut removed = changes.removed.clone();
    removed.sort();
    for n in removed {
        let _ = writeln!(out, "removed node={n}");
    }
    let _ = out.flush();
}
