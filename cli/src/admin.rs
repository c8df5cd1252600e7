//! The admin API client: `moatctl status` and live `moatctl explain --server`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use moat_proto::v1;
use moat_proto::v1::admin_client::AdminClient;
use serde_json::json;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How to reach the admin API with an admin certificate.
#[derive(clap::Args, Debug, Clone)]
pub struct Connection {
    /// Policy server URL.
    #[arg(long, env = "MOAT_SERVER", default_value = "https://127.0.0.1:7443")]
    pub server: String,
    #[arg(long, env = "MOAT_TLS_CA", default_value = ".moat/certs/ca.pem")]
    pub tls_ca: PathBuf,
    /// An admin certificate (`moatctl certs issue-admin`).
    #[arg(
        long,
        env = "MOAT_ADMIN_CERT",
        default_value = ".moat/certs/admin-admin.pem"
    )]
    pub tls_cert: PathBuf,
    #[arg(
        long,
        env = "MOAT_ADMIN_KEY",
        default_value = ".moat/certs/admin-admin-key.pem"
    )]
    pub tls_key: PathBuf,
    #[arg(long, env = "MOAT_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// DANGER: plaintext, for a server started with --insecure-dev-plaintext.
    #[arg(long)]
    pub insecure_dev_plaintext: bool,
}

impl Connection {
    pub async fn client(&self) -> Result<AdminClient<Channel>> {
        // An http:// URL would send the admin certificate's handshake nowhere and every
        // answer in cleartext: refused unless plaintext is what was asked for.
        moat_proto::url::check_server_url("--server", &self.server, !self.insecure_dev_plaintext)?;
        let mut ep = Endpoint::from_shared(self.server.clone())?
            .connect_timeout(std::time::Duration::from_secs(5));
        if !self.insecure_dev_plaintext {
            let read =
                |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read(&self.tls_ca)?))
                .identity(Identity::from_pem(
                    read(&self.tls_cert)?,
                    read(&self.tls_key)?,
                ));
            if let Some(n) = &self.tls_server_name {
                tls = tls.domain_name(n.clone());
            }
            ep = ep.tls_config(tls)?;
        }
        let ch = ep
            .connect()
            .await
            .with_context(|| format!("connecting to {}", self.server))?;
        Ok(AdminClient::new(ch))
    }

    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if self.insecure_dev_plaintext {
            let id = moat_proto::Identity::Admin { name: "dev".into() }.uri();
            r.metadata_mut()
                .insert("x-moat-identity", id.parse().expect("ascii"));
        }
        r
    }
}

#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    conn: Connection,
    /// `table` or `json`.
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    output: String,
    /// Where one policy's current content is enforced: `NAMESPACE/NAME` for a
    /// NetworkPolicy, `NAME` for a ClusterNetworkPolicy.
    #[arg(long)]
    policy: Option<String>,
    /// The cluster (needed only when the server serves several).
    #[arg(long, default_value = "")]
    cluster: String,
}

pub fn status(args: StatusArgs) -> Result<ExitCode> {
    tokio::runtime::Runtime::new()?.block_on(async move {
        let mut client = args.conn.client().await?;
        if let Some(p) = &args.policy {
            // No namespace: a ClusterNetworkPolicy (cluster-scoped).
            let (ns, name) = p.split_once('/').unwrap_or(("", p));
            if name.is_empty() || (ns.is_empty() && p.contains('/')) {
                return Err(anyhow!("--policy wants NAMESPACE/NAME or a ClusterNetworkPolicy's NAME"));
            }
            let r = client
                .policy_status(args.conn.request(v1::PolicyStatusRequest {
                    namespace: ns.into(),
                    name: name.into(),
                    cluster: args.cluster.clone(),
                }))
                .await
                .map_err(|s| anyhow!("{}", s.message()))?
                .into_inner();
            print_policy(&r, &args.output);
            return Ok(ExitCode::SUCCESS);
        }
        let r = client
            .status(args.conn.request(v1::StatusRequest {}))
            .await
            .map_err(|s| anyhow!("{}", s.message()))?
            .into_inner();
        if args.output == "json" {
            let nodes: Vec<_> = r
                .nodes
                .iter()
                .map(|n| {
                    let (degraded, local) = crate::degraded::node_json(n);
                    json!({
                        "cluster": n.cluster, "node": n.node, "backend": n.backend, "kernel": n.kernel,
                        "connected": n.connected, "applied_version": n.applied_version,
                        "latest_version": n.latest_version, "in_sync": n.in_sync,
                        "lag_versions": n.lag_versions, "lag_seconds": n.lag_seconds,
                        "last_error": n.last_error, "applied_digest": n.applied_digest,
                        "latest_digest": n.latest_digest, "last_ack_unix_micros": n.last_ack_unix_micros,
                        "selection": n.selection, "degraded": degraded, "local": local,
                        "deleted_unix_micros": n.deleted_unix_micros, "replica": n.replica,
                    })
                })
                .collect();
            let clusters: Vec<_> = r
                .clusters
                .iter()
                .map(|c| {
                    json!({
                        "name": c.name, "source": c.source, "synced": c.synced, "stale": c.stale,
                        "stale_since_unix_micros": c.stale_since_unix_micros, "last_error": c.last_error,
                        "generation": c.generation, "last_event_unix_micros": c.last_event_unix_micros,
                        "warnings": c.warnings,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&json!({"generation": r.generation, "synced": r.synced, "clusters": clusters, "nodes": nodes}))?);
        } else {
            print_table(&r);
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// One block per cluster (its source's state, then its nodes), then the fleet summary.
fn print_table(r: &v1::StatusResponse) {
    let mut clusters: Vec<&v1::ClusterStatus> = r.clusters.iter().collect();
    clusters.sort_by(|a, b| a.name.cmp(&b.name));
    for (i, c) in clusters.iter().enumerate() {
        if i > 0 {
            println!();
        }
        let nodes: Vec<&v1::NodeStatus> = r.nodes.iter().filter(|n| n.cluster == c.name).collect();
        let (in_sync, existing, deleted) = counts(&nodes);
        let state = if !c.synced {
            "NOT SYNCED YET (nothing served)".to_string()
        } else if c.stale {
            format!(
                "STALE for {} (serving its last state): {}",
                ago(c.stale_since_unix_micros),
                or_dash(&escape(&c.last_error))
            )
        } else {
            "synced".to_string()
        };
        println!(
            "cluster {} ({}): {state}; generation {}; {in_sync} of {existing} nodes in sync{}{}",
            c.name,
            c.source,
            c.generation,
            deleted_note(deleted),
            crate::degraded::summary(&nodes)
        );
        for w in &c.warnings {
            println!("  warning: {}", escape(w));
        }
        print_nodes(&nodes);
    }
    if clusters.is_empty() {
        print_nodes(&r.nodes.iter().collect::<Vec<_>>());
    }
    let (in_sync, existing, deleted) = counts(&r.nodes.iter().collect::<Vec<_>>());
    println!(
        "\n{in_sync} of {existing} nodes in sync{}{} (generation {}{})",
        deleted_note(deleted),
        crate::degraded::summary(&r.nodes.iter().collect::<Vec<_>>()),
        r.generation,
        if r.synced {
            ""
        } else {
            ", source not synced yet"
        }
    );
}

/// (in sync, existing, deleted): deleted nodes are shown until they leave, never counted.
fn counts(nodes: &[&v1::NodeStatus]) -> (usize, usize, usize) {
    let existing: Vec<_> = nodes
        .iter()
        .filter(|n| n.deleted_unix_micros == 0)
        .collect();
    let in_sync = existing.iter().filter(|n| n.in_sync).count();
    (in_sync, existing.len(), nodes.len() - existing.len())
}

fn deleted_note(deleted: usize) -> String {
    if deleted == 0 {
        String::new()
    } else {
        format!(" ({deleted} deleted from the source, shown until they leave)")
    }
}

/// A string an enforcer (or anything it talks to) chose, made safe for a terminal: control
/// characters (escape sequences, carriage returns, newlines), bidirectional overrides and
/// backslashes are shown escaped, so a node can neither forge lines nor rewrite the screen.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() || is_bidi_control(c) => {
                out.push_str(&format!("\\u{{{:x}}}", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{061c}')
}

fn ago(micros: u64) -> String {
    let then = moat_proto::from_unix_micros(micros);
    let secs = std::time::SystemTime::now()
        .duration_since(then)
        .unwrap_or_default()
        .as_secs();
    format!("{secs}s")
}

fn print_nodes(nodes: &[&v1::NodeStatus]) {
    let header = [
        "CLUSTER",
        "NODE",
        "BACKEND",
        "KERNEL",
        "CONNECTED",
        "APPLIED",
        "LATEST",
        "IN SYNC",
        "LAG",
        "LAST ERROR",
    ];
    let rows: Vec<[String; 10]> = nodes
        .iter()
        .map(|n| {
            let lag = if n.in_sync {
                "-".into()
            } else {
                format!("{} versions / {:.1}s", n.lag_versions, n.lag_seconds)
            };
            let connected = match (n.connected, n.deleted_unix_micros) {
                (true, _) if !n.replica.is_empty() => format!("yes ({})", escape(&n.replica)),
                (true, _) => "yes".to_string(),
                (false, 0) => "no".to_string(),
                (false, at) => format!("no (deleted {} ago)", ago(at)),
            };
            [
                escape(&n.cluster),
                escape(&n.node),
                or_dash(&escape(&n.backend)),
                or_dash(&escape(&n.kernel)),
                connected,
                n.applied_version.to_string(),
                n.latest_version.to_string(),
                crate::degraded::in_sync_cell(n).into(),
                lag,
                or_dash(&escape(&n.last_error)),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(header.to_vec()));
    for r in &rows {
        println!("{}", line(r.iter().map(String::as_str).collect()));
    }
    // Why each node runs its backend (a fallback names the probe that failed).
    let why: Vec<_> = nodes.iter().filter(|n| !n.selection.is_empty()).collect();
    if !why.is_empty() {
        println!("backend selection:");
        for n in why {
            println!("  {}: {}", escape(&n.node), escape(&n.selection));
        }
    }
    crate::degraded::print_nodes(nodes);
}

fn or_dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.into() }
}

fn print_policy(r: &v1::PolicyStatusResponse, output: &str) {
    let enforced = r.nodes.iter().filter(|n| n.enforced).count();
    if output == "json" {
        let nodes: Vec<_> = r
            .nodes
            .iter()
            .map(|n| {
                let (degraded, cost) = crate::degraded::policy_node_json(n);
                json!({"node": n.node, "enforced": n.enforced, "applied_version": n.applied_version, "needed_version": n.needed_version, "last_error": n.last_error, "degraded": degraded, "estimated_elements": cost})
            })
            .collect();
        // null from a server that predates acceptance: unknown, not accepted.
        let acceptance = r.acceptance.as_ref().map(|a| {
            json!({"accepted": a.accepted, "reason": a.reason, "message": a.message,
                "last_valid_in_force": a.last_valid_in_force, "warnings": a.warnings})
        });
        let mut v = json!({"cluster": r.cluster, "namespace": r.namespace, "name": r.name,
            "generation": r.generation, "enforced": enforced, "needed": r.nodes.len(), "nodes": nodes,
            "acceptance": acceptance});
        if let (Some(v), serde_json::Value::Object(extra)) =
            (v.as_object_mut(), crate::degraded::policy_json(r))
        {
            v.extend(extra);
        }
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return;
    }
    let what = if r.namespace.is_empty() {
        format!("ClusterNetworkPolicy {}", r.name)
    } else {
        format!("NetworkPolicy {}/{}", r.namespace, r.name)
    };
    let never_valid = r
        .acceptance
        .as_ref()
        .is_some_and(|a| !a.accepted && !a.last_valid_in_force);
    if never_valid && r.nodes.is_empty() {
        println!("{what}: no valid version, enforced nowhere");
    } else {
        println!(
            "{what} (generation {}): enforced on {enforced} of {} nodes",
            r.generation,
            r.nodes.len()
        );
    }
    if let Some(a) = &r.acceptance {
        print_acceptance(a);
    }
    for n in r.nodes.iter().filter(|n| !n.enforced) {
        let why = if n.last_error.is_empty() {
            "not applied yet".to_string()
        } else {
            escape(&n.last_error)
        };
        println!(
            "  {}: applied version {}, needs {}: {why}",
            escape(&n.node),
            n.applied_version,
            n.needed_version
        );
    }
    crate::degraded::print_policy(r);
}

/// Whether the source's current version is what the nodes above enforce. The message and
/// warnings quote the policy's own text (names, fields), so they are escaped like a node's.
fn print_acceptance(a: &v1::PolicyAcceptance) {
    if a.accepted {
        println!("accepted");
    } else {
        let kept = if a.last_valid_in_force {
            "last valid version in force"
        } else {
            "nothing enforced"
        };
        println!(
            "REFUSED ({}): {} — {kept}",
            or_dash(&escape(&a.reason)),
            escape(&a.message)
        );
    }
    for w in &a.warnings {
        println!("  warning: {}", escape(w));
    }
}

/// `moatctl explain --server …`: the server's live state instead of a directory.
pub fn explain(
    conn: &Connection,
    from: &str,
    to: &str,
    proto: u8,
    port: u16,
    family: Option<String>,
    json: bool,
) -> Result<ExitCode> {
    tokio::runtime::Runtime::new()?.block_on(async move {
        let mut client = conn.client().await?;
        let r = client
            .explain(conn.request(v1::ExplainRequest {
                cluster: String::new(),
                from: from.into(),
                to: to.into(),
                protocol: u32::from(proto),
                port: u32::from(port),
                family: family.unwrap_or_default(),
            }))
            .await
            .map_err(|s| anyhow!("{}", s.message()))?
            .into_inner();
        let verdict: moat_policy::eval::Verdict = serde_json::from_str(&r.verdict_json).context("verdict")?;
        if json {
            println!("{}", serde_json::to_string_pretty(&json!({"from": from, "from_ip": r.from_ip, "to": to, "to_ip": r.to_ip, "verdict": verdict}))?);
        } else {
            let what = match proto {
                6 => format!("TCP/{port}"),
                17 => format!("UDP/{port}"),
                132 => format!("SCTP/{port}"),
                _ => "ICMP".to_string(),
            };
            println!("{from} ({}) -> {to} ({}) {what}: {}", r.from_ip, r.to_ip, if r.allowed { "ALLOWED" } else { "DENIED" });
            crate::explain::print_side("egress ", from, &verdict.egress, &[], true);
            crate::explain::print_side("ingress", to, &verdict.ingress, &[], false);
        }
        if r.allowed != verdict.allowed {
            bail!("server answer is inconsistent");
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn node_strings_cannot_drive_the_terminal() {
        assert_eq!(escape("6.18.44-fc"), "6.18.44-fc");
        assert_eq!(escape("é ✓"), "é ✓");
        assert_eq!(
            escape("a\x1b[2J\x1b]0;owned\x07b"),
            "a\\u{1b}[2J\\u{1b}]0;owned\\u{7}b"
        );
        assert_eq!(escape("x\r\nnode-9  yes"), "x\\r\\nnode-9  yes");
        assert_eq!(escape("\u{202e}cba"), "\\u{202e}cba");
        assert_eq!(escape("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(escape("a\\nb"), "a\\\\nb");
    }
}
