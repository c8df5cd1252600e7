//! ClusterNetworkPolicy conformance on real packets: the upstream SIG-Network cases and Moat's
//! own, IPv4 and IPv6, each case on the netns cluster of its `cluster:` section (built once
//! per section and family, every case of it applied as a live update), with the real server
//! and enforcers.
//!
//! CI runs the mixed cluster: eBPF and nft on alternate nodes, so both dataplanes judge, and
//! each judges the other's pods' traffic. The single-dataplane runs cost as much again each:
//! they are `#[ignore]`d and run by `scripts/test-slow.sh`.

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::time::Instant;

use moat_conformance::cluster::Family;
use moat_conformance::layout::Layout;
use moat_conformance::{Backend, Case, Error, Factory, Options, Probe, load_dir, run};
use moat_harness::packets::PacketBackend;
use moat_policy::model::K8sObject;

fn cases() -> Vec<Case> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cases = load_dir(&root.join("conformance/upstream/cnp")).unwrap();
    assert_eq!(cases.len(), 67, "all upstream cases are loaded");
    let ours = load_dir(&root.join("conformance/cases/cnp")).unwrap();
    assert_eq!(ours.len(), 7, "all of Moat's cases are loaded");
    cases.extend(ours);
    cases
}

/// A packet backend that reports, when the runner drops it, how many clusters it built.
struct Counted {
    inner: PacketBackend,
    built: Rc<RefCell<Vec<usize>>>,
}

impl Backend for Counted {
    fn supports_cluster_section(&self) -> bool {
        self.inner.supports_cluster_section()
    }
    fn enter(&mut self, layout: &Layout) -> Result<(), Error> {
        self.inner.enter(layout)
    }
    fn apply(&mut self, objects: &[K8sObject]) -> Result<(), Error> {
        self.inner.apply(objects)
    }
    fn probe(&mut self, probes: &[Probe]) -> Result<Vec<bool>, Error> {
        self.inner.probe(probes)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.built.borrow_mut().push(self.inner.clusters());
    }
}

/// Every cnp case in both families on clusters whose enforcers run `backend`.
fn every_case_passes(backend: &'static str) {
    let cases = cases();
    // The upstream fixture, Moat's own, and x/y/z (a case without one).
    let mut sections = Vec::new();
    for c in &cases {
        if !sections.contains(&&c.cluster) {
            sections.push(&c.cluster);
        }
    }
    assert_eq!(sections.len(), 3);
    let slot = moat_harness::cluster::slot().unwrap();
    let built = Rc::new(RefCell::new(Vec::new()));
    let counter = built.clone();
    let first = Layout::of(&cases[0]).unwrap();
    let factory: Factory<'_> = Box::new(move |plan| {
        let inner = PacketBackend::start_for(plan, backend, None, &first)?;
        let built = counter.clone();
        Ok(Box::new(Counted { inner, built }) as Box<dyn Backend>)
    });
    let opts = Options {
        families: vec![Family::Ipv4, Family::Ipv6],
        plan_id: slot.id,
        scratch: false,
        live: true,
    };
    let started = Instant::now();
    let report = run(&cases, &mut [(backend.to_string(), factory)], &opts);
    eprintln!("{report}");
    eprintln!(
        "{backend}: {} cases, both families, in {:.0?}",
        cases.len(),
        started.elapsed()
    );
    assert_eq!(report.failed(), 0, "{report}");
    assert_eq!(report.passed(), cases.len());
    assert_eq!(
        *built.borrow(),
        [sections.len(), sections.len()],
        "one cluster per section and family"
    );
}

/// A fleet with both dataplanes: nodes judge each other's pods' traffic alike.
#[test]
fn every_cnp_case_passes_on_a_cluster_mixing_ebpf_and_nft_nodes() {
    every_case_passes("mixed");
}

#[test]
#[ignore = "slow: scripts/test-slow.sh runs it"]
fn every_cnp_case_passes_on_packets_with_nft_in_both_families() {
    every_case_passes("nft");
}

#[test]
#[ignore = "slow: scripts/test-slow.sh runs it"]
fn every_cnp_case_passes_on_packets_with_ebpf_in_both_families() {
    every_case_passes("ebpf");
}
