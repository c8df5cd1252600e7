//! The container image under the Helm chart's security context: `moat-server` and every
//! `moat-enforcer` as podman containers of the image (`scripts/image.sh`; nextest's
//! `build-image` setup script builds `localhost/moat:test` before these tests) in the
//! harness's network namespaces, each with the user, capabilities, read-only root,
//! no_new_privs, seccomp profile and mounts `helm template` renders. Checked on the running
//! processes, then on packets.

use std::collections::BTreeSet;

use moat_conformance::cluster::Family;
use moat_conformance::{Backend, Factory, Options, load_dir, run};
use moat_harness::container::{self, Containers, Seccomp};
use moat_harness::moat::Moat;
use moat_harness::packets::PacketBackend;
use serde_yaml::Value;

const IMAGE: &str = "localhost/moat:test";

fn root() -> std::path::PathBuf {
    moat_integration::repo()
}

/// The two pod templates as `helm template` renders them with the default values.
fn rendered() -> (Value, Value) {
    let docs = container::render_chart(&[]).unwrap();
    let pod = |kind, name| {
        container::find(&docs, kind, name).unwrap()["spec"]["template"]["spec"].clone()
    };
    (
        pod("StatefulSet", "moat-server"),
        pod("DaemonSet", "moat-enforcer"),
    )
}

const CAPS: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// What the kernel says about a running process.
#[derive(Debug, PartialEq)]
struct Context {
    uid: u32,
    gid: u32,
    groups: BTreeSet<u32>,
    effective: BTreeSet<String>,
    bounding: BTreeSet<String>,
    no_new_privs: bool,
    seccomp_filter: bool,
    read_only_root: bool,
}

fn caps(hex: &str) -> BTreeSet<String> {
    let bits = u64::from_str_radix(hex, 16).unwrap();
    CAPS.iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, c)| c.to_string())
        .collect()
}

fn context(pid: u32) -> Context {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}:")))
            .unwrap_or_else(|| panic!("{k} in /proc/{pid}/status"))
            .trim()
            .to_string()
    };
    let first = |k: &str| field(k).split_whitespace().next().unwrap().parse().unwrap();
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    // The last mount on "/" is the one the process sees.
    let root = mountinfo
        .lines()
        .rfind(|l| l.split_whitespace().nth(4) == Some("/"))
        .expect("a root mount");
    Context {
        uid: first("Uid"),
        gid: first("Gid"),
        groups: field("Groups")
            .split_whitespace()
            .map(|g| g.parse().unwrap())
            .collect(),
        effective: caps(&field("CapEff")),
        bounding: caps(&field("CapBnd")),
        no_new_privs: field("NoNewPrivs") == "1",
        seccomp_filter: field("Seccomp") == "2",
        read_only_root: root
            .split_whitespace()
            .nth(5)
            .is_some_and(|o| o.split(',').any(|o| o == "ro")),
    }
}

/// The context the rendered pod template asks for (container settings over the pod's).
fn expected(pod: &Value) -> Context {
    let c = &pod["containers"][0]["securityContext"];
    let p = &pod["securityContext"];
    let get = |k: &str| {
        if c[k].is_null() {
            p[k].clone()
        } else {
            c[k].clone()
        }
    };
    let uid = get("runAsUser").as_u64().expect("the chart names the user") as u32;
    let gid = get("runAsGroup").as_u64().unwrap_or(0) as u32;
    let fs_group = p["fsGroup"].as_u64().map(|g| g as u32);
    assert_eq!(
        c["capabilities"]["drop"].as_sequence().unwrap(),
        &vec![Value::from("ALL")],
        "the chart drops every capability before adding"
    );
    let added: BTreeSet<String> = c["capabilities"]["add"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    Context {
        uid,
        gid,
        // The primary group (as the runtimes list it) and the pod's fsGroup.
        groups: fs_group.into_iter().chain([gid]).collect(),
        // Root keeps its bounding set as effective; anyone else has none effective.
        effective: if uid == 0 {
            added.clone()
        } else {
            BTreeSet::new()
        },
        bounding: added,
        no_new_privs: get("allowPrivilegeEscalation").as_bool() == Some(false),
        seccomp_filter: get("seccompProfile")["type"].as_str() != Some("Unconfined"),
        read_only_root: get("readOnlyRootFilesystem").as_bool() == Some(true),
    }
}

fn start(seccomp: Seccomp, backend: &str) -> (moat_harness::cluster::Slot, PacketBackend) {
    let slot = moat_harness::cluster::slot().unwrap();
    let containers = Containers::new(IMAGE, seccomp).unwrap();
    let plan = moat_conformance::cluster::Plan {
        id: slot.id,
        ..moat_conformance::cluster::Plan::new(Family::Ipv4)
    };
    let mut b = PacketBackend::start_in(plan, backend, Some(containers)).unwrap();
    // The cluster's Nodes, Namespaces and Pods, no policy: every node known and in sync.
    let case = &load_dir(&root().join("conformance/upstream/netpol")).unwrap()[0];
    let objects: Vec<_> = moat_conformance::cluster::objects(case, plan)
        .unwrap()
        .into_iter()
        .filter(|o| !matches!(o, moat_policy::model::K8sObject::NetworkPolicy(_)))
        .collect();
    b.apply(&objects).unwrap();
    (slot, b)
}

/// Every node's (backend, selection) once all report one.
fn backends(moat: &Moat) -> Vec<(String, String)> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let s = moat.status().unwrap_or_default();
        let nodes: Vec<(String, String)> = s["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["connected"] == true)
            .map(|n| {
                (
                    n["backend"].as_str().unwrap_or_default().to_string(),
                    n["selection"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        if nodes.len() == moat.node_names.len() {
            return nodes;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nodes did not connect: {s}\n{}",
            moat.log_tails(20)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Every mount the pod template names is in the process's mount table with the flags
/// the chart asks for: read-only, HostToContainer propagation (a slave: `master:` in
/// mountinfo), an emptyDir in memory (tmpfs).
fn mounts_as_rendered(pid: u32, pod: &Value) {
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let volumes = pod["volumes"].as_sequence().unwrap();
    for m in pod["containers"][0]["volumeMounts"].as_sequence().unwrap() {
        let at = m["mountPath"].as_str().unwrap();
        // Debian's /var/run is a symlink to /run: the kernel lists the resolved path.
        let resolved = match at.strip_prefix("/var/run/") {
            Some(rest) => format!("/run/{rest}"),
            None => at.to_string(),
        };
        let line = mountinfo
            .lines()
            .rfind(|l| l.split_whitespace().nth(4) == Some(resolved.as_str()))
            .unwrap_or_else(|| panic!("{at} is not mounted:\n{mountinfo}"));
        let fields: Vec<&str> = line.split_whitespace().collect();
        let sep = fields.iter().position(|f| *f == "-").unwrap();
        let options: Vec<&str> = fields[5].split(',').collect();
        let fstype = fields[sep + 1];
        // Not among the pod's volumes: a StatefulSet's claim template (a writable volume).
        let def = volumes
            .iter()
            .find(|v| v["name"] == m["name"])
            .cloned()
            .unwrap_or(Value::Null);
        let read_only = m["readOnly"].as_bool() == Some(true)
            || ["secret", "configMap", "projected"]
                .iter()
                .any(|k| def[*k].is_mapping());
        assert_eq!(options.contains(&"ro"), read_only, "{at}: {line}");
        if m["mountPropagation"].as_str() == Some("HostToContainer") {
            assert!(
                fields[6..sep].iter().any(|f| f.starts_with("master:")),
                "{at} receives the host's mounts: {line}"
            );
        }
        if def["emptyDir"]["medium"].as_str() == Some("Memory") {
            assert_eq!(fstype, "tmpfs", "{at}: {line}");
        }
    }
}

#[test]
fn the_server_and_enforcers_run_with_exactly_the_charts_security_context() {
    let (server_pod, enforcer_pod) = rendered();
    let (_slot, b) = start(Seccomp::Containerd, "auto");
    let moat = &b.moat;
    let server_pid = container::pid(&moat.server_container()).unwrap();
    let server = context(server_pid);
    assert_eq!(server, expected(&server_pod), "the server's process");
    mounts_as_rendered(server_pid, &server_pod);
    assert_ne!(server.uid, 0, "the server is not root");
    for i in 0..moat.node_names.len() {
        let pid = container::pid(&moat.enforcer_container(i)).unwrap();
        let got = context(pid);
        assert_eq!(got, expected(&enforcer_pod), "node {i}'s enforcer");
        mounts_as_rendered(pid, &enforcer_pod);
        assert_eq!(
            got.effective,
            ["BPF", "NET_ADMIN", "PERFMON"].map(String::from).into(),
            "exactly what the dataplanes need"
        );
    }
    // Under containerd's RuntimeDefault (bpf() for CAP_BPF) `auto` runs eBPF everywhere.
    for (backend, why) in backends(moat) {
        assert_eq!(backend, "ebpf", "{why}");
    }
}

/// podman's (and CRI-O's) default profile allows bpf() only with CAP_SYS_ADMIN, which the
/// chart does not grant: `auto` falls back to nft and says why. The chart's own profile
/// lets eBPF run.
#[test]
fn under_podmans_default_profile_auto_falls_back_to_nft_and_says_why() {
    let (_slot, b) = start(Seccomp::Podman, "auto");
    for (backend, why) in backends(&b.moat) {
        assert_eq!(backend, "nft");
        assert!(
            why.contains("bpf_syscall") && why.contains("not permitted"),
            "{why}"
        );
    }
    drop(b);
    let (_slot2, b) = start(Seccomp::Chart, "auto");
    for (backend, why) in backends(&b.moat) {
        assert_eq!(backend, "ebpf", "{why}");
    }
}

/// The upstream cases in both families on packets, the containerised enforcers running
/// eBPF and nft on alternate nodes.
#[test]
fn upstream_conformance_passes_in_containers_on_ebpf_and_nft_nodes() {
    let cases = load_dir(&root().join("conformance/upstream/netpol")).unwrap();
    assert_eq!(cases.len(), 47, "all upstream cases are loaded");
    let slot = moat_harness::cluster::slot().unwrap();
    let factory: Factory<'_> = Box::new(move |plan| {
        let c = Containers::new(IMAGE, Seccomp::Containerd)
            .map_err(|e| moat_conformance::Error::Backend(format!("{e:#}")))?;
        Ok(Box::new(PacketBackend::start_in(plan, "mixed", Some(c))?) as Box<dyn Backend>)
    });
    let opts = Options {
        families: vec![Family::Ipv4, Family::Ipv6],
        plan_id: slot.id,
        scratch: false,
        live: true,
    };
    let report = run(&cases, &mut [("mixed".to_string(), factory)], &opts);
    eprintln!("{report}");
    assert_eq!(report.failed(), 0, "{report}");
    assert_eq!(report.passed(), cases.len());
}
