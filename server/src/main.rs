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
use moat_server::bootstrap;
use moat_server::ha::{self, HaArgs, Replica};
use moat_server::hub::{ClusterState, Hub, Limits};
use moat_server::listen::{self, Admission, Http2, LimitArgs};
use moat_server::metrics::Metrics;
use moat_server::source::{self, ClusterSpec, Health, SourceSpec};
use moat_server::status::Fleet;
use moat_server::store::Store;
use moat_server::sync::{PeerAuth, SyncService};
use moat_server::tls::{self, TlsFiles};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tracing::{Instrument, info, warn};

#[derive(Parser, Debug)]
#[command(name = "moat-server", version, about = "Moat policy server")]
struct Args {
    /// Where the cluster's state comes from: `dir:PATH` (a directory of Kubernetes
    /// manifests), `kube` (in-cluster, or $KUBECONFIG) or `kube:KUBECONFIG[:CONTEXT]`.
    /// Default `dir:examples`. For several clusters use `--cluster NAME=…` instead.
    #[arg(long, env = "MOAT_SOURCE")]
    source: Option<SourceSpec>,
    /// `NAME`: the name of the one `--source` cluster, as it appears in node certificates
    /// (default `default`). `NAME=KUBECONFIG[:CONTEXT]` or `NAME=in-cluster`: one of several
    /// Kubernetes clusters served at once (repeatable).
    #[arg(long = "cluster", env = "MOAT_CLUSTER", value_delimiter = ',')]
    clusters: Vec<ClusterSpec>,
    /// A YAML file listing Kubernetes clusters (`clusters: [{name, kubeconfig, context} |
    /// {name, inCluster: true}]`), added to any `--cluster NAME=…`.
    #[arg(long, env = "MOAT_CLUSTERS_FILE")]
    clusters_file: Option<PathBuf>,
    /// Initial lists as streaming lists (`sendInitialEvents`, Kubernetes ≥ 1.32) instead of
    /// paginated list-then-watch.
    #[arg(long, env = "MOAT_KUBE_STREAMING_LIST")]
    kube_streaming_list: bool,
    /// Page size of paginated initial lists.
    #[arg(long, env = "MOAT_KUBE_PAGE_SIZE", default_value_t = 500)]
    kube_page_size: u32,
    /// While a cluster has no ClusterNetworkPolicy CRD, how often API discovery is asked
    /// whether it was installed (its policies are then picked up without a restart).
    #[arg(long, env = "MOAT_KUBE_CRD_RECHECK", default_value = "30s", value_parser = parse_recheck)]
    kube_crd_recheck: Duration,
    /// Write each ClusterNetworkPolicy's acceptance (accepted, or refused and why) to its
    /// `status.conditions` (type `moat.io/Accepted`). Off by default: it is Moat's only write
    /// to policy objects, and needs `patch` on `clusternetworkpolicies/status`.
    #[arg(long, env = "MOAT_WRITE_CNP_STATUS")]
    write_cnp_status: bool,
    /// Enforce ClusterNetworkPolicy egress `nodes` peers (experimental upstream): the
    /// addresses of the Nodes a label selector picks. Without it a policy with one is
    /// refused, naming the policy and the rule, and its last valid version stays in force.
    #[arg(long, env = "MOAT_EXPERIMENTAL_CNP_NODE_PEERS")]
    experimental_cnp_node_peers: bool,
    /// Seconds between full rescans of a directory source (changes are also watched).
    #[arg(long, env = "MOAT_POLL_SECONDS", default_value_t = 5)]
    poll_seconds: u64,
    /// Address of the sync and admin gRPC services (mutual TLS).
    #[arg(long, env = "MOAT_LISTEN", default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// CA certificate (PEM) that signs every node, admin and server certificate.
    #[arg(long, env = "MOAT_TLS_CA", default_value = ".moat/certs/ca.pem")]
    tls_ca: PathBuf,
    /// The node CA's certificate (PEM; `moatctl certs init-node-ca`): certificates it signs
    /// are accepted for node identities on the sync API only, never on the admin API.
    /// Bootstrap signs with it (`--bootstrap-ca-key`).
    #[arg(long, env = "MOAT_TLS_NODE_CA")]
    tls_node_ca: Option<PathBuf>,
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
    /// Serve node identity bootstrap here (TLS, server-authenticated; enforcers present
    /// their projected ServiceAccount token). Needs Kubernetes clusters, `--tls-node-ca` and
    /// `--bootstrap-ca-key`.
    #[arg(long, env = "MOAT_BOOTSTRAP_LISTEN")]
    bootstrap_listen: Option<SocketAddr>,
    /// The node CA's private key (PEM), to sign node certificates issued by bootstrap. The
    /// main CA's key is refused: it could mint admin certificates.
    #[arg(long, env = "MOAT_BOOTSTRAP_CA_KEY")]
    bootstrap_ca_key: Option<PathBuf>,
    /// The audience enforcer tokens must be minted for.
    #[arg(long, env = "MOAT_BOOTSTRAP_AUDIENCE", default_value = "moat")]
    bootstrap_audience: String,
    /// The enforcer DaemonSet's ServiceAccount, `NAMESPACE/NAME`: the only account that
    /// may bootstrap.
    #[arg(
        long,
        env = "MOAT_ENFORCER_SERVICE_ACCOUNT",
        default_value = "moat-system/moat-enforcer"
    )]
    enforcer_service_account: String,
    /// Lifetime of bootstrapped node certificates (`90s`, `30m`, `1h`, `7d`).
    #[arg(long, env = "MOAT_BOOTSTRAP_CERT_TTL", default_value = "1h", value_parser = parse_duration)]
    bootstrap_cert_ttl: Duration,
    /// DANGER: serve without TLS and take identities from an unauthenticated header.
    /// For local development only; never with real nodes. Loopback `--listen` addresses
    /// only, unless `--insecure-dev-plaintext-non-loopback` is given too.
    #[arg(long)]
    insecure_dev_plaintext: bool,
    /// DANGER: allow `--insecure-dev-plaintext` on a `--listen` address that is not
    /// loopback, where anyone who can reach it may act as any node and as admin. Like the
    /// flag it qualifies, it has no environment variable: it is only ever given on purpose.
    #[arg(long)]
    insecure_dev_plaintext_non_loopback: bool,
    /// Directory of the server's state (sled): versions, node status, snapshot history.
    #[arg(long, env = "MOAT_STATE_DIR", default_value = ".moat/server")]
    state_dir: PathBuf,
    /// Acknowledged snapshots kept per node as delta bases across restarts.
    #[arg(long, env = "MOAT_HISTORY", default_value_t = 4)]
    history: usize,
    /// Versions start above this (and above the store's reservation): to recover from a
    /// lost or damaged state directory without reusing a version an enforcer may hold.
    #[arg(long, env = "MOAT_FIRST_VERSION", default_value_t = 0)]
    first_version: u64,
    /// How long a node deleted from its source stays in `moatctl status` (marked deleted)
    /// before it leaves the fleet view, the store and the metrics (`0s`, `90s`, `10m`, `1h`).
    #[arg(long, env = "MOAT_DELETED_NODE_GRACE", default_value = "10m", value_parser = parse_grace)]
    deleted_node_grace: Duration,
    /// Plaintext gRPC health (grpc.health.v1) for probes.
    #[arg(long, env = "MOAT_HEALTH_ADDR", default_value = "127.0.0.1:7444")]
    health_addr: SocketAddr,
    /// Prometheus metrics (`/metrics`).
    #[arg(long, env = "MOAT_METRICS_ADDR", default_value = "127.0.0.1:7445")]
    metrics_addr: SocketAddr,
    /// Largest message sent to an enforcer, in bytes (at most the protocol's 64 MiB, which
    /// enforcers accept). A snapshot that would be larger is sent with its biggest rule
    /// lists denied instead (fail closed), and the node shows as degraded.
    #[arg(long, env = "MOAT_MAX_MESSAGE_BYTES", default_value_t = moat_proto::MAX_SERVER_MESSAGE,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
              .range(64 * 1024..=moat_proto::MAX_SERVER_MESSAGE as u64))]
    max_message_bytes: usize,
    /// Log a warning for every policy estimated to cost a node's dataplane more than this
    /// many elements (checked when a policy is created or changed, and at start).
    #[arg(long, env = "MOAT_POLICY_COST_WARN", default_value_t = 500_000)]
    policy_cost_warn: u64,
    /// Print every node's snapshot once and exit (no gRPC).
    #[arg(long)]
    once: bool,
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "MOAT_LOG", default_value = "info")]
    log: String,
    /// Connection, handshake, stream and bootstrap limits.
    #[command(flatten)]
    limits: LimitArgs,
    /// Active-active replicas.
    #[command(flatten)]
    ha: HaArgs,
}

/// A certificate lifetime as `moatctl certs` takes it, at least 5 s.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = moat_proto::pki::parse_lifetime(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(5) {
        return Err(format!("{s:?}: at least 5s"));
    }
    Ok(d)
}

fn parse_recheck(s: &str) -> Result<Duration, String> {
    let d = moat_proto::pki::parse_lifetime(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(1) {
        return Err(format!("{s:?}: at least 1s"));
    }
    Ok(d)
}

fn parse_grace(s: &str) -> Result<Duration, String> {
    moat_proto::pki::parse_lifetime(s).map_err(|e| e.to_string())
}

/// `--insecure-dev-plaintext` only where nobody else can reach it, unless asked twice.
fn check_plaintext(args: &Args) -> Result<()> {
    if args.insecure_dev_plaintext_non_loopback && !args.insecure_dev_plaintext {
        bail!("--insecure-dev-plaintext-non-loopback only qualifies --insecure-dev-plaintext");
    }
    if args.insecure_dev_plaintext && args.tls_node_ca.is_some() {
        bail!("--tls-node-ca is for TLS: it cannot run with --insecure-dev-plaintext");
    }
    if args.insecure_dev_plaintext
        && !args.listen.ip().is_loopback()
        && !args.insecure_dev_plaintext_non_loopback
    {
        bail!(
            "--insecure-dev-plaintext on --listen {}, which is not a loopback address: anyone who can reach it could act as any node and as admin. Listen on 127.0.0.1 or ::1, or also give --insecure-dev-plaintext-non-loopback if that is really meant",
            args.listen
        );
    }
    Ok(())
}

/// The clusters to serve, from `--source`, `--cluster` and `--clusters-file`.
fn clusters(
    source: Option<SourceSpec>,
    specs: Vec<ClusterSpec>,
    file: Option<PathBuf>,
) -> Result<Vec<(String, SourceSpec)>> {
    let mut kube: Vec<ClusterSpec> = specs
        .iter()
        .filter(|c| c.source.is_some())
        .cloned()
        .collect();
    if let Some(f) = file {
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        let parsed: source::ClustersFile =
            serde_yaml::from_str(&text).with_context(|| format!("parsing {}", f.display()))?;
        kube.extend(
            parsed
                .specs()
                .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?,
        );
    }
    let names: Vec<&ClusterSpec> = specs.iter().filter(|c| c.source.is_none()).collect();
    if kube.is_empty() {
        if names.len() > 1 {
            bail!(
                "--cluster NAME names the one --source cluster; for several clusters use --cluster NAME=KUBECONFIG[:CONTEXT]"
            );
        }
        let name = names
            .first()
            .map_or("default".to_string(), |c| c.name.clone());
        return Ok(vec![(
            name,
            source.unwrap_or_else(|| SourceSpec::Dir(PathBuf::from("examples"))),
        )]);
    }
    if source.is_some() || !names.is_empty() {
        bail!(
            "with --cluster NAME=… (several clusters), give every cluster that way: --source and a bare --cluster NAME do not apply"
        );
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for c in kube {
        if !seen.insert(c.name.clone()) {
            bail!("cluster {:?} is given twice", c.name);
        }
        out.push((c.name, c.source.expect("kube clusters have a source")));
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    moat_telemetry::init_logging(&args.log)?;
    check_plaintext(&args)?;
    if args.insecure_dev_plaintext {
        warn!(
            "!!! --insecure-dev-plaintext: NO TLS, NO AUTHENTICATION. Any process that can reach {} may read any node's rules and act as admin. Development only. !!!",
            args.listen
        );
    }
    let wanted = clusters(
        args.source.clone(),
        args.clusters.clone(),
        args.clusters_file.clone(),
    )?;
    let several = wanted.len() > 1;
    let metrics = Arc::new(Metrics::default());
    let parse_opts = moat_policy::model::parse::Options {
        experimental_cnp_node_peers: args.experimental_cnp_node_peers,
    };
    if args.experimental_cnp_node_peers {
        info!("experimental: ClusterNetworkPolicy nodes peers are enforced");
    }
    let kube_opts = moat_server::source::kube::Options {
        streaming_list: args.kube_streaming_list,
        page_size: args.kube_page_size.max(1),
        crd_recheck: args.kube_crd_recheck,
        write_cnp_status: args.write_cnp_status,
        parse: parse_opts,
    };

    // One source and one channel per cluster: an outage of one never stalls another.
    let mut started = Vec::new();
    let mut kube_clients = HashMap::new();
    for (name, spec) in wanted {
        let (tx, rx) = mpsc::channel(64);
        let health = Arc::new(Health::new(metrics.source_up(&name)));
        match &spec {
            SourceSpec::Dir(dir) => {
                source::file::spawn_judged(
                    dir.clone(),
                    tx,
                    Duration::from_secs(args.poll_seconds.max(1)),
                    metrics.source_reloads.clone(),
                    health.acceptance(),
                    parse_opts,
                )
                .await
                .with_context(|| format!("starting the file source on {}", dir.display()))?;
            }
            SourceSpec::Kube(target) => {
                let client = source::kube::client(target)
                    .await
                    .with_context(|| format!("cluster {name}: {target}"))?;
                source::kube::spawn(&name, client.clone(), tx, health.clone(), kube_opts);
                kube_clients.insert(name.clone(), client);
            }
        }
        info!(cluster = %name, source = %spec, "source started");
        started.push((name, spec, health, rx));
    }

    if args.once {
        let (name, _, _, rx) = started.into_iter().next().expect("one cluster at least");
        let cluster = ClusterState::new(&name, 0);
        let fleet = Arc::new(Fleet::default());
        moat_server::index::run(
            rx,
            cluster,
            fleet,
            metrics.clone(),
            HashMap::new(),
            |c, i, first| {
                print_changes("", c, i, first);
                std::process::exit(0);
            },
        )
        .await;
        bail!("the source ended before its first full sync");
    }

    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let store = Store::open(&args.state_dir, args.history)
        .with_context(|| format!("opening the state store in {}", args.state_dir.display()))?;
    if args.first_version > store.reserved() {
        // Durable before anything is served: a restart without the flag stays above it.
        store
            .reserve(args.first_version)
            .await
            .context("recording --first-version")?;
    }
    // A replica takes its epoch before any version exists: its versions are its own.
    let replica = match &args.ha.ha_cluster {
        None => None,
        Some(name) => {
            let client = kube_clients.get(name).with_context(|| {
                format!("--ha-cluster {name:?} is none of the Kubernetes clusters served here")
            })?;
            let replica_name = ha::replica_name(&args.ha)?;
            let api = kube::Api::namespaced(client.clone(), &args.ha.ha_namespace);
            let r = Replica::start(
                api,
                replica_name,
                store.last_epoch()?,
                args.ha.ha_stale_after,
            )
            .await
            .with_context(|| {
                format!(
                    "taking a version epoch in namespace {} of cluster {name}",
                    args.ha.ha_namespace
                )
            })?;
            store.record_epoch(r.epoch).await?;
            info!(replica = %r.name, epoch = r.epoch, "serving as one of several replicas");
            Some(r)
        }
    };
    let first_version = match &replica {
        Some(r) => store.reserved().max(ha::epoch::first_version(r.epoch)),
        None => store.reserved(),
    };
    let ceiling = replica
        .as_ref()
        .map_or(u64::MAX, |r| ha::epoch::ceiling(r.epoch));
    if first_version >= ceiling {
        bail!(
            "the state directory's version reservation ({}) lies beyond this replica's epoch; versions would leave it. Start with a fresh --state-dir",
            store.reserved()
        );
    }
    let saved = store.statuses()?;
    // Blobs a crash left unreferenced, and snapshots that cannot be read, go now.
    tokio::spawn(moat_server::hub::collect_garbage(store.clone()));
    let fleet = Arc::new(Fleet::default());
    let mut states = Vec::new();
    let mut pending = Vec::new();
    for (name, spec, health, rx) in started {
        let previous = Fleet::saved_published(&saved, &name);
        let state = ClusterState::with_source(&name, first_version, spec.to_string(), health);
        states.push(state.clone());
        pending.push((state, rx, previous));
    }
    fleet.restore(saved);
    info!(
        reserved = store.reserved(),
        clusters = states.len(),
        "state loaded"
    );
    let sizes = Limits {
        message: args.max_message_bytes,
        cost_warn: args.policy_cost_warn,
    };
    let hub = Hub::with_limits(states, fleet.clone(), store.clone(), metrics.clone(), sizes);
    if let (Some(r), Some(name)) = (&replica, &args.ha.ha_cluster) {
        hub.set_replica(r.clone());
        fleet.set_replica(&r.name, args.ha.ha_stale_after);
        let api = kube::Api::namespaced(kube_clients[name].clone(), &args.ha.ha_namespace);
        tokio::spawn(ha::peers::publish(
            api.clone(),
            r.name.clone(),
            fleet.clone(),
        ));
        tokio::spawn(ha::peers::follow(
            api,
            fleet.clone(),
            args.ha.ha_stale_after,
        ));
    }
    let warned = Arc::new(moat_server::cost::Warned::default());
    moat_server::prune::spawn(hub.clone(), args.deleted_node_grace);

    // Health: SERVING once every cluster's first full sync is in.
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_service_status("moat.sync.v1.PolicySync", ServingStatus::NotServing)
        .await;
    let health_listener = tokio::net::TcpListener::bind(args.health_addr)
        .await
        .with_context(|| format!("--health-addr {}", args.health_addr))?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_svc)
            .serve_with_incoming(TcpListenerStream::new(health_listener)),
    );
    if replica.is_some() {
        tokio::spawn(follow_standing(hub.clone(), health.clone()));
    }
    let m = metrics.clone();
    let bound = moat_telemetry::serve_metrics(args.metrics_addr, Arc::new(move || m.encode()))
        .await
        .with_context(|| format!("--metrics-addr {}", args.metrics_addr))?;
    info!(health = %args.health_addr, metrics = %bound, "probe endpoints up");

    let files = TlsFiles {
        ca: args.tls_ca.clone(),
        cert: args.tls_cert.clone(),
        key: args.tls_key.clone(),
        node_ca: args.tls_node_ca.clone(),
    };
    let tls = if args.insecure_dev_plaintext {
        None
    } else {
        let tls = tls::Reloading::new(files.clone()).with_context(|| {
            format!(
                "loading TLS files {} (create them with `moatctl certs init`)",
                files
                    .node_ca
                    .iter()
                    .chain([&files.ca, &files.cert, &files.key])
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        tls.watch(Duration::from_secs(args.tls_reload_seconds.max(1)));
        Some(tls)
    };
    let auth = match &tls {
        Some(t) => PeerAuth::Tls(t.clone()),
        None => PeerAuth::Plaintext,
    };
    // Bound before any cluster can report its first sync: "synced" (and health SERVING)
    // then means the port accepts.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    for (state, rx, previous) in pending {
        let prefix = if several {
            format!("{}: ", state.name)
        } else {
            String::new()
        };
        let health = health.clone();
        let hub = hub.clone();
        let name = state.name.clone();
        let name_for_health = name.clone();
        let (warned, costed) = (warned.clone(), state.clone());
        health
            .set_service_status(&format!("moat.cluster/{name}"), ServingStatus::NotServing)
            .await;
        let index_task = moat_server::index::run(
            rx,
            state,
            fleet.clone(),
            metrics.clone(),
            previous,
            move |c, i, first| {
                if c.generation >= ceiling {
                    // Never into the next epoch's versions: a restart takes a new epoch.
                    tracing::error!(
                        generation = c.generation,
                        "this replica used up its version epoch; exiting so that a restart takes a new one"
                    );
                    std::process::exit(75);
                }
                print_changes(&prefix, c, i, first);
                let since = if first { 0 } else { c.generation };
                warned.check(costed.clone(), sizes.cost_warn, since);
                if !first {
                    return;
                }
                // Per cluster `moat.cluster/<name>`; overall once every cluster is in.
                let all = ready(&hub);
                let health = health.clone();
                let service = format!("moat.cluster/{name_for_health}");
                tokio::spawn(async move {
                    health
                        .set_service_status(&service, ServingStatus::Serving)
                        .await;
                    if all {
                        health.set_service_status("", ServingStatus::Serving).await;
                        health
                            .set_service_status("moat.sync.v1.PolicySync", ServingStatus::Serving)
                            .await;
                    }
                });
            },
        )
        .instrument(tracing::info_span!("index", cluster = %name));
        tokio::spawn(index_task);
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let routes = Routes::new(
        SyncService::new(hub.clone(), shutdown_rx.clone(), auth.clone())
            .ack_timeout(args.limits.ack_timeout)
            .svc(),
    )
    .add_service(AdminService::new(hub.clone(), auth).svc());
    info!(listen = %args.listen, tls = !args.insecure_dev_plaintext, "serving sync and admin");
    let drain = replica
        .clone()
        .map(|r| (r, args.ha.ha_drain, health.clone()));
    tokio::spawn(async move {
        shutdown_signal().await;
        if let Some((r, over, health)) = drain {
            // Unready first (no new enforcer is sent here), then the streams leave a share
            // at a time.
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            info!(?over, "draining: moving enforcers to the other replicas");
            r.drain(over);
            tokio::time::sleep(over + Duration::from_millis(200)).await;
        }
        info!("shutting down");
        let _ = shutdown_tx.send(true);
    });
    // One table of connections for both TLS listeners: descriptors and memory are the
    // process's, whichever listener a client floods.
    let nofile = listen::descriptor_limit();
    let (limits, lowered) = args.limits.listen().fit_descriptors(nofile);
    if let Some(asked) = lowered {
        warn!(
            asked,
            nofile,
            holding = limits.max_connections,
            "--max-connections lowered to fit the file-descriptor limit"
        );
    }
    let admission = Admission::new(limits);
    if let Some(addr) = args.bootstrap_listen {
        if args.insecure_dev_plaintext {
            bail!(
                "--bootstrap-listen issues real certificates: it cannot run with --insecure-dev-plaintext"
            );
        }
        if kube_clients.is_empty() {
            bail!(
                "--bootstrap-listen needs Kubernetes clusters (tokens are reviewed by the cluster they come from)"
            );
        }
        let need = "--bootstrap-listen needs --tls-node-ca and --bootstrap-ca-key: bootstrap signs with a node CA of its own, never the main CA (`moatctl certs init-node-ca`)";
        let node_ca = args.tls_node_ca.clone().context(need)?;
        let key = args.bootstrap_ca_key.clone().context(need)?;
        let ca = bootstrap::Ca::load(&node_ca, &key, &args.tls_ca).with_context(|| {
            format!(
                "loading the node CA from {} and {}",
                node_ca.display(),
                key.display()
            )
        })?;
        let (ns, sa) = args
            .enforcer_service_account
            .split_once('/')
            .context("--enforcer-service-account wants NAMESPACE/NAME")?;
        let policy = bootstrap::Policy {
            audience: args.bootstrap_audience.clone(),
            namespace: ns.to_string(),
            service_account: sa.to_string(),
            cert_ttl: args.bootstrap_cert_ttl,
        };
        let tls = tls::Reloading::server_only(files.clone())
            .with_context(|| format!("loading TLS files for --bootstrap-listen {addr}"))?;
        tls.watch(Duration::from_secs(args.tls_reload_seconds.max(1)));
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--bootstrap-listen {addr}"))?;
        info!(%addr, service_account = %args.enforcer_service_account, audience = %args.bootstrap_audience, "serving node identity bootstrap");
        let svc = bootstrap::BootstrapService::new(
            hub.clone(),
            kube_clients,
            policy,
            ca,
            args.limits.bootstrap(),
        )
        .svc();
        tokio::spawn(listen::serve(
            l,
            listen::Listener {
                tls,
                routes: Routes::new(svc),
                admission: admission.clone(),
                http2: Http2::default(),
                metrics: metrics.clone(),
                name: "bootstrap",
            },
            shutdown_rx.clone(),
        ));
    }
    match tls {
        None => {
            let mut shutdown = shutdown_rx.clone();
            tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                    let _ = shutdown.wait_for(|s| *s).await;
                })
                .await?;
        }
        Some(tls) => {
            listen::serve(
                listener,
                listen::Listener {
                    tls,
                    routes,
                    admission,
                    http2: Http2::default(),
                    metrics: metrics.clone(),
                    name: "sync",
                },
                shutdown_rx,
            )
            .await;
        }
    }
    store.flush().await?;
    Ok(())
}

/// Ready (health `""` and the sync service SERVING): every cluster's first full sync is in
/// and, for a replica, its heartbeat lands and it is not draining.
fn ready(hub: &Hub) -> bool {
    hub.clusters().all(|c| c.is_synced()) && hub.replica().is_none_or(|r| r.serving())
}

/// A replica's readiness follows its heartbeat and drain: a replica cut off from the API
/// server leaves the Service's endpoints, so no new enforcer is sent to it.
async fn follow_standing(hub: Arc<Hub>, health: tonic_health::server::HealthReporter) {
    let mut was = None;
    loop {
        let now = ready(&hub);
        if was != Some(now) && hub.clusters().all(|c| c.is_synced()) {
            was = Some(now);
            let s = if now {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status("", s).await;
            health
                .set_service_status("moat.sync.v1.PolicySync", s)
                .await;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
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
fn print_changes(prefix: &str, changes: &Changes, idx: &Index, first: bool) {
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
            "{prefix}synced generation={} nodes={}",
            changes.generation,
            nodes.len()
        );
    }
    for name in nodes {
        if let Some(s) = idx.snapshot(&name) {
            let size = s.size();
            let _ = writeln!(
                out,
                "{prefix}snapshot node={} version={} digest={} endpoints={} rules={} groups={} members={}",
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
        let _ = writeln!(out, "{prefix}removed node={n}");
    }
    let _ = out.flush();
}
