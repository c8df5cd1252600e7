//! Moat deployed on a netns cluster: the real `moat-server` in the fabric namespace (file
//! source, sled, mutual TLS) and a real `moat-enforcer` in every node namespace.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use moat_policy::Index;
use moat_policy::ir::digest::Digest;
use moat_policy::model::{self, K8sObject};
use serde_json::Value;

use crate::cluster::{Cluster, Spec, binary};
use crate::container::Containers;

mod in_containers;
mod replicas;

/// The MOAT_LOG of the processes the harness starts: MOAT_HARNESS_LOG, else warn.
fn log_level() -> String {
    std::env::var("MOAT_HARNESS_LOG").unwrap_or_else(|_| "warn".into())
}

const SYNC_PORT: u16 = 7443;

pub struct Moat {
    pub cluster: Cluster,
    pub dir: tempfile::TempDir,
    pub node_names: Vec<String>,
    pub backend: String,
    /// Node index → a command line node's enforcer runs under (e.g. `env VAR=…`, a seccomp
    /// wrapper), the enforcer and its arguments appended.
    pub wrappers: std::collections::BTreeMap<usize, Vec<String>>,
    /// Node index → the `--backend` its next start uses instead of [`Moat::backend`]'s.
    pub node_backends: std::collections::BTreeMap<usize, String>,
    /// More arguments for every enforcer's next start (e.g. `--unknown-pods allow`).
    pub enforcer_args: Vec<String>,
    /// Node index → more arguments for that node's enforcer's next starts.
    pub node_args: std::collections::BTreeMap<usize, Vec<String>>,
    /// What the server accepts (its experimental flags, e.g. `--experimental-cnp-node-peers`),
    /// from its next start on; [`apply`](Self::apply) expects the digests of what it accepts.
    pub parse_options: model::parse::Options,
    /// Where enforcers reach the server: a virtual address each node translates to the
    /// server's current one (kube-proxy's ClusterIP, so the server can move), else the
    /// server's own address.
    pub server_vip: Option<std::net::Ipv4Addr>,
    /// The server's current address in the fabric.
    pub server_addr: std::net::Ipv4Addr,
    /// Run the server and enforcers as containers of an image, as the chart runs them.
    pub containers: Option<Containers>,
    /// The containers started (removed on drop).
    container_names: std::collections::BTreeSet<String>,
    /// Server replicas (0: the one file-source server), see [`replicas`].
    pub replicas: usize,
    /// Replicas stopped by the harness (status asks another).
    pub down: std::collections::BTreeSet<usize>,
    /// The test API server the replicas watch.
    kube: Option<std::sync::Mutex<replicas::KubeApi>>,
}

/// `--tls-ca`, `--tls-cert`, `--tls-key` for the certificate `base` in `dir`, named as
/// `moatctl certs` writes them (`<base>.pem`, `<base>-key.pem`, `ca.pem`).
pub fn tls_args(dir: &Path, base: &str) -> [String; 6] {
    let f = |name: String| dir.join(name).display().to_string();
    [
        "--tls-ca".into(),
        f("ca.pem".into()),
        "--tls-cert".into(),
        f(format!("{base}.pem")),
        "--tls-key".into(),
        f(format!("{base}-key.pem")),
    ]
}

fn moatctl(args: &[&str]) -> Result<String> {
    let out = Command::new(binary("moatctl")?).args(args).output()?;
    if !out.status.success() {
        bail!(
            "moatctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Moat {
    /// Builds the cluster and starts the server and one enforcer per node (`backend`: the
    /// enforcer's `--backend`). `node_names[i]` is node `i`'s name in the manifests.
    pub fn start(spec: Spec, node_names: Vec<String>, backend: &str) -> Result<Moat> {
        Self::start_wrapped(spec, node_names, backend, Default::default())
    }

    /// [`start`](Self::start), with some enforcers run under a wrapper command.
    pub fn start_wrapped(
        spec: Spec,
        node_names: Vec<String>,
        backend: &str,
        wrappers: std::collections::BTreeMap<usize, Vec<String>>,
    ) -> Result<Moat> {
        Self::start_with(spec, node_names, backend, wrappers, None, 0, "")
    }

    /// [`start`](Self::start) with `n` server replicas watching a test API server (see
    /// [`replicas`]).
    pub fn start_replicated(
        spec: Spec,
        node_names: Vec<String>,
        backend: &str,
        n: usize,
    ) -> Result<Moat> {
        Self::start_with(
            spec,
            node_names,
            backend,
            Default::default(),
            None,
            n.max(1),
            "",
        )
    }

    /// [`start`](Self::start), the server and every enforcer a container of
    /// `containers`' image under the chart's security context (see [`crate::container`]).
    pub fn start_in_containers(
        spec: Spec,
        node_names: Vec<String>,
        backend: &str,
        containers: Containers,
    ) -> Result<Moat> {
        Self::start_tagged(spec, node_names, backend, Some(containers), "")
    }

    /// [`start`](Self::start), or [`start_in_containers`](Self::start_in_containers) when
    /// `containers` is given, the namespaces' names holding `tag` (see
    /// [`Cluster::create_tagged`]).
    pub fn start_tagged(
        spec: Spec,
        node_names: Vec<String>,
        backend: &str,
        containers: Option<Containers>,
        tag: &str,
    ) -> Result<Moat> {
        if containers.is_some() {
            crate::container::sweep(crate::cluster::PREFIX);
            crate::cluster::ensure_bpffs()?;
            // A node's /sys/fs/bpf is a shared mount (systemd makes every mount shared), which
            // the chart's HostToContainer propagation makes a slave of in the container.
            crate::container::make_shared(std::path::Path::new(crate::cluster::BPFFS))?;
        }
        Self::start_with(
            spec,
            node_names,
            backend,
            Default::default(),
            containers,
            0,
            tag,
        )
    }

    fn start_with(
        spec: Spec,
        node_names: Vec<String>,
        backend: &str,
        wrappers: std::collections::BTreeMap<usize, Vec<String>>,
        containers: Option<Containers>,
        replicas: usize,
        tag: &str,
    ) -> Result<Moat> {
        if containers.is_some() && (!wrappers.is_empty() || replicas > 0) {
            bail!("enforcer wrappers and replicas do not apply to containers");
        }
        let dir = tempfile::tempdir()?;
        crate::cluster::ensure_bpffs()?;
        let server_addr = spec.fabric_v4();
        let cluster = Cluster::create_tagged(spec, tag)?;
        let mut m = Moat {
            cluster,
            dir,
            node_names,
            backend: backend.to_string(),
            wrappers,
            node_backends: Default::default(),
            enforcer_args: Vec::new(),
            node_args: Default::default(),
            parse_options: Default::default(),
            server_vip: None,
            server_addr,
            containers,
            container_names: Default::default(),
            replicas,
            down: Default::default(),
            kube: None,
        };
        m.certs()?;
        std::fs::create_dir_all(m.manifests())?;
        if replicas > 0 {
            let api = replicas::KubeApi::start(&m.cluster.fabric(), &m.path("kubeconfig"))?;
            m.kube = Some(std::sync::Mutex::new(api));
        }
        m.start_server()?;
        for i in 0..m.node_names.len() {
            m.start_enforcer(i)?;
        }
        Ok(m)
    }

    /// Node `i`'s `--backend`: `mixed` alternates eBPF and nft across nodes.
    pub fn backend_of(&self, i: usize) -> &str {
        if let Some(b) = self.node_backends.get(&i) {
            return b;
        }
        match self.backend.as_str() {
            "mixed" => ["ebpf", "nft"][i % 2],
            b => b,
        }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Where process `name` writes its output.
    pub fn log(&self, name: &str) -> PathBuf {
        self.path(&format!("{name}.log"))
    }

    /// The last `lines` lines of every process log, for a failure report.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        let mut names: Vec<_> = std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        names.sort();
        for p in names {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!(
                "==> {} <==\n",
                p.file_name().unwrap_or_default().to_string_lossy()
            ));
            for l in &all[all.len().saturating_sub(lines)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    pub fn manifests(&self) -> PathBuf {
        self.path("manifests")
    }

    fn certs(&self) -> Result<()> {
        let c = self.path("certs");
        let c = c.to_str().context("path")?;
        let s = &self.cluster.spec;
        moatctl(&[
            "certs",
            "init",
            "--dir",
            c,
            "--server-name",
            "moat-server",
            "--server-name",
            "localhost",
            "--server-ip",
            &s.fabric_v4().to_string(),
            "--server-ip",
            &std::net::Ipv4Addr::new(192, 168, s.id, 253).to_string(),
            "--server-ip",
            &s.fabric_v6().to_string(),
            "--server-ip",
            "127.0.0.1",
        ])?;
        for n in &self.node_names {
            moatctl(&["certs", "issue-node", "--dir", c, "--node", n])?;
        }
        moatctl(&["certs", "issue-admin", "--dir", c, "--name", "harness"])?;
        Ok(())
    }

    fn start_server(&mut self) -> Result<()> {
        if self.containers.is_some() {
            return self.start_server_container();
        }
        if self.replicas > 0 {
            for i in 0..self.replicas {
                self.start_replica(i)?;
            }
            return Ok(());
        }
        let c = self.path("certs");
        let mut cmd = Command::new(binary("moat-server")?);
        cmd.arg("--source")
            .arg(format!("dir:{}", self.manifests().display()))
            .args([
                "--poll-seconds",
                "3600",
                "--listen",
                &format!("[::]:{SYNC_PORT}"),
            ])
            .args([
                "--health-addr",
                "127.0.0.1:7444",
                "--metrics-addr",
                "127.0.0.1:7445",
            ])
            .args(tls_args(&c, "server"))
            .arg("--state-dir")
            .arg(self.path("state/server"))
            .args(self.server_flags())
            .env("MOAT_LOG", log_level())
            .env("NO_COLOR", "1");
        let fab = self.cluster.fabric();
        let log = self.log("server");
        self.cluster.spawn_in(&fab, &mut cmd, &log)?;
        Ok(())
    }

    /// The server's flags for [`parse_options`](Self::parse_options).
    fn server_flags(&self) -> Vec<&'static str> {
        let model::parse::Options {
            experimental_cnp_node_peers,
        } = self.parse_options;
        let mut out = Vec::new();
        if experimental_cnp_node_peers {
            out.push("--experimental-cnp-node-peers");
        }
        out
    }

    /// Starts (or restarts) node `i`'s enforcer.
    pub fn start_enforcer(&mut self, i: usize) -> Result<()> {
        if self.containers.is_some() {
            return self.start_enforcer_container(i);
        }
        let c = self.path("certs");
        let name = self.node_names[i].clone();
        let enforcer = binary("moat-enforcer")?;
        let mut cmd = match self.wrappers.get(&i) {
            Some(w) if !w.is_empty() => {
                let mut c = Command::new(&w[0]);
                c.args(&w[1..]).arg(enforcer);
                c
            }
            _ => Command::new(enforcer),
        };
        let node_ns = self.cluster.node(i);
        cmd.args(["--backend", self.backend_of(i), "--node", &name])
            .arg("--bpffs")
            .arg(std::path::Path::new(crate::cluster::BPFFS).join(&node_ns))
            .arg("--server")
            .arg(self.server_urls())
            .args(["--tls-server-name", "moat-server"])
            .args(tls_args(&c, &format!("node-{name}")))
            .arg("--state-dir")
            .arg(self.path(&format!("state/{name}")))
            .args([
                "--health-addr",
                "127.0.0.1:7446",
                "--metrics-addr",
                "127.0.0.1:7447",
            ])
            .args(["--backoff-max-seconds", "1"])
            .args(&self.enforcer_args)
            .args(self.node_args.get(&i).into_iter().flatten())
            .env("MOAT_LOG", log_level())
            .env("NO_COLOR", "1");
        let node = self.cluster.node(i);
        let log = self.log(&format!("enforcer-{name}"));
        self.cluster.spawn_in(&node, &mut cmd, &log)?;
        Ok(())
    }

    /// Kills the server (SIGKILL; its state directory stays) and starts it again.
    pub fn restart_server(&mut self) -> Result<()> {
        self.kill_server()?;
        self.start_server()
    }

    /// Kills the server with SIGKILL.
    pub fn kill_server(&mut self) -> Result<()> {
        let fab = self.cluster.fabric();
        let out = Command::new("ip").args(["netns", "pids", &fab]).output()?;
        let server = self.executable("moat-server")?;
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == server) {
                Command::new("kill").args(["-9", pid]).status()?;
                while std::path::Path::new(&format!("/proc/{pid}/exe")).exists() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        Ok(())
    }

    /// Makes every node reach the server through `vip` (an nft DNAT in each node's output
    /// hook, as kube-proxy translates a ClusterIP for host-network clients) and points the
    /// enforcers' next starts at it.
    pub fn use_server_vip(&mut self, vip: std::net::Ipv4Addr) -> Result<()> {
        self.server_vip = Some(vip);
        self.route_vip()
    }

    /// Moves the server to a new fabric address (`ip`, added to the fabric bridge), as a
    /// rescheduled host-network server gets its new node's address, and updates the nodes'
    /// translation of the virtual address.
    pub fn move_server(&mut self, to: std::net::Ipv4Addr) -> Result<()> {
        self.kill_server()?;
        let fab = self.cluster.fabric();
        crate::cluster::ip(&["-n", &fab, "addr", "add", &format!("{to}/24"), "dev", "br0"])?;
        // The old address goes (its secondaries in the subnet stay: promoted).
        crate::cluster::ip(&[
            "netns",
            "exec",
            &fab,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.conf.br0.promote_secondaries=1",
        ])?;
        let old = self.server_addr;
        crate::cluster::ip(&[
            "-n",
            &fab,
            "addr",
            "del",
            &format!("{old}/24"),
            "dev",
            "br0",
        ])?;
        self.server_addr = to;
        self.route_vip()?;
        self.start_server()
    }

    fn route_vip(&self) -> Result<()> {
        let Some(vip) = self.server_vip else {
            return Ok(());
        };
        for i in 0..self.node_names.len() {
            // The nodes have no default route, and a connect needs a route to its address
            // before the output hook's DNAT can rewrite it (kube-proxy's nodes route a
            // ClusterIP by their default route): an on-link route of its own.
            crate::cluster::ip(&[
                "-n",
                &self.cluster.node(i),
                "route",
                "replace",
                &format!("{vip}/32"),
                "dev",
                "eth0",
            ])?;
            let script = format!(
                "add table ip moatvip\ndelete table ip moatvip\ntable ip moatvip {{\n chain out {{ type nat hook output priority -100; ip daddr {vip} tcp dport {SYNC_PORT} dnat to {}; }}\n}}\n",
                self.server_addr
            );
            self.cluster.nft_script(i, &script)?;
        }
        Ok(())
    }

    /// The process id of node `i`'s running enforcer.
    pub fn enforcer_pid(&self, i: usize) -> Result<Option<u32>> {
        let node = self.cluster.node(i);
        let out = Command::new("ip").args(["netns", "pids", &node]).output()?;
        let enforcer = self.executable("moat-enforcer")?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .find_map(|pid| {
                let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
                (exe == enforcer).then(|| pid.parse().ok()).flatten()
            }))
    }

    /// Whether node `i`'s namespace holds a Moat nft table.
    pub fn has_nft_table(&self, i: usize) -> Result<bool> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.cluster.node(i),
                "nft",
                "list",
                "tables",
            ])
            .output()?;
        if !out.status.success() {
            bail!("nft list tables: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim() == "table inet moat"))
    }

    /// Whether node `i` has eBPF pins (maps or links).
    pub fn has_ebpf_pins(&self, i: usize) -> bool {
        std::path::Path::new(crate::cluster::BPFFS)
            .join(self.cluster.node(i))
            .join("moat")
            .join(&self.node_names[i])
            .exists()
    }

    /// Node `i`'s pinned eBPF version record: version, digest, and whether a switch is in
    /// progress. `None` on a node without eBPF pins.
    pub fn ebpf_meta(&self, i: usize) -> Result<Option<moat_enforcer_ebpf::Meta>> {
        let bpffs = std::path::Path::new(crate::cluster::BPFFS).join(self.cluster.node(i));
        Ok(moat_enforcer_ebpf::dataplane::pinned_meta(
            &bpffs,
            &self.node_names[i],
        )?)
    }

    /// Node `i`'s pinned eBPF counters (drops by reason, allowed flows); empty on a node
    /// without eBPF pins.
    pub fn ebpf_counters(&self, i: usize) -> Result<BTreeMap<String, u64>> {
        let bpffs = std::path::Path::new(crate::cluster::BPFFS).join(self.cluster.node(i));
        Ok(moat_enforcer_ebpf::dataplane::pinned_counters(
            &bpffs,
            &self.node_names[i],
        )?)
    }

    /// Kills node `i`'s enforcer with SIGKILL (its rules stay in the kernel).
    pub fn kill_enforcer(&mut self, i: usize) -> Result<()> {
        if let Some(pid) = self.enforcer_pid(i)? {
            Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()?;
            // Reaped by the cluster's drop; wait until it is really gone.
            while std::path::Path::new(&format!("/proc/{pid}/exe")).exists() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    }

    /// Makes the cluster hold exactly `objects` and waits until every node enforces them.
    pub fn apply(&self, objects: &[K8sObject], timeout: Duration) -> Result<()> {
        let expected = Self::expected_with(objects, &self.parse_options)?;
        self.write_manifests(objects)?;
        self.wait_applied(&expected, timeout)
    }

    /// Replaces the cluster's manifests (atomically: write, then rename).
    pub fn write_manifests(&self, objects: &[K8sObject]) -> Result<()> {
        let mut text = String::new();
        for o in objects {
            let (v, kind, api) = match o {
                K8sObject::Namespace(x) => (serde_yaml::to_value(x)?, "Namespace", "v1"),
                K8sObject::Pod(x) => (serde_yaml::to_value(x)?, "Pod", "v1"),
                K8sObject::Node(x) => (serde_yaml::to_value(x)?, "Node", "v1"),
                K8sObject::NetworkPolicy(x) => (
                    serde_yaml::to_value(x)?,
                    "NetworkPolicy",
                    "networking.k8s.io/v1",
                ),
                K8sObject::ClusterNetworkPolicy(x) => (
                    serde_yaml::to_value(x)?,
                    "ClusterNetworkPolicy",
                    moat_policy::model::cnp_api::API_VERSION,
                ),
            };
            let mut v = v;
            if let serde_yaml::Value::Mapping(m) = &mut v {
                m.insert("apiVersion".into(), api.into());
                m.insert("kind".into(), kind.into());
            }
            text.push_str("---\n");
            text.push_str(&serde_yaml::to_string(&v)?);
        }
        let tmp = self.manifests().join(".cluster.yaml.tmp");
        std::fs::write(&tmp, text)?;
        let file = self.manifests().join("cluster.yaml");
        std::fs::rename(&tmp, &file)?;
        if let Some(k) = &self.kube {
            k.lock().expect("kube api").sync(&file)?;
        }
        Ok(())
    }

    /// The digest every node must end up enforcing for `objects` (no experimental feature).
    pub fn expected(objects: &[K8sObject]) -> Result<BTreeMap<String, Digest>> {
        Self::expected_with(objects, &model::parse::Options::default())
    }

    /// Same, for a server accepting what `opts` enables.
    pub fn expected_with(
        objects: &[K8sObject],
        opts: &model::parse::Options,
    ) -> Result<BTreeMap<String, Digest>> {
        let parsed: Vec<_> = objects
            .iter()
            .map(|o| model::parse::object_with(o, opts).map(|p| p.value))
            .collect::<Result<_, _>>()?;
        let index = Index::build(parsed);
        Ok(index
            .nodes()
            .into_iter()
            .map(|n| (n.node.to_string(), n.digest))
            .collect())
    }

    /// `moatctl status -o json`, asked inside the fabric namespace.
    pub fn status(&self) -> Result<Value> {
        Ok(serde_json::from_str(&self.status_table(&["-o", "json"])?)?)
    }

    /// Same, as the human-readable table (`extra`: more `moatctl status` arguments).
    pub fn status_table(&self, extra: &[&str]) -> Result<String> {
        // With replicas: the first one running (any shows the whole fleet).
        let port = match (0..self.replicas).find(|i| !self.down.contains(i)) {
            Some(i) => Self::replica_port(i),
            None => SYNC_PORT,
        };
        self.status_at(port, extra)
    }

    fn status_at(&self, port: u16, extra: &[&str]) -> Result<String> {
        let mut args: Vec<String> = vec![
            "status".into(),
            "--server".into(),
            format!("https://127.0.0.1:{port}"),
            "--tls-server-name".into(),
            "localhost".into(),
        ];
        args.extend(tls_args(&self.path("certs"), "admin-harness"));
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.cluster.run_in(
            &self.cluster.fabric(),
            binary("moatctl")?.to_str().context("path")?,
            &args,
        )
    }

    /// Waits until every node acknowledged exactly `expected` (probing before that would
    /// test a race, not the policy).
    pub fn wait_applied(
        &self,
        expected: &BTreeMap<String, Digest>,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status();
            let done = s.as_ref().is_ok_and(|s| {
                expected.iter().all(|(node, d)| {
                    s["nodes"].as_array().is_some_and(|a| {
                        a.iter().any(|n| {
                            n["node"] == node.as_str() && n["applied_digest"] == d.to_string()
                        })
                    })
                })
            });
            if done {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "nodes did not apply the expected versions in {timeout:?}: {s:?}\n{}",
                    self.log_tails(20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Moat {
    fn drop(&mut self) {
        for name in &self.container_names {
            crate::container::remove(name);
        }
        // A failing test's only chance to show what the server and enforcers saw: the
        // directory holding the logs goes away with it.
        if std::thread::panicking() {
            // MOAT_HARNESS_LOG_LINES shows more of a debug-level run (see MOAT_HARNESS_LOG).
            let lines = std::env::var("MOAT_HARNESS_LOG_LINES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(40);
            eprintln!("{}", self.log_tails(lines));
        }
    }
}
