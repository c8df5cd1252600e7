//! Differential test: random policies, labels and named ports on the conformance cluster,
//! judged by the reference evaluator, by nft and by eBPF on real packets, in IPv4 and IPv6.
//! Every cell (pod pair × protocol × port) must get the same verdict from all three.
//!
//! `MOAT_SEED=<n>` replays a run; `MOAT_CASES=<n>` sets how many random cases it draws.

use moat_conformance::cluster::{self, Family, Plan};
use moat_conformance::model::Evaluator;
use moat_conformance::runner::{self, Backend};
use moat_conformance::{Case, random};
use moat_harness::packets::PacketBackend;

/// The verdict of every probe of every case, applied one after another as live updates.
fn verdicts(backend: &mut dyn Backend, cases: &[Case], plan: Plan) -> Vec<Vec<bool>> {
    cases
        .iter()
        .map(|case| {
            let objects = cluster::objects(case, plan).unwrap();
            backend
                .apply(&objects)
                .unwrap_or_else(|e| panic!("{}: apply: {e}", case.name));
            backend
                .probe(&runner::probes(case, plan))
                .unwrap_or_else(|e| panic!("{}: probe: {e}", case.name))
        })
        .collect()
}

#[test]
fn random_policies_get_the_same_verdicts_from_the_evaluator_nft_and_ebpf() {
    let seed: u64 = std::env::var("MOAT_SEED").map_or_else(
        |_| rand::random::<u32>().into(),
        |s| s.parse().expect("MOAT_SEED is a number"),
    );
    let count: u64 =
        std::env::var("MOAT_CASES").map_or(8, |s| s.parse().expect("MOAT_CASES is a number"));
    eprintln!("differential run: MOAT_SEED={seed} MOAT_CASES={count}");
    let cases: Vec<Case> = (0..count).map(|i| random::case(seed + i)).collect();
    let slot = moat_harness::cluster::slot().unwrap();

    let mut wrong = Vec::new();
    let (mut allowed, mut denied) = (0usize, 0usize);
    for family in [Family::Ipv4, Family::Ipv6] {
        let plan = Plan {
            family,
            id: slot.id,
        };
        let truth = verdicts(&mut Evaluator::default(), &cases, plan);
        for backend in ["nft", "ebpf"] {
            let mut packets = PacketBackend::start(plan, backend).unwrap();
            let got = verdicts(&mut packets, &cases, plan);
            for ((case, want), got) in cases.iter().zip(&truth).zip(&got) {
                for ((p, want), got) in runner::probes(case, plan).iter().zip(want).zip(got) {
                    // A pod talking to itself never leaves its namespace: no dataplane sees
                    // it (the conformance runner lists these cells without counting them).
                    if p.from == p.to {
                        continue;
                    }
                    if want != got {
                        wrong.push(format!(
                            "{} {family} {backend}: {} -> {} {}/{}: evaluator {want}, {backend} {got}",
                            case.name, p.from, p.to, p.spec.protocol, p.spec.port
                        ));
                    }
                    if *want {
                        allowed += 1;
                    } else {
                        denied += 1;
                    }
                }
            }
        }
    }
    eprintln!("{allowed} allowed and {denied} denied cells compared");
    for w in &wrong {
        eprintln!("{w}");
    }
    if !wrong.is_empty() {
        for case in &cases {
            eprintln!(
                "--- {}\npolicies: {}",
                case.name,
                serde_yaml::to_string(&case.policies).unwrap()
            );
        }
    }
    assert!(
        wrong.is_empty(),
        "{} cells differ (replay with MOAT_SEED={seed} MOAT_CASES={count})",
        wrong.len()
    );
    // A run where policy never denied (or never allowed) anything would compare nothing.
    assert!(
        allowed > 0 && denied > 0,
        "{allowed} allowed, {denied} denied"
    );
}
