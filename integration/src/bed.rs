//! A sync test bed: certificates, a manifest directory, one real `moat-server` and real
//! enforcer processes (`moat-test-enforcer`, recording backend), all on loopback in a
//! temporary directory that disappears with the bed (processes are killed on drop).

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use moat_policy::Index;
use moat_policy::ir::digest::Digest;
use serde_json::Value;

use moat_harness::moat::tls_args;

use crate::binary;
use crate::kubeapi::ApiServer;
use crate::process::Proc;

pub const WAIT: Duration = Duration::from_secs(30);

/// A loopback address with a port nothing holds, for a process to listen on later.
///
/// The port is drawn below the kernel's ephemeral range (32768 and up by default): a
/// port the kernel handed out for `:0` is also what it hands to the next outgoing
/// connection, and tests open thousands of those, so a listener started a few seconds
/// later would find it taken. A port that binds on every IPv4 and IPv6 address serves
/// `0.0.0.0`/`[::]` listeners too; each process draws each port once.
pub fn free_port() -> SocketAddr {
    use rand::Rng;
    use std::collections::HashSet;
    use std::sync::Mutex;
    static DRAWN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let low = ephemeral_low();
    let floor = 10_000u16.min(low.saturating_sub(1));
    let mut rng = rand::rng();
    for _ in 0..1000 {
        let port = rng.random_range(floor..low);
        let mut drawn = DRAWN.lock().unwrap();
        if !drawn.get_or_insert_with(HashSet::new).insert(port) {
            continue;
        }
        // One at a time: a dual-stack `[::]` bind conflicts with a held `0.0.0.0` one.
        let v4 = TcpListener::bind(("0.0.0.0", port)).is_ok();
        if v4 && TcpListener::bind(("::", port)).is_ok() {
            return SocketAddr::from(([127, 0, 0, 1], port));
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

pub struct Enforcer {
    pub proc: Proc,
    pub health: SocketAddr,
    pub metrics: SocketAddr,
}

pub struct Bed {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<String>,
    pub listen: SocketAddr,
    pub health: SocketAddr,
    pub metrics: SocketAddr,
    pub server: Option<Proc>,
    pub enforcers: BTreeMap<String, Enforcer>,
    pub server_args: Vec<String>,
    /// A command the server runs under (e.g. `prlimit --nofile=1024 --`), if any.
    pub server_wrapper: Vec<String>,
    /// The `--server` URLs enforcers get (several replicas); empty: the bed's one server.
    pub enforcer_servers: Vec<String>,
}

/// Runs `moatctl` and returns (exit code, stdout, stderr).
pub fn moatctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary("moatctl"))
        .args(args)
        .output()
        .expect("moatctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Bed {
    /// A bed whose cluster has these nodes, each running two pods, with a few policies.
    pub fn new(nodes: &[&str]) -> Bed {
        let dir = tempfile::tempdir().expect("tempdir");
        let bed = Bed {
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
            listen: free_port(),
            health: free_port(),
            metrics: free_port(),
            server: None,
            enforcers: BTreeMap::new(),
            server_args: Vec::new(),
            server_wrapper: Vec::new(),
            enforcer_servers: Vec::new(),
            dir,
        };
        let certs = bed.certs();
        let (code, _, err) = moatctl(&["certs", "init", "--dir", certs.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        for n in nodes {
            bed.issue_node(n, "90d");
        }
        let (code, _, err) = moatctl(&[
            "certs",
            "issue-admin",
            "--dir",
            certs.to_str().unwrap(),
            "--name",
            "ops",
        ]);
        assert_eq!(code, 0, "{err}");
        std::fs::create_dir_all(bed.manifests()).unwrap();
        bed.write_cluster(nodes);
        bed
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn certs(&self) -> PathBuf {
        self.path("certs")
    }

    pub fn manifests(&self) -> PathBuf {
        self.path("manifests")
    }

    pub fn issue_node(&self, node: &str, valid_for: &str) {
        let (code, _, err) = moatctl(&[
            "certs",
            "issue-node",
            "--dir",
            self.certs().to_str().unwrap(),
            "--node",
            node,
            "--valid-for",
            valid_for,
        ]);
        assert_eq!(code, 0, "{err}");
    }

    /// Nodes, a namespace `app` with pods `web-<node>` (app=web) and `db-<node>` (app=db) on
    /// every node, and a policy letting web reach db on 5432. Pods carry their UIDs (endpoint
    /// IDs derive from them), so a test API server serving these files keeps them and
    /// [`Bed::expected`] compiles what the server does.
    fn write_cluster(&self, nodes: &[&str]) {
        let mut y = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: app}\n");
        for (i, n) in nodes.iter().enumerate() {
            y += &format!(
                "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {n}}}\nstatus: {{addresses: [{{type: InternalIP, address: 192.168.50.{}}}]}}\n",
                i + 1
            );
            for (j, app) in ["web", "db"].iter().enumerate() {
                y += &format!(
                    "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {app}-{n}, namespace: app, uid: uid-{app}-{n}, labels: {{app: {app}}}}}\nspec: {{nodeName: {n}, containers: [{{name: c, ports: [{{name: main, containerPort: 5432}}]}}]}}\nstatus: {{phase: Running, podIPs: [{{ip: 10.50.{i}.{}}}]}}\n",
                    j + 1
                );
            }
        }
        std::fs::write(self.manifests().join("cluster.yaml"), y).unwrap();
        self.write_policy("db", "5432");
    }

    /// (Re)writes the policy selecting `app=<target>` pods, allowing web on `port`.
    pub fn write_policy(&self, target: &str, port: &str) {
        let y = format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {target}-from-web, namespace: app}}\nspec:\n  podSelector: {{matchLabels: {{app: {target}}}}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: web}}}}}}]\n    ports: [{{port: {port}}}]\n"
        );
        std::fs::write(self.manifests().join(format!("policy-{target}.yaml")), y).unwrap();
    }

    /// A bed whose cluster lives in a test API server (`prepare`d before the server starts),
    /// the server on the kube source with `extra` flags, an enforcer per node, all in sync.
    pub fn served_from_kube(
        nodes: &[&str],
        extra: &[&str],
        prepare: impl FnOnce(&Bed, &ApiServer),
    ) -> (Bed, ApiServer) {
        let mut bed = Bed::new(nodes);
        let api = ApiServer::start(crate::kubeapi::Options::default());
        prepare(&bed, &api);
        let src = bed.kube_source(&api, "prod");
        bed.start_server_from(&src, extra, Some("synced "));
        for n in nodes {
            bed.start_enforcer(n);
        }
        bed.wait_in_sync(nodes);
        (bed, api)
    }

    /// Serves the bed's cluster from a test API server instead of the directory: applies
    /// every manifest there (the files stay the truth expectations are compiled from) and
    /// returns the server's source arguments for it.
    pub fn kube_source(&self, api: &ApiServer, context: &str) -> Vec<String> {
        for f in std::fs::read_dir(self.manifests()).expect("manifests") {
            api.apply_yaml(&std::fs::read_to_string(f.expect("entry").path()).expect("read"));
        }
        let kc = self.path(&format!("{context}.kubeconfig"));
        api.kubeconfig(&kc, context);
        vec!["--source".into(), format!("kube:{}", kc.display())]
    }

    /// [`Bed::write_policy`], in the manifests and in the API server alike.
    pub fn write_policy_to(&self, api: &ApiServer, target: &str, port: &str) {
        self.write_policy(target, port);
        let file = self.manifests().join(format!("policy-{target}.yaml"));
        api.apply_yaml(&std::fs::read_to_string(file).expect("read policy"));
    }

    /// Digest of every node's snapshot, compiled here from the manifests.
    pub fn expected(&self) -> BTreeMap<String, Digest> {
        let mut set = moat_manifests_shim::load(&self.manifests());
        let index = Index::build(set.drain(..));
        index
            .nodes()
            .into_iter()
            .map(|n| (n.node.to_string(), n.digest))
            .collect()
    }

    pub fn start_server(&mut self) {
        self.start_server_with(&[]);
    }

    pub fn start_server_with(&mut self, extra: &[&str]) {
        let source = [
            "--source".to_string(),
            format!("dir:{}", self.manifests().display()),
        ];
        self.start_server_from(&source, extra, Some("synced "));
    }

    /// The server with these source arguments; waits for a stdout line starting with
    /// `wait_for` if given.
    pub fn start_server_from(&mut self, source: &[String], extra: &[&str], wait_for: Option<&str>) {
        let c = self.certs();
        let mut cmd = match self.server_wrapper.split_first() {
            Some((w, rest)) => {
                let mut cmd = Command::new(w);
                cmd.args(rest).arg(binary("moat-server"));
                cmd
            }
            None => Command::new(binary("moat-server")),
        };
        cmd.args(source)
            .args(["--poll-seconds", "1", "--tls-reload-seconds", "1"])
            .arg("--listen")
            .arg(self.listen.to_string())
            .arg("--health-addr")
            .arg(self.health.to_string())
            .arg("--metrics-addr")
            .arg(self.metrics.to_string())
            .args(tls_args(&c, "server"))
            .arg("--state-dir")
            .arg(self.path("state/server"))
            .args(extra)
            .env("MOAT_LOG", "info,moat_server=debug")
            .env("NO_COLOR", "1");
        let mut p = Proc::spawn(&mut cmd);
        if let Some(w) = wait_for {
            p.until(WAIT, |l| l.starts_with(w));
        }
        self.server = Some(p);
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill_server(&mut self) {
        self.server = None;
    }

    pub fn start_enforcer(&mut self, node: &str) {
        self.start_enforcer_as(node, node, &format!("node-{node}"));
    }

    /// An enforcer for `node` presenting the certificate files `<cert_base>.pem`.
    pub fn start_enforcer_as(&mut self, node: &str, claims: &str, cert_base: &str) {
        let id = tls_args(&self.certs(), cert_base).to_vec();
        self.start_enforcer_args(node, claims, &id);
    }

    /// An enforcer for `node` with these identity arguments (certificates or bootstrap).
    pub fn start_enforcer_args(&mut self, node: &str, claims: &str, identity: &[String]) {
        let health = free_port();
        let metrics = free_port();
        let mut cmd = Command::new(binary("moat-test-enforcer"));
        cmd.arg("--record-dir")
            .arg(self.path(&format!("rec/{node}")))
            .args(["--node", claims])
            .arg("--server")
            .arg(if self.enforcer_servers.is_empty() {
                format!("https://{}", self.listen)
            } else {
                self.enforcer_servers.join(",")
            })
            .args(["--tls-server-name", "localhost"])
            .args(identity)
            .arg("--state-dir")
            .arg(self.path(&format!("state/{node}")))
            .arg("--health-addr")
            .arg(health.to_string())
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .args(["--backoff-max-seconds", "1", "--report-seconds", "1"])
            .env("MOAT_LOG", "info,moat_enforcer=debug")
            .env("NO_COLOR", "1");
        let proc = Proc::spawn(&mut cmd);
        self.enforcers.insert(
            node.to_string(),
            Enforcer {
                proc,
                health,
                metrics,
            },
        );
    }

    pub fn kill_enforcer(&mut self, node: &str) {
        self.enforcers.remove(node);
    }

    fn admin_args(&self) -> Vec<String> {
        let mut args = vec![
            "--server".into(),
            format!("https://{}", self.listen),
            "--tls-server-name".into(),
            "localhost".into(),
        ];
        args.extend(tls_args(&self.certs(), "admin-ops"));
        args
    }

    /// `moatctl status` plus extra arguments; (code, stdout, stderr).
    pub fn moatctl_admin(&self, cmd: &[&str], extra: &[&str]) -> (i32, String, String) {
        let admin = self.admin_args();
        let mut args: Vec<&str> = cmd.to_vec();
        args.extend(admin.iter().map(String::as_str));
        args.extend(extra);
        moatctl(&args)
    }

    pub fn status(&self) -> Value {
        let (code, out, err) = self.moatctl_admin(&["status", "-o", "json"], &[]);
        assert_eq!(code, 0, "moatctl status: {err}");
        serde_json::from_str(&out).expect("status json")
    }

    pub fn node_status(&self, node: &str) -> Value {
        self.status()["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .find(|n| n["node"] == node)
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Waits until the server's status shows every listed node in sync and each node's
    /// recorded backend holds the digest the server says is newest. For beds served by the
    /// test API server, whose pods carry UIDs the manifests lack (so [`Bed::expected`],
    /// compiled from the manifests, names other digests).
    pub fn wait_served_in_sync(&self, nodes: &[&str]) {
        wait_until(&format!("{nodes:?} in sync with the server"), WAIT, || {
            let s = self.status();
            nodes.iter().all(|n| {
                s["nodes"].as_array().is_some_and(|a| {
                    a.iter().any(|x| {
                        x["node"] == *n
                            && x["in_sync"] == true
                            && self.applied(n).map(|(_, d)| d.to_string()).as_deref()
                                == x["latest_digest"].as_str()
                    })
                })
            })
        });
    }

    /// Waits until every listed node applied exactly what the manifests compile to.
    pub fn wait_in_sync(&self, nodes: &[&str]) {
        let want = self.expected();
        wait_until(&format!("{nodes:?} in sync"), WAIT, || {
            nodes
                .iter()
                .all(|n| self.applied(n).map(|(_, d)| d) == want.get(*n).copied())
        });
        wait_until("status in sync", WAIT, || {
            let s = self.status();
            nodes.iter().all(|n| {
                s["nodes"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x["node"] == *n && x["in_sync"] == true))
            })
        });
    }

    /// (version, digest) the node's recording backend enforces.
    pub fn applied(&self, node: &str) -> Option<(u64, Digest)> {
        let raw = std::fs::read(self.path(&format!("rec/{node}/applied.json"))).ok()?;
        let v: Value = serde_json::from_slice(&raw).ok()?;
        Some((v["version"].as_u64()?, v["digest"].as_str()?.parse().ok()?))
    }

    /// The versions the node's recording backend was given (`adopt`, `full`, `delta`): its
    /// local pod table changes (`set_local`) are left out, because the test enforcer follows
    /// the topology of the namespace it runs in, which other tests change.
    pub fn events(&self, node: &str) -> Vec<Value> {
        let mut e = self.all_events(node);
        e.retain(|e| e["op"] != "set_local");
        e
    }

    /// The operations of [`events`](Self::events), in order (`adopt`, `full`, `delta`…).
    pub fn ops(&self, node: &str) -> Vec<String> {
        self.events(node)
            .iter()
            .map(|e| e["op"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Every operation the node's recording backend recorded, `set_local` included.
    pub fn all_events(&self, node: &str) -> Vec<Value> {
        let text = std::fs::read_to_string(self.path(&format!("rec/{node}/events.jsonl")))
            .unwrap_or_default();
        // Only whole lines: the enforcer may be appending one right now.
        let whole = text.rfind('\n').map_or("", |i| &text[..i]);
        whole
            .lines()
            .map(|l| serde_json::from_str(l).expect("event json"))
            .collect()
    }

    pub fn server_stderr(&mut self) -> String {
        self.server.as_mut().map(|s| s.stderr()).unwrap_or_default()
    }

    pub fn enforcer_stderr(&mut self, node: &str) -> String {
        self.enforcers
            .get_mut(node)
            .map(|e| e.proc.stderr())
            .unwrap_or_default()
    }
}

pub const SERVING: i32 = 1;
pub const NOT_SERVING: i32 = 2;

/// A `grpc.health.v1` check: the status, or -1 if the service is unknown or unreachable.
pub fn health_status(addr: SocketAddr, service: &str) -> i32 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let Ok(ep) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")) else {
            return -1;
        };
        let Ok(ch) = ep.connect().await else {
            return -1;
        };
        let mut c = tonic_health::pb::health_client::HealthClient::new(ch);
        c.check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status)
        .unwrap_or(-1)
    })
}

/// Scrapes a Prometheus endpoint (plain HTTP/1.0 over loopback).
pub fn scrape(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("metrics connect");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of one sample (`name` or `name{labels}` as printed), summed if repeated.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(k, _)| *k == name)
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}

/// Tiny local copy of the manifest loading the server does, so tests compute expectations
/// independently of the server process.
mod moat_manifests_shim {
    use std::path::Path;

    use moat_policy::model::Object;

    pub fn load(dir: &Path) -> Vec<Object> {
        let mut out = Vec::new();
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            let r = moat_manifests::parse_file(&f, &text);
            out.extend(r.objects.into_iter().map(|l| l.object));
        }
        out
    }
}

pub fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_default()
}
