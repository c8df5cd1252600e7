//! Every case in `shared/conformance/netpol`, `shared/conformance/cnp` and
//! `conformance/cases` passes in model mode: IPv4 and IPv6, from scratch and as live updates.

use std::path::Path;

use moat_conformance::cluster::{Family, Plan};
use moat_conformance::{Case, Options, load_dir, model_backends, run};

fn run_dir(dir: &Path, expect_cases: Option<usize>) {
    let cases = load_dir(dir).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
    if let Some(n) = expect_cases {
        assert_eq!(cases.len(), n, "case count in {}", dir.display());
    }
    run_cases(&cases);
}

/// Both families, from scratch and as live updates.
fn every_way() -> Options {
    Options {
        families: vec![Family::Ipv4, Family::Ipv6],
        plan_id: 0,
        scratch: true,
        live: true,
    }
}

/// Runs `cases` (one of them wrong in exactly one cell) every way on both model backends:
/// the cell must be named, and fail all 8 runs.
fn assert_one_wrong_cell(cases: &[Case], cell: &str) {
    let report = run(cases, &mut model_backends(), &every_way());
    let text = report.to_string();
    assert_eq!(report.failed(), 1, "{text}");
    assert!(
        text.contains(&format!("{cell}: expected allowed, got denied")),
        "{text}"
    );
    assert!(text.ends_with("0 passed, 1 failed"), "{text}");
    // Both model backends, both families, scratch and live: 8 failing runs.
    assert_eq!(text.matches("1 cells wrong").count(), 8, "{text}");
}

fn run_cases(cases: &[Case]) {
    let report = run(cases, &mut model_backends(), &every_way());
    println!("{report}");
    assert_eq!(report.failed(), 0, "\n{report}");
    assert_eq!(report.passed(), cases.len(), "\n{report}");
}

/// The upstream cases, vendored so a clean clone can run them.
#[test]
fn shared_cases_pass_in_model_mode() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("upstream/netpol");
    run_dir(&dir, Some(47));
}

/// The ClusterNetworkPolicy cases, vendored likewise.
#[test]
fn shared_cnp_cases_pass_in_model_mode() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("upstream/cnp");
    run_dir(&dir, Some(67));
}

/// Moat's own ClusterNetworkPolicy cases: what the upstream ones leave out (NetworkPolicy
/// beside CNP, `networks` placeholders, overrides on a `cluster:` section).
#[test]
fn own_cnp_cases_pass_in_model_mode() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("cases/cnp");
    run_dir(&dir, None);
}

/// Every family in one live run: the model moves from the x/y/z cluster to the CNP cases'
/// cluster and back as live updates (pods replaced, addresses reused by other pods).
#[test]
fn every_case_passes_in_one_live_run_across_clusters() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cases = Vec::new();
    for dir in [
        "upstream/netpol",
        "upstream/cnp",
        "cases",
        "cases/cnp",
        "upstream/netpol",
    ] {
        cases.extend(load_dir(&root.join(dir)).unwrap());
    }
    let report = run(
        &cases,
        &mut model_backends(),
        &Options {
            families: vec![Family::Ipv4, Family::Ipv6],
            plan_id: 0,
            scratch: false,
            live: true,
        },
    );
    // The netpol cases run twice and report under one name.
    assert_eq!(report.failed(), 0, "\n{report}");
}

/// The vendored copy must match `../shared/conformance` wherever that exists beside the
/// project (it does on development machines).
#[test]
fn vendored_cases_match_shared() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance");
    if !shared.exists() {
        println!(
            "NOTE: {} not present; vendored copy not compared",
            shared.display()
        );
        return;
    }
    let ours = Path::new(env!("CARGO_MANIFEST_DIR")).join("upstream");
    let list = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    for dir in ["netpol", "cnp"] {
        let (shared, ours) = (shared.join(dir), ours.join(dir));
        assert_eq!(
            list(&shared),
            list(&ours),
            "file lists differ: re-copy shared/conformance/{dir}"
        );
        for f in list(&shared) {
            assert_eq!(
                std::fs::read(shared.join(&f)).unwrap(),
                std::fs::read(ours.join(&f)).unwrap(),
                "{dir}/{f:?} differs from shared/conformance: re-copy it"
            );
        }
    }
    assert_eq!(
        std::fs::read(shared.join("README.md")).unwrap(),
        std::fs::read(ours.join("README.md")).unwrap(),
        "README.md differs from shared/conformance: re-copy it"
    );
}

#[test]
fn own_cases_pass_in_model_mode() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("cases");
    run_dir(&dir, None);
}

#[test]
fn a_wrong_expectation_fails_and_names_the_cells() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("cases");
    let mut cases = load_dir(&dir).unwrap();
    cases.retain(|c| c.name == "moat-endport-range");
    // Claim that x/a's port 81 is open to y/b: the runner must catch it on every run.
    cases[0].expect[1]
        .exceptions
        .retain(|e| !(e.from == "y/b" && e.to == "x/a"));
    assert_one_wrong_cell(&cases, "y/b -> x/a TCP/81");
}

/// The same for a ClusterNetworkPolicy case: its own pods are probed and compared, every
/// pair of them, on both backends.
#[test]
fn a_wrong_cnp_expectation_fails_and_names_the_cells() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("upstream/cnp");
    let mut cases = load_dir(&dir).unwrap();
    cases.retain(|c| c.name == "cnp-admin-tier-egress-tcp-step1");
    let pods = 8;
    assert_eq!(
        moat_conformance::runner::probes(&cases[0], Plan::new(Family::Ipv4)).len(),
        pods * pods * cases[0].probes.len(),
        "every ordered pair of the case's pods, per probe"
    );
    // Claim that gryffindor may reach slytherin on TCP 80, which the Admin tier denies.
    let (from, to) = (
        "network-policy-conformance-gryffindor/harry-potter-1",
        "network-policy-conformance-slytherin/draco-malfoy-0",
    );
    cases[0].expect[0]
        .exceptions
        .retain(|e| !(e.from == from && e.to == to));
    assert_one_wrong_cell(&cases, &format!("{from} -> {to} TCP/80"));
}
