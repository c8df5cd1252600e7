//! `moatctl` as a user runs it.

use std::process::Command;

use moat_integration::{binary, copy_dir, repo};

fn moatctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary("moatctl"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("run moatctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn conformance_passes_the_shared_and_own_cases() {
    let (code, out, err) = moatctl(&[
        "conformance",
        "--cases",
        "conformance/upstream/netpol",
        "--mode",
        "model",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("PASS ")).count(),
        47,
        "{out}"
    );
    assert!(out.trim_end().ends_with("47 passed, 0 failed"), "{out}");

    let (code, out, err) = moatctl(&["conformance", "--cases", "conformance/cases"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("PASS moat-ipblock-everything-except-ipv4 (4 runs; 4 skipped: -ipv4 case, IPv6 run skipped)"), "{out}");
}

#[test]
fn conformance_fails_loudly_on_a_wrong_table() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo().join("conformance/cases/moat-sctp-named-port.yaml"))
        .unwrap();
    // Claim SCTP/80 is open everywhere.
    let broken = text.replacen("  - {from: \"x/a\", to: \"x/c\", allowed: false}\n", "", 2);
    assert_ne!(broken, text);
    std::fs::write(dir.path().join("moat-sctp-named-port.yaml"), broken).unwrap();
    let (code, out, _) = moatctl(&[
        "conformance",
        "--cases",
        dir.path().to_str().unwrap(),
        "--family",
        "ipv4",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL moat-sctp-named-port"), "{out}");
    assert!(
        out.contains("x/a -> x/c SCTP/80: expected allowed, got denied"),
        "{out}"
    );
    assert!(out.trim_end().ends_with("0 passed, 1 failed"), "{out}");
}

#[test]
fn explain_names_the_deciding_policies() {
    let (code, out, err) = moatctl(&[
        "explain",
        "--manifests",
        "examples",
        "--from",
        "shop/frontend-0",
        "--to",
        "shop/backend-0",
        "--port",
        "8080/TCP",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(
            "shop/frontend-0 (10.244.1.30) -> shop/backend-0 (10.244.2.31) TCP/8080: ALLOWED"
        ),
        "{out}"
    );
    assert!(out.contains("shop/frontend spec.egress[0]"), "{out}");
    assert!(out.contains("shop/backend spec.ingress[0]"), "{out}");

    let (_, out, _) = moatctl(&[
        "explain",
        "--manifests",
        "examples",
        "--from",
        "shop/frontend-0",
        "--to",
        "shop/database-0",
        "--port",
        "5432",
    ]);
    assert!(out.contains("TCP/5432: DENIED"), "{out}");
    assert!(
        out.contains("isolated for ingress by shop/database, shop/default-deny"),
        "{out}"
    );

    // IPv6 and external addresses.
    let (_, out, _) = moatctl(&[
        "explain",
        "--manifests",
        "examples",
        "--from",
        "2001:db8::1",
        "--to",
        "shop/frontend-1",
        "--port",
        "80",
        "--family",
        "ipv6",
    ]);
    assert!(
        out.starts_with(
            "2001:db8::1 (2001:db8::1) -> shop/frontend-1 (fd00:244:2::30) TCP/80: ALLOWED"
        ),
        "{out}"
    );

    // JSON for tools.
    let (_, out, _) = moatctl(&[
        "explain",
        "--manifests",
        "examples",
        "--from",
        "billing/payments-0",
        "--to",
        "198.51.100.1",
        "--port",
        "443",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["verdict"]["allowed"], false);
    assert_eq!(
        v["verdict"]["egress"]["reason"]["DeniedBy"][0]["name"],
        "payments-egress"
    );
}

#[test]
fn explain_reports_bad_input_clearly() {
    let (code, _, err) = moatctl(&[
        "explain",
        "--manifests",
        "examples",
        "--from",
        "shop/nope",
        "--to",
        "shop/backend-0",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("no pod \"shop/nope\" in the manifests"),
        "{err}"
    );
    let (code, _, err) = moatctl(&[
        "explain",
        "--manifests",
        "examples",
        "--from",
        "shop/frontend-0",
        "--to",
        "shop/backend-0",
        "--port",
        "80/ICMP",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown protocol"), "{err}");
    let (code, _, err) = moatctl(&[
        "explain",
        "--manifests",
        "/nonexistent",
        "--from",
        "a/b",
        "--to",
        "c/d",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("cannot read manifest directory /nonexistent"),
        "{err}"
    );
}

#[test]
fn invalid_objects_are_named_and_the_rest_still_answers() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&repo().join("examples"), dir.path());
    std::fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: broken, namespace: shop}\nspec:\n  podSelector: {}\n  ingress:\n  - ports: [{port: 80, endPort: 70}]\n",
    )
    .unwrap();
    let (code, out, err) = moatctl(&[
        "explain",
        "--manifests",
        dir.path().to_str().unwrap(),
        "--from",
        "shop/frontend-0",
        "--to",
        "shop/backend-0",
        "--port",
        "8080",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("bad.yaml: NetworkPolicy shop/broken: spec.ingress[0].ports[0].endPort: 70 must be greater than or equal to `port` (80)"), "{err}");
    assert!(out.contains("ALLOWED"), "{out}");
}

/// A ClusterNetworkPolicy decision names its tier, policy, priority, rule and action, and
/// the Pass rules on the way.
#[test]
fn explain_names_the_deciding_cluster_policy_rule() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&repo().join("examples"), dir.path());
    std::fs::write(
        dir.path().join("platform.yaml"),
        "apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: keep-off-the-database}
spec:
  tier: Admin
  priority: 20
  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {tier: database}}}}
  ingress:
  - name: backend-to-the-tenant
    action: Pass
    from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {tier: backend}}}}]
  - name: nobody-else
    action: Deny
    from: [{namespaces: {}}]
",
    )
    .unwrap();
    let explain = |from: &str| {
        let (code, out, err) = moatctl(&[
            "explain",
            "--manifests",
            dir.path().to_str().unwrap(),
            "--from",
            from,
            "--to",
            "shop/database-0",
            "--port",
            "5432",
        ]);
        assert_eq!(code, 0, "{err}");
        out
    };
    let out = explain("shop/frontend-0");
    assert!(out.contains("TCP/5432: DENIED"), "{out}");
    assert!(
        out.contains("ingress shop/database-0: DENIED by ClusterNetworkPolicy Admin keep-off-the-database (priority 20) rule 1 \"nobody-else\": Deny (spec.ingress[1])"),
        "{out}"
    );
    let out = explain("shop/backend-0");
    assert!(out.contains("TCP/5432: ALLOWED"), "{out}");
    assert!(
        out.contains("after passing ClusterNetworkPolicy Admin keep-off-the-database (priority 20) rule 0 \"backend-to-the-tenant\": Pass"),
        "{out}"
    );
}
