use std::fs;

use super::*;

const NS: &str =
    "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {env: prod}\n";

fn policy(name: &str, cidr: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  podSelector: {{}}\n  egress:\n  - to:\n    - ipBlock: {{cidr: '{cidr}'}}\n"
    )
}

fn keys(events: &[Event]) -> Vec<String> {
    let mut v: Vec<String> = events
        .iter()
        .map(|e| match e {
            Event::Apply(o) => format!("apply {}", o.key()),
            Event::Delete(k) => format!("delete {k}"),
        })
        .collect();
    v.sort();
    v
}

#[test]
fn loads_multi_document_files_and_skips_other_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{NS}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: shop}}\n---\n{}---\n# only a comment\n---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {{name: web-1, namespace: shop}}\n  status: {{podIP: 10.0.0.1}}\n",
        policy("egress", "10.0.0.0/8")
    );
    fs::create_dir(dir.path().join("sub")).unwrap();
    fs::write(dir.path().join("sub/app.yaml"), text).unwrap();
    fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();
    let mut set = ManifestSet::new(dir.path());
    let r = set.reload().unwrap();
    assert_eq!(r.errors().count(), 0, "{:?}", r.diagnostics);
    assert_eq!(
        keys(&r.events),
        vec![
            "apply Namespace shop",
            "apply NetworkPolicy shop/egress",
            "apply Pod shop/web-1"
        ]
    );
    assert!(
        set.reload().unwrap().events.is_empty(),
        "unchanged files give no events"
    );
}

#[test]
fn invalid_update_keeps_the_last_valid_version() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("p.yaml");
    fs::write(
        &f,
        format!(
            "{NS}---\n{}---\n{}",
            policy("a", "10.0.0.0/8"),
            policy("b", "10.1.0.0/16")
        ),
    )
    .unwrap();
    let mut set = ManifestSet::new(dir.path());
    set.reload().unwrap();

    // `a` becomes invalid, `b` changes validly, `c` is new and invalid.
    fs::write(
        &f,
        format!(
            "{NS}---\n{}---\n{}---\n{}",
            policy("a", "10.0.0.0/33"),
            policy("b", "10.2.0.0/16"),
            policy("c", "nope")
        ),
    )
    .unwrap();
    let r = set.reload().unwrap();
    assert_eq!(keys(&r.events), vec!["apply NetworkPolicy shop/b"]);
    let errors: Vec<String> = r.errors().map(|d| d.to_string()).collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].contains(
            "p.yaml: NetworkPolicy shop/a: spec.egress[0].to[0].ipBlock.cidr: prefix length 33"
        ),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].contains("NetworkPolicy shop/c: spec.egress[0].to[0].ipBlock.cidr"),
        "{}",
        errors[1]
    );
    assert!(
        r.diagnostics
            .iter()
            .any(|d| d.message.contains("keeping its last valid version"))
    );
    let a = set
        .objects()
        .find(|o| o.key().to_string() == "NetworkPolicy shop/a")
        .expect("a is kept");
    assert!(format!("{a:?}").contains("10.0.0.0"));
    assert!(
        !set.objects()
            .any(|o| o.key().to_string() == "NetworkPolicy shop/c")
    );

    // Fixing it applies the fix; deleting the file deletes its objects.
    fs::write(&f, format!("{NS}---\n{}", policy("a", "10.3.0.0/16"))).unwrap();
    let r = set.reload().unwrap();
    assert_eq!(
        keys(&r.events),
        vec!["apply NetworkPolicy shop/a", "delete NetworkPolicy shop/b"]
    );
    fs::remove_file(&f).unwrap();
    let r = set.reload().unwrap();
    assert_eq!(
        keys(&r.events),
        vec!["delete Namespace shop", "delete NetworkPolicy shop/a"]
    );
}

#[test]
fn malformed_yaml_keeps_the_whole_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("p.yaml");
    fs::write(&f, format!("{NS}---\n{}", policy("a", "10.0.0.0/8"))).unwrap();
    let mut set = ManifestSet::new(dir.path());
    set.reload().unwrap();
    fs::write(&f, "kind: [unclosed\n").unwrap();
    let r = set.reload().unwrap();
    assert!(r.events.is_empty(), "nothing deleted: {:?}", r.events);
    let e = r.errors().next().expect("an error");
    assert!(
        e.to_string().contains("p.yaml: document 1: malformed YAML"),
        "{e}"
    );
    assert_eq!(set.len(), 2);
}

#[test]
fn type_errors_name_the_field_and_duplicates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("a.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  ingress:\n  - ports: [{port: [80]}]\n",
    )
    .unwrap();
    fs::write(dir.path().join("b.yaml"), format!("{NS}---\n{NS}---\napiVersion: networking.k8s.io/v1beta1\nkind: NetworkPolicy\nmetadata: {{name: old}}\n")).unwrap();
    let mut set = ManifestSet::new(dir.path());
    let r = set.reload().unwrap();
    let errors: Vec<String> = r.errors().map(|d| d.to_string()).collect();
    assert!(
        errors[0].contains("a.yaml: NetworkPolicy shop/p: spec.ingress[0].ports[0].port"),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("b.yaml: Namespace shop: also defined in")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains(
            "NetworkPolicy default/old: apiVersion: networking.k8s.io/v1beta1 is not supported"
        )),
        "{errors:?}"
    );
    assert_eq!(keys(&r.events), vec!["apply Namespace shop"]);
}

#[test]
fn warnings_for_normalised_input() {
    let r = parse_file(Path::new("x.yaml"), &policy("a", "10.1.2.3/8"));
    assert_eq!(r.objects.len(), 1);
    assert_eq!(r.diagnostics.len(), 1);
    assert_eq!(r.diagnostics[0].severity, Severity::Warning);
    assert!(
        r.diagnostics[0]
            .to_string()
            .contains("host bits set; using 10.0.0.0/8")
    );
}

fn cluster_policy(name: &str, priority: &str, peer: &str) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  tier: Admin\n  priority: {priority}\n  subject: {{namespaces: {{}}}}\n  egress:\n  - name: out\n    action: Deny\n    to: [{peer}]\n"
    )
}

#[test]
fn cluster_network_policies_load_and_an_invalid_update_keeps_the_last_valid_version() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("platform.yaml");
    fs::write(&f, cluster_policy("guard", "5", "{networks: [10.0.0.0/8]}")).unwrap();
    let mut set = ManifestSet::new(dir.path());
    let r = set.reload().unwrap();
    assert_eq!(r.errors().count(), 0, "{:?}", r.diagnostics);
    assert_eq!(keys(&r.events), vec!["apply ClusterNetworkPolicy guard"]);

    // A domainNames peer is refused (never enforced without it), naming file, object and
    // field; the last valid version stays in force.
    fs::write(
        &f,
        cluster_policy("guard", "5", "{domainNames: [example.com]}"),
    )
    .unwrap();
    let r = set.reload().unwrap();
    assert!(r.events.is_empty(), "{:?}", r.events);
    let e = r.errors().next().expect("an error").to_string();
    assert!(
        e.contains("platform.yaml: ClusterNetworkPolicy guard: spec.egress[0].to[0].domainNames"),
        "{e}"
    );
    assert!(
        set.objects()
            .any(|o| o.key().to_string() == "ClusterNetworkPolicy guard")
    );

    // So is another apiVersion of the kind.
    fs::write(
        &f,
        cluster_policy("guard", "5", "{networks: [10.0.0.0/8]}").replace("v1alpha2", "v1alpha1"),
    )
    .unwrap();
    let r = set.reload().unwrap();
    assert!(r.events.is_empty(), "{:?}", r.events);
    assert!(
        r.errors()
            .next()
            .expect("an error")
            .to_string()
            .contains("v1alpha1 is not supported")
    );
    // Another group's kind of the same name is skipped like any kind Moat does not use.
    fs::write(
        &f,
        cluster_policy("guard", "5", "{networks: [10.0.0.0/8]}")
            .replace("policy.networking.k8s.io/v1alpha2", "crd.antrea.io/v1beta1"),
    )
    .unwrap();
    let r = set.reload().unwrap();
    assert_eq!(r.errors().count(), 0, "{:?}", r.diagnostics);
    assert_eq!(keys(&r.events), vec!["delete ClusterNetworkPolicy guard"]);
}

#[test]
fn nodes_peers_load_only_with_the_experimental_option_and_nodes_keep_their_labels() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("cluster.yaml"),
        "apiVersion: v1\nkind: Node\nmetadata: {name: n1, labels: {pool: infra}}\nstatus: {addresses: [{type: InternalIP, address: 192.168.0.1}]}\n---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: guard}\nspec:\n  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n  egress:\n  - name: no-infra\n    action: Deny\n    to: [{nodes: {matchLabels: {pool: infra}}}]\n",
    )
    .unwrap();
    let mut off = ManifestSet::new(dir.path());
    let r = off.reload().unwrap();
    let e: Vec<_> = r.errors().collect();
    assert_eq!(e.len(), 1, "{:?}", r.diagnostics);
    assert_eq!(e[0].field.as_deref(), Some("spec.egress[0].to[0].nodes"));
    assert!(
        e[0].message.contains("--experimental-cnp-node-peers"),
        "{e:?}"
    );
    assert_eq!(r.rejected, vec![ObjectKey::ClusterPolicy("guard".into())]);

    let opts = moat_policy::model::parse::Options {
        experimental_cnp_node_peers: true,
    };
    let mut on = ManifestSet::with_options(dir.path(), opts);
    let r = on.reload().unwrap();
    assert_eq!(r.errors().count(), 0, "{:?}", r.diagnostics);
    let node = on
        .objects()
        .find_map(|o| match o {
            Object::Node(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(node.labels.get("pool").map(String::as_str), Some("infra"));
    assert!(on.objects().any(|o| matches!(o, Object::ClusterPolicy(p)
        if matches!(p.egress[0].rule.as_ref().unwrap().peers[..], [moat_policy::model::Peer::Nodes(_)]))));
}
