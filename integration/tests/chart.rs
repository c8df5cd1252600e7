//! The Helm chart as rendered by the real `helm` (installed by scripts/setup.sh): the
//! properties that matter for security and for the binaries actually understanding it.
//! (`scripts/chart-check.sh` lints it and validates it against the official schemas.)

use std::collections::BTreeSet;
use std::process::Command;

use serde_yaml::Value;

fn render(values: Option<&str>) -> Vec<Value> {
    let args: Vec<String> = values
        .map(|v| {
            let file = moat_integration::repo().join("charts/moat/ci").join(v);
            vec!["-f".into(), file.display().to_string()]
        })
        .unwrap_or_default();
    moat_harness::container::render_chart(&args).unwrap()
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The item of a list whose `key` field is `value`.
fn item<'a>(list: &'a Value, key: &str, value: &str) -> &'a Value {
    list.as_sequence()
        .unwrap()
        .iter()
        .find(|v| v[key] == value)
        .unwrap_or_else(|| panic!("no item with {key} = {value}"))
}

fn strs(v: &Value) -> BTreeSet<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Every `MOAT_*` variable a container sets must be one the binary reads.
fn env_understood(container: &Value, binary: &str) {
    let help = Command::new(moat_integration::binary(binary))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for e in container["env"].as_sequence().unwrap() {
        let name = e["name"].as_str().unwrap();
        assert!(
            help.contains(&format!("[env: {name}=")),
            "{binary} does not read {name}"
        );
    }
}

#[test]
fn the_enforcer_gets_exactly_what_the_dataplane_needs() {
    let objs = render(None);
    let ds = find(&objs, "DaemonSet", "moat-enforcer");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert!(
        pod["tolerations"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "must run on every node"
    );
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(
        strs(&sc["capabilities"]["drop"]),
        BTreeSet::from(["ALL".to_string()])
    );
    assert_eq!(
        strs(&sc["capabilities"]["add"]),
        ["BPF", "NET_ADMIN", "PERFMON"].map(String::from).into()
    );
    assert!(sc["seccompProfile"]["type"].as_str().is_some());
    let bpffs = item(&c["volumeMounts"], "mountPath", "/sys/fs/bpf");
    assert_eq!(bpffs["mountPropagation"], "HostToContainer");
    assert_eq!(c["readinessProbe"]["grpc"]["port"], 7446);
    let node = item(&c["env"], "name", "MOAT_NODE");
    assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    let token = item(&pod["volumes"], "name", "token");
    let sat = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(sat["audience"], "moat");
    // Nodes get the CA certificate only, never the CA key.
    let ca = item(&pod["volumes"], "name", "ca");
    assert_eq!(ca["secret"]["items"][0]["key"], "ca.pem");
    assert_eq!(ca["secret"]["items"].as_sequence().unwrap().len(), 1);
    // Metrics stay on the node's loopback (hostNetwork: anything else is the node's
    // networks); health must stay reachable on the pod IP for kubelet's probes.
    let metrics = item(&c["env"], "name", "MOAT_METRICS_ADDR");
    assert_eq!(metrics["value"], "127.0.0.1:7447");
    let health = item(&c["env"], "name", "MOAT_HEALTH_ADDR");
    assert_eq!(health["value"], "0.0.0.0:7446");
    let ports: BTreeSet<String> = c["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ports, BTreeSet::from(["health".to_string()]));
    env_understood(c, "moat-enforcer");
    args_understood(c, "moat-enforcer");
    // The server by the Service's ClusterIP (kubelet expands it in args): no DNS, which a
    // fail-closed node may not reach before its snapshot; the replicas' names come second,
    // resolved when DNS answers. The certificate name is checked.
    let args = strs(&c["args"]);
    assert!(
        args.iter()
            .any(|a| a.starts_with("--server=https://$(MOAT_SERVER_SERVICE_HOST):7443,")),
        "{args:?}"
    );
    assert!(
        args.contains("--bootstrap-server=https://$(MOAT_SERVER_SERVICE_HOST):7450"),
        "{args:?}"
    );
    assert_eq!(
        item(&c["env"], "name", "MOAT_TLS_SERVER_NAME")["value"],
        "moat-server"
    );
    assert_eq!(
        item(&c["env"], "name", "MOAT_UNKNOWN_PODS")["value"],
        "deny"
    );
    assert_eq!(
        item(&c["env"], "name", "MOAT_POD_INTERFACES")["value"],
        "auto"
    );
}

/// Every `--flag=` a container passes must be one the binary has.
fn args_understood(container: &Value, binary: &str) {
    let help = Command::new(moat_integration::binary(binary))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for a in strs(&container["args"]) {
        let flag = a.split('=').next().unwrap();
        assert!(
            help.contains(&format!("{flag} <")),
            "{binary} has no {flag}"
        );
    }
}

fn ports(container: &Value) -> BTreeSet<i64> {
    container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_i64().unwrap())
        .collect()
}

#[test]
fn the_server_runs_in_the_node_network_without_colliding_with_the_enforcer() {
    let objs = render(None);
    let sts = find(&objs, "StatefulSet", "moat-server");
    let pod = &sts["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    let ds = find(&objs, "DaemonSet", "moat-enforcer");
    let server = ports(&pod["containers"][0]);
    let enforcer = ports(&ds["spec"]["template"]["spec"]["containers"][0]);
    assert_eq!(server.len(), 4);
    assert!(server.is_disjoint(&enforcer), "{server:?} {enforcer:?}");
}

#[test]
fn the_server_holds_the_node_ca_key_never_the_main_ca_key() {
    let objs = render(None);
    let sts = find(&objs, "StatefulSet", "moat-server");
    let pod = &sts["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let env = |name: &str| {
        item(&c["env"], "name", name)["value"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(env("MOAT_TLS_NODE_CA"), "/etc/moat/tls/node-ca.pem");
    assert_eq!(
        env("MOAT_BOOTSTRAP_CA_KEY"),
        "/etc/moat/tls/node-ca-key.pem"
    );
    assert_eq!(env("MOAT_TLS_CA"), "/etc/moat/ca/ca.pem");
    // Exactly these files reach the pod, whatever else the Secret holds.
    let tls = item(&pod["volumes"], "name", "tls");
    let items: BTreeSet<String> = tls["secret"]["items"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|i| {
            assert_eq!(i["key"], i["path"]);
            i["key"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        items,
        [
            "node-ca-key.pem",
            "node-ca.pem",
            "server-key.pem",
            "server.pem"
        ]
        .map(String::from)
        .into()
    );
    let ca = item(&pod["volumes"], "name", "ca");
    assert_eq!(ca["secret"]["items"][0]["key"], "ca.pem");
    assert_eq!(ca["secret"]["items"].as_sequence().unwrap().len(), 1);
    let all = serde_yaml::to_string(sts).unwrap();
    assert!(
        !all.replace("node-ca-key.pem", "").contains("ca-key.pem"),
        "the main CA's key is mentioned:\n{all}"
    );
}

#[test]
fn the_server_is_least_privileged_and_understands_its_config() {
    let objs = render(None);
    let role = find(&objs, "ClusterRole", "moat-server");
    let mut granted = BTreeSet::new();
    for r in role["rules"].as_sequence().unwrap() {
        for res in strs(&r["resources"]) {
            for verb in strs(&r["verbs"]) {
                granted.insert(format!("{res}:{verb}"));
            }
        }
    }
    let want: BTreeSet<String> = [
        "namespaces:list",
        "namespaces:watch",
        "nodes:list",
        "nodes:watch",
        "pods:list",
        "pods:watch",
        "networkpolicies:list",
        "networkpolicies:watch",
        "clusternetworkpolicies:list",
        "clusternetworkpolicies:watch",
        "tokenreviews:create",
    ]
    .map(String::from)
    .into();
    // No write to policy objects unless asked (`clusterNetworkPolicy.writeStatus`).
    assert_eq!(granted, want);
    let local = find(&objs, "Role", "moat-server");
    assert_eq!(local["metadata"]["namespace"], "moat-system");
    assert_eq!(
        strs(&local["rules"][0]["verbs"]),
        BTreeSet::from(["get".to_string()])
    );
    // The replicas may write only their own ConfigMaps (and the epoch counter).
    let updates: BTreeSet<String> = local["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|r| strs(&r["verbs"]).contains("update"))
        .flat_map(|r| {
            assert_eq!(
                strs(&r["verbs"]).len(),
                1,
                "update alone where names are listed"
            );
            strs(&r["resourceNames"])
        })
        .collect();
    let mut want: BTreeSet<String> = ["moat-server-epochs".to_string()].into();
    for i in 0..3 {
        want.insert(format!("moat-replica-moat-server-{i}"));
        want.insert(format!("moat-status-moat-server-{i}"));
    }
    assert_eq!(updates, want);
    let sts = find(&objs, "StatefulSet", "moat-server");
    let c = &sts["spec"]["template"]["spec"]["containers"][0];
    env_understood(c, "moat-server");
    let sa = item(&c["env"], "name", "MOAT_ENFORCER_SERVICE_ACCOUNT");
    assert_eq!(sa["value"], "moat-system/moat-enforcer");
}

#[test]
fn the_multi_cluster_values_give_the_server_a_clusters_file_it_parses() {
    let objs = render(Some("multi-cluster-values.yaml"));
    let cm = find(&objs, "ConfigMap", "moat-server-clusters");
    let text = cm["data"]["clusters.yaml"].as_str().unwrap();
    let file: moat_server::source::ClustersFile = serde_yaml::from_str(text).unwrap();
    let specs = file.specs().unwrap();
    let got: Vec<String> = specs
        .iter()
        .map(|s| format!("{}={}", s.name, s.source.as_ref().unwrap()))
        .collect();
    assert_eq!(
        got,
        [
            "hub=kube:in-cluster",
            "east=kube:/etc/moat/clusters/east/kubeconfig",
            "west=kube:/etc/moat/clusters/west/kubeconfig:west-admin",
        ]
    );
    // Each remote kubeconfig is mounted where the file says.
    let sts = find(&objs, "StatefulSet", "moat-server");
    let mounts: BTreeSet<String> = sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap().to_string())
        .collect();
    assert!(mounts.contains("/etc/moat/clusters/east"));
    assert!(mounts.contains("/etc/moat/clusters/west"));
    // The remote-access account exists with the same read-only rules.
    find(&objs, "ClusterRole", "moat-central");
}

#[test]
fn three_replicas_by_default_one_per_node_with_a_disruption_budget() {
    let objs = render(None);
    let sts = find(&objs, "StatefulSet", "moat-server");
    assert_eq!(sts["spec"]["replicas"], 3);
    // As the one-replica chart had it: the field cannot change on an existing StatefulSet.
    assert_eq!(sts["spec"]["serviceName"], "moat-server");
    assert!(sts["spec"]["podManagementPolicy"].is_null());
    let pod = &sts["spec"]["template"]["spec"];
    // hostNetwork: two replicas on one node would collide on its ports.
    let anti =
        &pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(anti["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(
        anti["labelSelector"]["matchLabels"],
        sts["spec"]["selector"]["matchLabels"]
    );
    let pdb = find(&objs, "PodDisruptionBudget", "moat-server");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(pdb["spec"]["selector"], sts["spec"]["selector"]);
    let headless = find(&objs, "Service", "moat-server-replicas");
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(headless["spec"]["publishNotReadyAddresses"], false);
    // Each replica coordinates through the local cluster under its pod's name.
    let c = &pod["containers"][0];
    assert_eq!(item(&c["env"], "name", "MOAT_HA_CLUSTER")["value"], "local");
    assert_eq!(
        item(&c["env"], "name", "MOAT_REPLICA")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    // Enforcers get the Service and every replica by name.
    let ds = find(&objs, "DaemonSet", "moat-enforcer");
    let server = strs(&ds["spec"]["template"]["spec"]["containers"][0]["args"])
        .into_iter()
        .find(|a| a.starts_with("--server="))
        .unwrap();
    assert_eq!(
        server,
        "--server=https://$(MOAT_SERVER_SERVICE_HOST):7443,https://moat-server-replicas.moat-system.svc:7443"
    );
    // One replica: no budget (it would block every drain of its node).
    let one = moat_harness::container::render_chart(&["--set".into(), "server.replicas=1".into()])
        .unwrap();
    assert_eq!(
        find(&one, "StatefulSet", "moat-server")["spec"]["replicas"],
        1
    );
    assert!(!one.iter().any(|o| o["kind"] == "PodDisruptionBudget"));
}

/// The schema of the rendered ClusterNetworkPolicy CRD at `path` (`spec.ingress`, …).
fn schema<'a>(crd: &'a Value, path: &str) -> &'a Value {
    let mut v = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    for part in path.split('.') {
        v = if part == "[]" {
            &v["items"]
        } else {
            &v["properties"][part]
        };
    }
    assert!(!v.is_null(), "no schema at {path}");
    v
}

/// Whether Moat's own validation accepts the policy `edit` makes of a valid one.
fn moat_accepts(edit: impl FnOnce(&mut serde_json::Value)) -> bool {
    let mut v = serde_json::json!({
        "metadata": {"name": "p"},
        "spec": {"tier": "Admin", "priority": 1, "subject": {"namespaces": {}},
            "ingress": [{"name": "r", "action": "Deny", "from": [{"namespaces": {}}],
                "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]}],
            "egress": [{"action": "Accept", "to": [{"networks": ["10.0.0.0/8"]}]}]}
    });
    edit(&mut v);
    let p: moat_policy::model::cnp_api::ClusterNetworkPolicy = serde_json::from_value(v).unwrap();
    moat_policy::model::parse::cluster_network_policy(&p).is_ok()
}

fn int(v: &Value, key: &str) -> usize {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in {v:?}")) as usize
}

#[test]
fn the_cnp_crd_admits_exactly_what_moat_accepts_at_its_limits() {
    let objs = render(None);
    let crd = find(
        &objs,
        "CustomResourceDefinition",
        "clusternetworkpolicies.policy.networking.k8s.io",
    );
    // Deleting a CRD deletes every policy of it: never with a release.
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    let v = &crd["spec"]["versions"][0];
    assert_eq!(v["name"], "v1alpha2");
    assert!(v["subresources"]["status"].is_mapping());
    assert_eq!(crd["spec"]["scope"], "Cluster");
    assert_eq!(
        strs(&schema(crd, "spec.tier")["enum"]),
        ["Admin", "Baseline"].map(String::from).into()
    );
    let action = schema(crd, "spec.ingress.[].action");
    assert_eq!(
        strs(&action["enum"]),
        ["Accept", "Deny", "Pass"].map(String::from).into()
    );
    assert_eq!(action, schema(crd, "spec.egress.[].action"));
    for tier in ["Admin", "Baseline"] {
        assert!(moat_accepts(|p| p["spec"]["tier"] = tier.into()));
    }
    assert!(!moat_accepts(|p| p["spec"]["tier"] = "NetworkPolicy".into()));
    // Priority: both ends admitted by both, one past either refused by Moat.
    let prio = schema(crd, "spec.priority");
    let (lo, hi) = (int(prio, "minimum") as i64, int(prio, "maximum") as i64);
    assert_eq!(hi, moat_policy::model::parse::MAX_PRIORITY);
    for (n, ok) in [(lo, true), (hi, true), (lo - 1, false), (hi + 1, false)] {
        assert_eq!(
            moat_accepts(|p| p["spec"]["priority"] = n.into()),
            ok,
            "priority {n}"
        );
    }
    // Every count the CRD bounds: its maximum is Moat's, one more is refused.
    let counts: [(&str, &str); 5] = [
        ("spec.ingress", "/spec/ingress"),
        ("spec.egress", "/spec/egress"),
        ("spec.ingress.[].from", "/spec/ingress/0/from"),
        ("spec.ingress.[].protocols", "/spec/ingress/0/protocols"),
        (
            "spec.egress.[].to.[].networks",
            "/spec/egress/0/to/0/networks",
        ),
    ];
    for (path, pointer) in counts {
        let max = int(schema(crd, path), "maxItems");
        let fill = |n: usize| {
            move |p: &mut serde_json::Value| {
                let list = p.pointer_mut(pointer).unwrap().as_array_mut().unwrap();
                let first = list[0].clone();
                list.clear();
                for i in 0..n {
                    let mut e = first.clone();
                    if e.is_string() {
                        e = format!("10.{i}.0.0/16").into();
                    }
                    list.push(e);
                }
            }
        };
        assert!(moat_accepts(fill(max)), "{path}: {max} refused by Moat");
        assert!(
            !moat_accepts(fill(max + 1)),
            "{path}: {} accepted by Moat",
            max + 1
        );
    }
    let name = int(schema(crd, "spec.ingress.[].name"), "maxLength");
    assert!(moat_accepts(
        |p| p["spec"]["ingress"][0]["name"] = "r".repeat(name).into()
    ));
    assert!(!moat_accepts(
        |p| p["spec"]["ingress"][0]["name"] = "r".repeat(name + 1).into()
    ));
    // Exactly one field where the API says so.
    for path in [
        "spec.subject",
        "spec.ingress.[].from.[]",
        "spec.egress.[].to.[]",
    ] {
        let s = schema(crd, path);
        assert_eq!(
            (int(s, "minProperties"), int(s, "maxProperties")),
            (1, 1),
            "{path}"
        );
    }
    assert!(!moat_accepts(|p| p["spec"]["subject"]["pods"] =
        serde_json::json!({"namespaceSelector": {}, "podSelector": {}})));
    // Status conditions are a map by type: Moat's entry never replaces another's.
    let conds = schema(crd, "status.conditions");
    assert_eq!(conds["x-kubernetes-list-type"], "map");
    assert_eq!(
        strs(&conds["x-kubernetes-list-map-keys"]),
        BTreeSet::from(["type".to_string()])
    );
}

#[test]
fn the_cnp_crd_is_optional_and_status_writes_are_granted_only_when_enabled() {
    let objs = render(Some("cnp-status-values.yaml"));
    assert!(!objs.iter().any(|o| o["kind"] == "CustomResourceDefinition"));
    let role = find(&objs, "ClusterRole", "moat-server");
    let status = role["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|r| strs(&r["resources"]).contains("clusternetworkpolicies/status"))
        .expect("a rule for the status subresource");
    assert_eq!(
        strs(&status["verbs"]),
        BTreeSet::from(["patch".to_string()])
    );
    assert_eq!(strs(&status["resources"]).len(), 1);
    let sts = find(&objs, "StatefulSet", "moat-server");
    let c = &sts["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        item(&c["env"], "name", "MOAT_WRITE_CNP_STATUS")["value"],
        "true"
    );
    assert_eq!(
        item(&c["env"], "name", "MOAT_EXPERIMENTAL_CNP_NODE_PEERS")["value"],
        "true"
    );
    env_understood(c, "moat-server");
    // Nodes peers need no more than the Node list/watch the server always has.
    let granted_nodes = role["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|r| strs(&r["resources"]).contains("nodes"))
        .flat_map(|r| strs(&r["verbs"]))
        .collect::<BTreeSet<_>>();
    assert_eq!(
        granted_nodes,
        BTreeSet::from(["list".into(), "watch".into()])
    );
    // By default neither flag is set at all.
    let objs = render(None);
    let sts = find(&objs, "StatefulSet", "moat-server");
    let env = &sts["spec"]["template"]["spec"]["containers"][0]["env"];
    for flag in ["MOAT_WRITE_CNP_STATUS", "MOAT_EXPERIMENTAL_CNP_NODE_PEERS"] {
        assert!(
            !env.as_sequence().unwrap().iter().any(|e| e["name"] == flag),
            "{flag} set by default"
        );
    }
}
