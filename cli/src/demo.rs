//! `moatctl demo`: Moat end to end on this machine. The example cluster becomes network
//! namespaces (a node namespace per Node, a pod namespace per Pod with the Pod's own
//! addresses), the real `moat-server` (file source, sled, mutual TLS) runs in the fabric and a
//! real `moat-enforcer` in every node; the reachability matrix is probed with real packets
//! before and after the example policies are applied, and checked against the reference
//! evaluator. Needs root (namespaces, nftables).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use moat_harness::agent::{ProbeReq, Proto};
use moat_harness::cluster::{PodSpec, Spec, slot};
use moat_harness::moat::Moat;
use moat_policy::eval::{self, Flow};
use moat_policy::model::K8sObject;

use crate::manifests;

#[derive(clap::Args)]
pub struct Args {
    /// Manifests of the cluster (Nodes, Namespaces, Pods), loaded before any policy.
    #[arg(long, env = "MOAT_DEMO_CLUSTER", num_args = 1.., default_values = ["examples/cluster.yaml", "examples/three-tier/pods.yaml"])]
    cluster: Vec<PathBuf>,
    /// Manifests applied as the change (policies, and the namespaces they bring).
    #[arg(
        long,
        env = "MOAT_DEMO_POLICIES",
        default_value = "examples/three-tier/shop.yaml"
    )]
    policies: PathBuf,
    /// Dataplane of the enforcers: `auto` (eBPF where the kernel can run it), `ebpf`, `nft`,
    /// or `mixed` (eBPF and nft on alternate nodes).
    #[arg(long, env = "MOAT_DEMO_BACKEND", default_value = "auto", value_parser = ["auto", "ebpf", "nft", "mixed"])]
    backend: String,
    /// Keep everything running after the demo until Ctrl-C (edit the printed manifest
    /// directory to change policy live).
    #[arg(long)]
    hold: bool,
    /// Run the server and every enforcer as containers of this image (podman; build it
    /// with `./scripts/image.sh`) under the Helm chart's security context, user, seccomp
    /// profile and mounts, read from `helm template`.
    #[arg(long, env = "MOAT_DEMO_IMAGE")]
    image: Option<String>,
    /// With --image: which seccomp profiles the chart's `RuntimeDefault` stands for —
    /// `podman` (podman's and CRI-O's default), `containerd` (containerd's RuntimeDefault)
    /// — or `chart`: the enforcer under the chart's own profile (files/seccomp-enforcer.json).
    #[arg(long, env = "MOAT_DEMO_SECCOMP", default_value = "containerd", value_parser = ["podman", "containerd", "chart"])]
    seccomp: String,
    /// With --image and --backend auto: fail unless every node selected this dataplane.
    #[arg(long, value_parser = ["ebpf", "nft"])]
    expect_backend: Option<String>,
}

const APPLY: Duration = Duration::from_secs(30);

fn load(paths: &[PathBuf]) -> Result<Vec<K8sObject>> {
    let mut out = Vec::new();
    for p in paths {
        out.extend(manifests::load(p)?.k8s_objects());
    }
    Ok(out)
}

/// A pod of the demo: its key, addresses and declared ports.
struct DemoPod {
    key: String,
    v4: IpAddr,
    v6: IpAddr,
    ports: Vec<(Proto, u16)>,
}

fn proto(p: Option<&str>) -> Result<Proto> {
    Ok(match p.unwrap_or("TCP") {
        "TCP" => Proto::Tcp,
        "UDP" => Proto::Udp,
        "SCTP" => Proto::Sctp,
        other => bail!("unknown protocol {other}"),
    })
}

fn pods(objects: &[K8sObject]) -> Result<Vec<(DemoPod, String)>> {
    let mut out = Vec::new();
    for o in objects {
        let K8sObject::Pod(p) = o else { continue };
        let spec = p.spec.as_ref().context("pod without spec")?;
        if spec.host_network == Some(true) {
            continue;
        }
        let key = format!(
            "{}/{}",
            p.metadata.namespace.as_deref().unwrap_or("default"),
            p.metadata.name.as_deref().unwrap_or("")
        );
        let ips: Vec<IpAddr> = p
            .status
            .iter()
            .flat_map(|s| s.pod_ips.iter().flatten())
            .filter_map(|ip| ip.ip.parse().ok())
            .collect();
        let (Some(v4), Some(v6)) = (
            ips.iter().copied().find(IpAddr::is_ipv4),
            ips.iter().copied().find(IpAddr::is_ipv6),
        ) else {
            bail!("pod {key} needs an IPv4 and an IPv6 address for the dual-stack demo");
        };
        let mut ports = Vec::new();
        for c in &spec.containers {
            for cp in c.ports.iter().flatten() {
                ports.push((proto(cp.protocol.as_deref())?, cp.container_port as u16));
            }
        }
        let node = spec.node_name.clone().context("pod without nodeName")?;
        out.push((DemoPod { key, v4, v6, ports }, node));
    }
    Ok(out)
}

pub fn run(args: Args) -> Result<ExitCode> {
    let mut base = load(&args.cluster)?;
    let change = load(std::slice::from_ref(&args.policies))?;
    let nodes: Vec<String> = base
        .iter()
        .filter_map(|o| match o {
            K8sObject::Node(n) => n.metadata.name.clone(),
            _ => None,
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let demo = pods(&base)?;
    let slot = slot()?;
    let mut spec = Spec {
        id: slot.id,
        nodes: nodes.len(),
        pods: Vec::new(),
        tcp: Vec::new(),
        udp: Vec::new(),
        sctp: Vec::new(),
    };
    for (p, node) in &demo {
        let n = nodes
            .iter()
            .position(|x| x == node)
            .with_context(|| format!("pod {} is on unknown node {node}", p.key))?;
        let (IpAddr::V4(v4), IpAddr::V6(v6)) = (p.v4, p.v6) else {
            unreachable!()
        };
        spec.pods.push(PodSpec {
            key: p.key.clone(),
            node: n,
            v4,
            v6,
        });
        for (proto, port) in &p.ports {
            let list = match proto {
                Proto::Tcp => &mut spec.tcp,
                Proto::Udp => &mut spec.udp,
                _ => &mut spec.sctp,
            };
            if !list.contains(port) {
                list.push(*port);
            }
        }
    }
    // The harness gives nodes its own fabric addresses; the Node objects say the same, so
    // node traffic and ipBlocks agree with what the packets carry.
    for o in &mut base {
        if let K8sObject::Node(n) = o {
            let i = nodes
                .iter()
                .position(|x| Some(x) == n.metadata.name.as_ref())
                .expect("listed");
            let status = n.status.get_or_insert_with(Default::default);
            status.addresses = Some(vec![
                address(spec.node_v4(i).into()),
                address(spec.node_v6(i).into()),
            ]);
        }
    }

    println!(
        "building {} nodes and {} pods as network namespaces…",
        nodes.len(),
        demo.len()
    );
    let t = Instant::now();
    let moat = match &args.image {
        Some(image) => {
            let seccomp = args.seccomp.parse()?;
            println!(
                "running the server and enforcers as containers of {image} (seccomp: {seccomp})"
            );
            let containers = moat_harness::container::Containers::new(image, seccomp)?;
            Moat::start_in_containers(spec, nodes.clone(), &args.backend, containers)?
        }
        None => Moat::start(spec, nodes.clone(), &args.backend)?,
    };
    // Namespaces the change brings come first, so the pods exist before policy.
    let namespaces: Vec<K8sObject> = change
        .iter()
        .filter(|o| matches!(o, K8sObject::Namespace(_)))
        .cloned()
        .collect();
    let mut before = base.clone();
    before.extend(namespaces);
    moat.apply(&before, APPLY)?;
    println!(
        "moat-server and {} moat-enforcer ({}) running, every node in sync, in {:.1?}",
        nodes.len(),
        args.backend,
        t.elapsed()
    );
    let mut moat = moat;
    let mut mismatches = matrix(&mut moat, &demo, &before, "without policy")?;

    let mut after = base.clone();
    after.extend(change);
    let t = Instant::now();
    moat.apply(&after, APPLY)?;
    println!(
        "\napplied {} — every enforcer acknowledged it in {:.1?}",
        args.policies.display(),
        t.elapsed()
    );
    mismatches += matrix(&mut moat, &demo, &after, "with policy")?;
    println!("\n{}", moat.status_table(&[])?);
    let wrong_backend = backends(&moat, args.expect_backend.as_deref())?;

    if wrong_backend {
        return Ok(ExitCode::FAILURE);
    }
    if mismatches > 0 {
        eprintln!("{mismatches} cells disagree with the reference evaluator");
        return Ok(ExitCode::FAILURE);
    }
    println!("every probed cell matches the reference evaluator");
    if args.hold {
        println!(
            "\nholding: edit {} to change the cluster; Ctrl-C ends the demo and removes everything",
            moat.manifests().display()
        );
        hold();
    }
    drop(slot);
    Ok(ExitCode::SUCCESS)
}

/// True when `expect` is given and some node selected another dataplane (the status
/// table above shows every node's and why).
fn backends(moat: &Moat, expect: Option<&str>) -> Result<bool> {
    let status = moat.status()?;
    let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
    let mut wrong = expect.is_some() && nodes.len() != moat.node_names.len();
    for n in &nodes {
        let backend = n["backend"].as_str().unwrap_or("?");
        if expect.is_some_and(|e| e != backend) {
            eprintln!(
                "  node {} runs {backend}, expected {}",
                n["node"],
                expect.unwrap_or_default()
            );
            wrong = true;
        }
    }
    Ok(wrong)
}

fn address(ip: IpAddr) -> k8s_openapi::api::core::v1::NodeAddress {
    k8s_openapi::api::core::v1::NodeAddress {
        type_: "InternalIP".into(),
        address: ip.to_string(),
    }
}

/// Blocks until SIGINT or SIGTERM, so the caller's destructors remove the namespaces.
fn hold() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    });
}

/// Probes every pod → every other pod's declared ports in both families and prints the
/// matrix: `✓` allowed, `·` denied, `!` when packets disagree with the evaluator.
fn matrix(
    moat: &mut Moat,
    pods: &[(DemoPod, String)],
    objects: &[K8sObject],
    title: &str,
) -> Result<usize> {
    let cluster = eval::Cluster::from_objects(objects.iter().cloned());
    let mut columns = Vec::new();
    for (p, _) in pods {
        for (proto, port) in &p.ports {
            columns.push((p, *proto, *port));
        }
    }
    let mut reqs = Vec::new();
    for (from, _) in pods {
        let mut probes = Vec::new();
        for (to, proto, port) in &columns {
            for dst in [to.v4, to.v6] {
                probes.push(ProbeReq {
                    dst,
                    proto: *proto,
                    port: *port,
                });
            }
        }
        reqs.push((from.key.clone(), probes));
    }
    let results = moat.cluster.probe(&reqs, Duration::from_millis(400), 1)?;
    let short = |k: &str| k.split_once('/').map_or(k, |(_, n)| n).to_string();
    let heads: Vec<String> = columns
        .iter()
        .map(|(to, proto, port)| format!("{}:{port}/{proto:?}", short(&to.key)))
        .collect();
    let width = pods.iter().map(|(p, _)| p.key.len()).max().unwrap_or(0);
    println!(
        "\nreachability {title} (IPv4 and IPv6; ✓ allowed, · denied, ! differs from the evaluator):"
    );
    for (i, h) in heads.iter().enumerate() {
        println!("{:width$}   {}{h}", "", "│ ".repeat(i));
    }
    let mut bad = 0;
    for ((from, _), row) in pods.iter().zip(results) {
        let mut line = format!("{:width$}  ", from.key);
        for (c, (to, proto, port)) in columns.iter().enumerate() {
            let cell = if to.key == from.key {
                // A pod reaching itself is loopback on a real node; not a policy question.
                "-"
            } else {
                let expect = [from.v4, from.v6]
                    .into_iter()
                    .zip([to.v4, to.v6])
                    .all(|(s, d)| {
                        eval::verdict(
                            &cluster,
                            &Flow {
                                src: s,
                                dst: d,
                                proto: match proto {
                                    Proto::Tcp => 6,
                                    Proto::Udp => 17,
                                    Proto::Sctp => 132,
                                    Proto::Icmp => 1,
                                },
                                port: *port,
                            },
                        )
                        .allowed
                    });
                let got = (row[2 * c], row[2 * c + 1]);
                match got {
                    (a, b) if a == b && a == expect => {
                        if a {
                            "✓"
                        } else {
                            "·"
                        }
                    }
                    _ => {
                        bad += 1;
                        "!"
                    }
                }
            };
            line.push_str(&format!(" {cell}"));
        }
        println!("{line}");
    }
    Ok(bad)
}
