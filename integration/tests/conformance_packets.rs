//! Conformance on real packets: every upstream case and every Moat case, IPv4 and IPv6,
//! enforced by each dataplane (and by both at once) on a netns cluster with the real server
//! and enforcers.

use std::path::Path;

use moat_conformance::cluster::Family;
use moat_conformance::{Backend, Case, Factory, Options, load_dir, run};
use moat_harness::packets::PacketBackend;

fn cases() -> Vec<Case> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cases = load_dir(&root.join("conformance/upstream/netpol")).unwrap();
    assert_eq!(cases.len(), 47, "all upstream cases are loaded");
    cases.extend(load_dir(&root.join("conformance/cases")).unwrap());
    cases
}

/// Every case in both families on one netns cluster whose enforcers run `backend` (`mixed`:
/// eBPF and nft on alternate nodes).
fn every_case_passes(backend: &'static str) {
    let cases = cases();
    let slot = moat_harness::cluster::slot().unwrap();
    let factory: Factory<'_> =
        Box::new(
            move |plan| Ok(Box::new(PacketBackend::start(plan, backend)?) as Box<dyn Backend>),
        );
    let opts = Options {
        families: vec![Family::Ipv4, Family::Ipv6],
        plan_id: slot.id,
        scratch: false,
        live: true,
    };
    let report = run(&cases, &mut [(backend.to_string(), factory)], &opts);
    eprintln!("{report}");
    assert_eq!(report.failed(), 0, "{report}");
    assert_eq!(report.passed(), cases.len());
}

#[test]
fn every_case_passes_on_packets_with_nft_in_both_families() {
    every_case_passes("nft");
}

#[test]
fn every_case_passes_on_packets_with_ebpf_in_both_families() {
    every_case_passes("ebpf");
}

/// A fleet with both dataplanes: nodes judge each other's pods' traffic alike.
#[test]
fn every_case_passes_on_a_cluster_mixing_ebpf_and_nft_nodes() {
    every_case_passes("mixed");
}
