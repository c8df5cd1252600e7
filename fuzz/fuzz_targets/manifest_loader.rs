//! Arbitrary bytes as a manifest file: the loader must never panic, and whatever it accepts
//! must compile into a consistent index.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use moat_policy::Index;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let r = moat_manifests::parse_file(Path::new("fuzz.yaml"), &text);
    for d in &r.diagnostics {
        let _ = d.to_string();
    }
    let objects: Vec<_> = r.objects.into_iter().map(|l| l.object).collect();
    let index = Index::build(objects.clone());
    index.verify().expect("consistent index");
    // Applying the same objects one by one must give the same digests.
    let mut step = Index::new();
    for o in objects {
        step.apply(o);
    }
    let a: Vec<_> = index
        .nodes()
        .into_iter()
        .map(|n| (n.node, n.digest))
        .collect();
    let b: Vec<_> = step
        .nodes()
        .into_iter()
        .map(|n| (n.node, n.digest))
        .collect();
    assert_eq!(a, b);
});
