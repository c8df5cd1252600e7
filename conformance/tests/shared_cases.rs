//! Every case in `shared/conformance/netpol` and `conformance/cases` passes in model mode:
//! IPv4 and IPv6, from scratch and as live updates.

use std::path::Path;

use moat_conformance::cluster::Family;
use moat_conformance::{Options, load_dir, model_backends, run};

fn run_dir(dir: &Path, expect_cases: Option<usize>) {
    let cases = load_dir(dir).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
    if let Some(n) = expect_cases {
        assert_eq!(cases.len(), n, "case count in {}", dir.display());
    }
    let report = run(
        &cases,
        &mut model_backends(),
        &Options {
            families: vec![Family::Ipv4, Family::Ipv6],
            plan_id: 0,
            scratch: true,
            live: true,
        },
    );
    println!("{report}");
    assert_eq!(report.failed(), 0, "\n{report}");
}

/// The upstream cases, vendored so a clean clone can run them.
#[test]
fn shared_cases_pass_in_model_mode() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("upstream/netpol");
    run_dir(&dir, Some(47));
}

/// The vendored copy must match `../shared/conformance` wherever that exists beside the
/// project (it does on development machines).
#[test]
fn vendored_cases_match_shared() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance/netpol");
    if !shared.exists() {
        println!(
            "NOTE: {} not present; vendored copy not compared",
            shared.display()
        );
        return;
    }
    let ours = Path::new(env!("CARGO_MANIFEST_DIR")).join("upstream/netpol");
    let list = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        list(&shared),
        list(&ours),
        "file lists differ: re-copy shared/conformance/netpol"
    );
    for f in list(&shared) {
        assert_eq!(
            std::fs::read(shared.join(&f)).unwrap(),
            std::fs::read(ours.join(&f)).unwrap(),
            "{f:?} differs from shared/conformance: re-copy it"
        );
    }
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
    let report = run(
        &cases,
        &mut model_backends(),
        &Options {
            families: vec![Family::Ipv4, Family::Ipv6],
            plan_id: 0,
            scratch: true,
            live: true,
        },
    );
    let text = report.to_string();
    assert_eq!(report.failed(), 1, "{text}");
    assert!(
        text.contains("y/b -> x/a TCP/81: expected allowed, got denied"),
        "{text}"
    );
    assert!(text.ends_with("0 passed, 1 failed"), "{text}");
    // Both model backends, both families, scratch and live: 8 failing runs.
    assert_eq!(text.matches("1 cells wrong").count(), 8, "{text}");
}
