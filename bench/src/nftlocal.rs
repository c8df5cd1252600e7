//! `moat-bench nft-local`: applies one snapshot with `NftBackend` in the namespace it runs
//! in, with the local pod table bound from that namespace's interfaces (`vp*` veths and the
//! host routes to them, as the harness wires pods), then exits; the table stays. The
//! datapath benchmark runs it in a harness node to measure the dataplane with its local pod
//! checks while the enforcer binary does not yet discover pods itself.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use moat_dataplane::Backend;
use moat_dataplane::local::{Bindings, Interfaces, Link, PodInterfaces, Topology, UnknownPods};
use moat_enforcer_nft::NftBackend;
use moat_policy::ir::NodeSnapshot;
use serde_json::Value;

fn ip_json(args: &[&str]) -> Result<Vec<Value>> {
    let out = Command::new("ip").arg("-j").args(args).output()?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("ip -j")
}

/// This namespace's links and host routes, as netlink reports them.
pub fn topology() -> Result<Topology> {
    let mut t = Topology::default();
    for l in ip_json(&["-d", "link", "show"])? {
        let index = l["ifindex"].as_u64().context("ifindex")? as u32;
        t.links.insert(
            index,
            Link {
                index,
                name: l["ifname"].as_str().unwrap_or_default().to_string(),
                kind: l["linkinfo"]["info_kind"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                master: None,
                global_addr: false,
            },
        );
    }
    for a in ip_json(&["addr", "show"])? {
        let global = a["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|i| i["scope"] == "global");
        if let Some(l) = a["ifindex"]
            .as_u64()
            .and_then(|i| t.links.get_mut(&(i as u32)))
        {
            l.global_addr = global;
        }
    }
    let by_name: BTreeMap<String, u32> = t
        .links
        .values()
        .map(|l| (l.name.clone(), l.index))
        .collect();
    for fam in ["-4", "-6"] {
        for r in ip_json(&[fam, "route", "show", "table", "main"])? {
            let (Some(dst), Some(dev)) = (r["dst"].as_str(), r["dev"].as_str()) else {
                continue;
            };
            if r.get("gateway").is_some() {
                continue;
            }
            let addr = dst.split('/').next().unwrap_or(dst);
            let host = match dst.split_once('/') {
                None => true,
                Some((_, len)) => len == "32" || len == "128",
            };
            if let (true, Ok(a), Some(i)) = (host, addr.parse::<IpAddr>(), by_name.get(dev)) {
                t.routes.insert(a, *i);
            }
        }
    }
    Ok(t)
}

pub fn run(snapshot: &Path) -> Result<()> {
    let snap: NodeSnapshot = serde_json::from_slice(&std::fs::read(snapshot)?)?;
    // The harness's pod veths hold 169.254.1.1 (scope global), so they are named here.
    let ifaces = Interfaces::classify(&topology()?, &PodInterfaces::Names(vec!["vp*".into()]));
    let local = Bindings::default().reconcile(&ifaces, Some(&snap), UnknownPods::Deny);
    let dir = tempfile::tempdir()?;
    let mut backend = NftBackend::open(
        moat_enforcer_nft::DEFAULT_MAX_ELEMENTS,
        &dir.path().join("lock"),
    )?;
    backend.adopt(None, &local)?;
    let applied = backend.apply_full(&snap, &local)?;
    if !applied.degraded.is_empty() {
        bail!("degraded: {:?}", applied.degraded);
    }
    let (known, unknown) = local.counts();
    eprintln!(
        "nft-local: version {} with {} pod interfaces, {known} known and {unknown} unknown addresses, {} elements",
        snap.version,
        local.pod_ifaces.len(),
        backend.counters().get("elements").copied().unwrap_or(0)
    );
    Ok(())
}
