//! `moatctl explain`: the reference evaluator's verdict on one flow, with its reasons.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use moat_policy::eval::{self, Flow, Reason, Side, Verdict};
use moat_policy::model::{K8sObject, Object, lookup};
use serde::Serialize;

use crate::manifests;

#[derive(clap::Args)]
pub struct Args {
    /// Directory of Kubernetes manifests (searched recursively). Without it, ask the
    /// server's live state through the admin API (`--server`, admin certificate).
    #[arg(long, env = "MOAT_MANIFESTS")]
    manifests: Option<PathBuf>,
    #[command(flatten)]
    conn: crate::admin::Connection,
    /// Source: `namespace/pod`, `node:NAME`, or an IP address.
    #[arg(long)]
    from: String,
    /// Destination: `namespace/pod`, `node:NAME`, or an IP address.
    #[arg(long)]
    to: String,
    /// `PORT/PROTOCOL` (`80/TCP`, `53/UDP`, `9000/SCTP`; the protocol defaults to TCP), or `icmp`.
    #[arg(long, default_value = "80/TCP")]
    port: String,
    /// Address family when both ends have both.
    #[arg(long, value_parser = ["ipv4", "ipv6"])]
    family: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Output<'a> {
    from: &'a str,
    from_ip: IpAddr,
    to: &'a str,
    to_ip: IpAddr,
    protocol: &'a str,
    port: u16,
    verdict: &'a Verdict,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let (proto, port, _) = parse_port(&args.port)?;
    let Some(dir) = &args.manifests else {
        return crate::admin::explain(
            &args.conn,
            &args.from,
            &args.to,
            proto,
            port,
            args.family.clone(),
            args.json,
        );
    };
    let set = manifests::load(dir)?;
    let objects: Vec<Object> = set.objects().cloned().collect();
    let (proto, port, proto_name) = parse_port(&args.port)?;
    let want_v6 = match args.family.as_deref() {
        Some("ipv6") => Some(true),
        Some(_) => Some(false),
        None => None,
    };
    let src_all =
        lookup::addresses(&objects, &args.from).map_err(|e| anyhow!("{e} in the manifests"))?;
    let dst_all =
        lookup::addresses(&objects, &args.to).map_err(|e| anyhow!("{e} in the manifests"))?;
    let (src, dst) = lookup::pick(&src_all, &dst_all, want_v6).ok_or_else(|| {
        anyhow!(
            "{} and {} have no address of a common family",
            args.from,
            args.to
        )
    })?;
    let cluster = eval::Cluster::from_objects(set.k8s_objects());
    let verdict = eval::verdict(
        &cluster,
        &Flow {
            src,
            dst,
            proto,
            port,
        },
    );
    if args.json {
        let out = Output {
            from: &args.from,
            from_ip: src,
            to: &args.to,
            to_ip: dst,
            protocol: &proto_name,
            port,
            verdict: &verdict,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    let what = if proto_name == "ICMP" {
        "ICMP".to_string()
    } else {
        format!("{proto_name}/{port}")
    };
    println!(
        "{} ({src}) -> {} ({dst}) {what}: {}",
        args.from,
        args.to,
        if verdict.allowed { "ALLOWED" } else { "DENIED" }
    );
    let k8s = set.k8s_objects();
    print_side("egress ", &args.from, &verdict.egress, &k8s, true);
    print_side("ingress", &args.to, &verdict.ingress, &k8s, false);
    Ok(ExitCode::SUCCESS)
}

fn parse_port(s: &str) -> Result<(u8, u16, String)> {
    if s.eq_ignore_ascii_case("icmp") {
        return Ok((1, 0, "ICMP".into()));
    }
    let (p, proto) = s.split_once('/').unwrap_or((s, "TCP"));
    let proto = proto.to_ascii_uppercase();
    let n = match proto.as_str() {
        "TCP" => 6,
        "UDP" => 17,
        "SCTP" => 132,
        _ => bail!("unknown protocol {proto:?} in --port (TCP, UDP, SCTP, or icmp)"),
    };
    let port: u16 = p
        .parse()
        .with_context(|| format!("bad port {p:?} in --port"))?;
    if port == 0 {
        bail!("port 0 in --port");
    }
    Ok((n, port, proto))
}

pub(crate) fn print_side(label: &str, who: &str, side: &Side, k8s: &[K8sObject], egress: bool) {
    let dir = if egress { "egress" } else { "ingress" };
    let verdict = if side.allowed { "allowed" } else { "DENIED" };
    match &side.reason {
        Reason::NotAPod => println!(
            "  {label} {who}: {verdict}: not a pod that policy applies to (external address, node, or host-network pod)"
        ),
        Reason::NodeLocal => println!(
            "  {label} {who}: {verdict}: traffic between a pod and its own node is always allowed"
        ),
        Reason::NotIsolated => {
            println!("  {label} {who}: {verdict}: no NetworkPolicy selects it for {dir}")
        }
        Reason::AllowedBy(rules) => {
            println!("  {label} {who}: {verdict} by:");
            for r in rules {
                // From a server there are no manifests to quote: name the rule only.
                if k8s.is_empty() {
                    println!("      {} spec.{dir}[{}]", r.policy, r.index);
                } else {
                    let rule = rule_json(k8s, &r.policy, egress, r.index);
                    println!("      {} spec.{dir}[{}]: {rule}", r.policy, r.index);
                }
            }
        }
        Reason::DeniedBy(policies) => {
            let names: Vec<String> = policies.iter().map(ToString::to_string).collect();
            println!(
                "  {label} {who}: {verdict}: isolated for {dir} by {}; none of their {dir} rules allows this flow",
                names.join(", ")
            );
        }
        Reason::Cluster(r) => println!(
            "  {label} {who}: {verdict} by ClusterNetworkPolicy {r} (spec.{dir}[{}])",
            r.index
        ),
    }
    for p in &side.passed {
        println!(
            "      after passing ClusterNetworkPolicy {p} (spec.{dir}[{}])",
            p.index
        );
    }
}

/// The rule as written, for humans.
fn rule_json(k8s: &[K8sObject], p: &eval::PolicyRef, egress: bool, i: usize) -> String {
    for o in k8s {
        let K8sObject::NetworkPolicy(np) = o else {
            continue;
        };
        let ns = np.metadata.namespace.as_deref().unwrap_or("default");
        if ns != p.namespace || np.metadata.name.as_deref() != Some(p.name.as_str()) {
            continue;
        }
        let spec = np.spec.as_ref();
        let rule = if egress {
            spec.and_then(|s| s.egress.as_ref())
                .and_then(|r| r.get(i))
                .map(serde_json::to_string)
        } else {
            spec.and_then(|s| s.ingress.as_ref())
                .and_then(|r| r.get(i))
                .map(serde_json::to_string)
        };
        if let Some(Ok(s)) = rule {
            return s;
        }
    }
    "?".into()
}
