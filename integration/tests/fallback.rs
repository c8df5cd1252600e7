//! `--backend auto` on nodes that cannot run the eBPF dataplane: one whose `bpf()` is refused
//! by a seccomp filter, one whose program the kernel's verifier rejects. Each must choose
//! nftables, say which probe failed (in `moatctl status`), and enforce like its eBPF
//! neighbours.

use std::collections::BTreeMap;

use moat_harness::agent::Proto;
use moat_harness::cluster::binary;
use moat_integration::world::World;
use serde_json::Value;

fn policy(name: &str, ns: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
    )
}

/// Checks that node `odd` runs nft because `probe` failed (with `why` in its error), every
/// other node eBPF, and that
/// policy is enforced on every node alike: x's pods accept only y, on TCP 80.
fn falls_back_and_enforces(w: &mut World, odd: usize, probe: &str, why: &str) {
    let status = w.moat.status().unwrap();
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), w.spec.nodes);
    for n in nodes {
        let name = n["node"].as_str().unwrap();
        let sel = n["selection"].as_str().unwrap_or_default();
        if name == moat_integration::world::node_name(odd) {
            assert_eq!(n["backend"], Value::from("nft"), "{n}");
            assert!(
                sel.starts_with(&format!("nft: probe {probe} failed: ")) && sel.contains(why),
                "the selection names the failed probe {probe} and why ({why}): {sel}"
            );
        } else {
            assert_eq!(n["backend"], Value::from("ebpf"), "{n}");
            assert!(sel.starts_with("ebpf"), "{sel}");
        }
    }
    w.apply(&[policy(
        "from-y",
        "x",
        "  podSelector: {}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n    ports: [{protocol: TCP, port: 80}]\n",
    )]);
    // Every x pod (one per node) from a y and a z pod: y passes on 80 only, z never.
    for x in ["x/a", "x/b", "x/c"] {
        assert!(w.reach("y/a", x, Proto::Tcp, 80), "y/a → {x}:80");
        assert!(!w.reach("y/a", x, Proto::Tcp, 81), "y/a → {x}:81");
        assert!(!w.reach("z/b", x, Proto::Tcp, 80), "z/b → {x}:80");
        assert!(!w.reach("z/b", x, Proto::Udp, 80), "z/b → {x}:80/udp");
    }
    assert!(w.reach("x/a", "z/c", Proto::Tcp, 80), "egress not isolated");
}

#[test]
fn an_enforcer_whose_bpf_calls_seccomp_refuses_runs_nft_and_enforces() {
    let seccomp = binary("moat-seccomp-exec").unwrap().display().to_string();
    let mut w = World::start_wrapped("auto", BTreeMap::from([(1, vec![seccomp, "--".into()])]));
    falls_back_and_enforces(&mut w, 1, "bpf_syscall", "Operation not permitted");
}

/// The built-in datapath object with its first program instruction replaced by a read above
/// the stack frame (`r0 = *(u64 *)(r10 + 8)`), which the verifier refuses.
fn rejected_object(path: &std::path::Path) {
    let mut elf = moat_enforcer_ebpf::dataplane::builtin_object().to_vec();
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize;
    let (shoff, shentsize, shnum, shstrndx) = (
        u64_at(&elf, 0x28),
        u16_at(&elf, 0x3a),
        u16_at(&elf, 0x3c),
        u16_at(&elf, 0x3e),
    );
    let section = |i: usize| shoff + i * shentsize;
    let strtab = u64_at(&elf, section(shstrndx) + 0x18);
    let classifier = (0..shnum)
        .find(|i| {
            let name = strtab + u32_at(&elf, section(*i));
            elf[name..].starts_with(b"classifier\0")
        })
        .expect("a classifier section");
    let at = u64_at(&elf, section(classifier) + 0x18);
    elf[at..at + 8].copy_from_slice(&[0x79, 0xa0, 0x08, 0x00, 0, 0, 0, 0]);
    std::fs::write(path, elf).unwrap();
}

#[test]
fn an_enforcer_whose_program_the_verifier_rejects_runs_nft_and_enforces() {
    let dir = tempfile::tempdir().unwrap();
    let object = dir.path().join("rejected.o");
    rejected_object(&object);
    let env = vec![
        "env".to_string(),
        format!(
            "{}={}",
            moat_enforcer_ebpf::dataplane::OBJECT_ENV,
            object.display()
        ),
    ];
    let mut w = World::start_wrapped("auto", BTreeMap::from([(2, env)]));
    falls_back_and_enforces(&mut w, 2, "program_load", "invalid read from stack");
}
