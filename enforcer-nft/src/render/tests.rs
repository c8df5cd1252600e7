use moat_policy::Index;
use moat_policy::testkit::parse_all;
use moat_policy::testkit::random::{Features, World};
use nftables::schema::NfObject;
use rand::SeedableRng;
use rand::rngs::SmallRng;

use super::*;
use crate::desired::{Classes, desired};

/// Every command the renderer emits fits the nftables JSON schema (as the `nftables` crate
/// models it), for full replacements and for deltas between random states.
#[test]
fn every_command_fits_the_schema() {
    let mut f = Features::default();
    for case in 0..150u64 {
        let mut rng = SmallRng::seed_from_u64(case);
        let mut world = World::generate(&mut rng, &mut f);
        let mut classes = Classes::default();
        let mut prev: Option<Vec<Desired>> = None;
        for round in 0..3 {
            if round > 0 {
                world.mutate(&mut rng, &mut f, false);
            }
            let index = Index::build(parse_all(&world.objects()));
            let ds: Vec<Desired> = index
                .nodes()
                .iter()
                .map(|n| desired(&index.snapshot(&n.node).unwrap(), &mut classes))
                .collect();
            let mut batches = ds.iter().map(full).collect::<Vec<_>>();
            batches.extend(ds.iter().map(stage));
            batches.extend(ds.iter().map(switch));
            if let Some(p) = &prev {
                for (a, b) in p.iter().zip(&ds) {
                    batches.push(delta(a, b));
                }
            }
            for b in batches {
                for c in b {
                    // The crate has no `verdict` map type (see nft.rs); those declarations are
                    // checked by nft itself in the packet tests.
                    if c["add"]["map"]["map"] == "verdict" || c["flush"]["map"]["map"] == "verdict"
                    {
                        continue;
                    }
                    if let Err(e) = serde_json::from_value::<NfObject<'_>>(c.clone()) {
                        panic!(
                            "case {case}: {e}\n{}",
                            serde_json::to_string_pretty(&c).unwrap()
                        );
                    }
                }
            }
            prev = Some(ds);
        }
    }
}
