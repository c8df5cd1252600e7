//! ClusterNetworkPolicy from the Kubernetes source: the CRD may be missing, may come later
//! and may go; refused policies keep their last valid version and say why; status writes
//! are opt-in and never repeated. Real `moat-server` and enforcer processes (recording
//! backend) against the test API server, over HTTPS with the real kube client.

use std::time::Duration;

use moat_integration::bed::{Bed, WAIT, wait_until};
use moat_integration::kubeapi::{ApiServer, Kind, Options};
use serde_json::Value;

const CONDITION: &str = "moat.io/Accepted";

/// An Admin policy over every namespace: it selects the bed's pods on every node.
fn cnp(name: &str, priority: u32, port: u16) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  tier: Admin\n  priority: {priority}\n  subject: {{namespaces: {{}}}}\n  ingress:\n  - name: keep-off\n    action: Deny\n    from: [{{namespaces: {{matchLabels: {{kubernetes.io/metadata.name: app}}}}}}]\n    protocols: [{{tcp: {{destinationPort: {{number: {port}}}}}}}]\n"
    )
}

/// The same policy with an egress peer Moat refuses rather than narrows.
fn with_domain_names(name: &str) -> String {
    cnp(name, 10, 22)
        + "  egress:\n  - action: Deny\n    to: [{domainNames: [\"*.example.com\"]}]\n"
}

/// In the API server and in the manifests [`Bed::expected`] compiles from.
fn write_cnp(bed: &Bed, api: &ApiServer, file: &str, yaml: &str) {
    std::fs::write(bed.manifests().join(file), yaml).unwrap();
    api.apply_yaml(yaml);
}

/// Moat's condition on the object, if any.
fn condition(api: &ApiServer, name: &str) -> Option<Value> {
    let o = api.get(Kind::ClusterNetworkPolicy, "", name)?;
    o["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == CONDITION)
        .cloned()
}

/// What `moatctl status --policy NAME` prints for a ClusterNetworkPolicy.
fn policy_status(bed: &Bed, name: &str) -> String {
    let (code, out, err) = bed.moatctl_admin(&["status"], &["--policy", name]);
    assert_eq!(code, 0, "{err}");
    out
}

fn status_patches(api: &ApiServer) -> Vec<String> {
    api.requests()
        .into_iter()
        .filter(|r| r.starts_with("PATCH ") && r.contains("/clusternetworkpolicies/"))
        .collect()
}

fn versions(bed: &Bed, node: &str) -> usize {
    bed.events(node).len()
}

#[test]
fn an_absent_crd_is_no_error_and_one_installed_later_arrives_whole() {
    let nodes = ["n1", "n2"];
    let (bed, api) = Bed::served_from_kube(&nodes, &["--kube-crd-recheck", "1s"], |_, _| {});
    let log = api.requests();
    assert!(
        log.iter().any(
            |r| r.starts_with("GET /apis/policy.networking.k8s.io/v1alpha2 ")
                && r.ends_with("-> 404")
        ),
        "{log:#?}"
    );
    assert_eq!(
        bed.status()["clusters"][0]["stale"],
        false,
        "an absent CRD is no error"
    );

    // Installed with four policies at once: more than one page of a list (3 here), so a
    // half-listed kind would show as a version with some of them.
    let before = versions(&bed, "n1");
    api.hold_lists();
    api.install_cnp_crd();
    for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
        write_cnp(
            &bed,
            &api,
            &format!("cnp-{name}.yaml"),
            &cnp(name, 10 + i as u32, 8000 + i as u16),
        );
    }
    api.release_lists();
    bed.wait_in_sync(&nodes);
    assert_eq!(
        versions(&bed, "n1"),
        before + 1,
        "the CRD's policies did not arrive as one version: {:#?}",
        bed.events("n1")
    );
    let log = api.requests();
    assert!(
        log.iter().any(|r| r
            .starts_with("GET /apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies?")
            && r.contains("continue=")),
        "{log:#?}"
    );

    // Watched now: a change flows like any other kind's.
    write_cnp(&bed, &api, "cnp-a.yaml", &cnp("a", 10, 9000));
    bed.wait_in_sync(&nodes);

    // The CRD goes, and its policies with it.
    api.remove_cnp_crd();
    for name in ["a", "b", "c", "d"] {
        std::fs::remove_file(bed.manifests().join(format!("cnp-{name}.yaml"))).unwrap();
    }
    bed.wait_in_sync(&nodes);
    assert_eq!(bed.status()["clusters"][0]["stale"], false);
    // And back: found again by the periodic discovery.
    api.install_cnp_crd();
    write_cnp(&bed, &api, "cnp-e.yaml", &cnp("e", 5, 7000));
    bed.wait_in_sync(&nodes);
    // Never a status write unless asked.
    assert_eq!(status_patches(&api), Vec::<String>::new());
    assert!(condition(&api, "e").is_none());
}

#[test]
fn the_first_sync_waits_for_a_present_crds_policies() {
    let nodes = ["n1"];
    let mut bed = Bed::new(&nodes);
    let api = ApiServer::start(Options::default());
    api.install_cnp_crd();
    write_cnp(&bed, &api, "cnp-a.yaml", &cnp("a", 1, 8080));
    let src = bed.kube_source(&api, "prod");
    api.hold_lists();
    bed.start_server_from(&src, &[], None);
    bed.start_enforcer("n1");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(bed.applied("n1"), None, "served before the first full sync");
    api.release_lists();
    // The first version a node gets already holds the admin tier.
    bed.wait_in_sync(&nodes);
    assert_eq!(bed.ops("n1"), ["adopt", "full"]);
}

#[test]
fn a_refused_policy_keeps_its_last_valid_version_and_its_status_says_why() {
    let nodes = ["n1", "n2"];
    let (bed, api) = Bed::served_from_kube(&nodes, &["--write-cnp-status"], |bed, api| {
        api.install_cnp_crd();
        std::fs::write(
            bed.manifests().join("cnp-guard.yaml"),
            cnp("guard", 10, 8080),
        )
        .unwrap();
    });
    wait_until("accepted", WAIT, || {
        condition(&api, "guard").is_some_and(|c| c["status"] == "True")
    });
    let c = condition(&api, "guard").unwrap();
    assert_eq!(
        (c["reason"].as_str(), c["observedGeneration"].as_i64()),
        (Some("Accepted"), Some(1))
    );
    let out = policy_status(&bed, "guard");
    assert!(out.lines().any(|l| l == "accepted"), "{out}");
    let enforced = bed.applied("n1");

    // Unsupported (the CRD here has no schema to stop it): refused whole, not narrowed.
    api.apply_yaml(&with_domain_names("guard"));
    wait_until("refused as unsupported", WAIT, || {
        condition(&api, "guard").is_some_and(|c| c["reason"] == "Unsupported")
    });
    let c = condition(&api, "guard").unwrap();
    assert_eq!(c["status"], "False");
    assert_eq!(c["observedGeneration"], 2);
    let msg = c["message"].as_str().unwrap();
    assert!(msg.contains("spec.egress[0].to[0].domainNames"), "{msg}");
    assert!(msg.contains("last valid version stays in force"), "{msg}");
    let out = policy_status(&bed, "guard");
    assert!(
        out.starts_with("ClusterNetworkPolicy guard (generation")
            && out.contains("enforced on 2 of 2 nodes"),
        "{out}"
    );
    let refused = out
        .lines()
        .find(|l| l.starts_with("REFUSED (Unsupported): "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        refused.contains("spec.egress[0].to[0].domainNames")
            && refused.ends_with(" — last valid version in force"),
        "{out}"
    );
    // Invalid by the API's own rules.
    api.apply_yaml(&cnp("guard", 5000, 8080));
    wait_until("refused as invalid", WAIT, || {
        condition(&api, "guard").is_some_and(|c| c["reason"] == "Invalid")
    });
    assert!(
        condition(&api, "guard").unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("spec.priority")
    );
    let out = policy_status(&bed, "guard");
    assert!(
        out.lines().any(|l| l.starts_with("REFUSED (Invalid): ")
            && l.contains("spec.priority")
            && l.ends_with(" — last valid version in force")),
        "{out}"
    );
    // Never valid: refused, and nothing of it enforced.
    api.apply_yaml(&with_domain_names("newcomer"));
    wait_until("newcomer refused", WAIT, || {
        condition(&api, "newcomer").is_some_and(|c| {
            c["message"]
                .as_str()
                .unwrap()
                .contains("no version of it is enforced")
        })
    });
    // Refused, not missing: answered with nothing enforced, and counted in the overview.
    let out = policy_status(&bed, "newcomer");
    assert!(
        out.starts_with("ClusterNetworkPolicy newcomer: no valid version, enforced nowhere\n"),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("REFUSED (Unsupported): ")
            && l.contains("domainNames")
            && l.ends_with(" — nothing enforced")),
        "{out}"
    );
    let (code, out, err) = bed.moatctl_admin(&["status"], &["--policy", "newcomer", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (
            &v["acceptance"]["accepted"],
            &v["acceptance"]["reason"],
            &v["acceptance"]["last_valid_in_force"],
            &v["needed"]
        ),
        (
            &Value::from(false),
            &Value::from("Unsupported"),
            &Value::from(false),
            &Value::from(0)
        ),
        "{v}"
    );
    let warnings = bed.status()["clusters"][0]["warnings"].clone();
    assert!(
        warnings.as_array().unwrap().iter().any(|w| {
            let w = w.as_str().unwrap();
            w.starts_with("2 refused policies")
                && w.contains("ClusterNetworkPolicy guard")
                && w.contains("ClusterNetworkPolicy newcomer")
        }),
        "{warnings}"
    );
    // Through all of it the nodes kept the last valid version: the manifests still hold it.
    bed.wait_in_sync(&nodes);
    assert_eq!(bed.applied("n1"), enforced);
    // Valid again: accepted, and the transition is a new one.
    write_cnp(&bed, &api, "cnp-guard.yaml", &cnp("guard", 10, 9090));
    bed.wait_in_sync(&nodes);
    wait_until("accepted again", WAIT, || {
        condition(&api, "guard").is_some_and(|c| c["status"] == "True")
    });
    assert_ne!(bed.applied("n1"), enforced);
    let out = policy_status(&bed, "guard");
    assert!(out.lines().any(|l| l == "accepted"), "{out}");
}

#[test]
fn status_writes_are_opt_in_and_never_repeated() {
    let nodes = ["n1"];
    let (mut bed, api) = Bed::served_from_kube(&nodes, &[], |bed, api| {
        api.install_cnp_crd();
        std::fs::write(bed.manifests().join("cnp-a.yaml"), cnp("a", 1, 8080)).unwrap();
        std::fs::write(bed.manifests().join("cnp-b.yaml"), cnp("b", 2, 8081)).unwrap();
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        status_patches(&api),
        Vec::<String>::new(),
        "a write without the flag"
    );

    bed.kill_server();
    let src = bed.kube_source(&api, "prod");
    bed.start_server_from(&src, &["--write-cnp-status"], Some("synced "));
    wait_until("both written", WAIT, || {
        condition(&api, "a").is_some() && condition(&api, "b").is_some()
    });
    let patches = status_patches(&api);
    assert_eq!(patches.len(), 2, "{patches:#?}");
    assert!(
        patches.iter().all(|p| p.contains("/status?")
            && p.contains("fieldManager=moat-server")
            && p.ends_with("-> 200")),
        "{patches:#?}"
    );
    let first = condition(&api, "a").unwrap();

    // Unchanged policies: no write, not after the write's own event, nor a relist, nor a
    // restart of the server.
    std::thread::sleep(Duration::from_secs(2));
    api.compact();
    api.drop_connections();
    std::thread::sleep(Duration::from_secs(3));
    bed.kill_server();
    bed.start_server_from(&src, &["--write-cnp-status"], Some("synced "));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(status_patches(&api).len(), 2, "{:#?}", status_patches(&api));

    // A change that keeps it accepted: one write, the transition time kept.
    api.apply_yaml(&cnp("a", 1, 9090));
    wait_until("new generation written", WAIT, || {
        condition(&api, "a").is_some_and(|c| c["observedGeneration"] == 2)
    });
    let second = condition(&api, "a").unwrap();
    assert_eq!(second["lastTransitionTime"], first["lastTransitionTime"]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(status_patches(&api).len(), 3);
}
