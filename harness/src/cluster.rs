//! Nodes and pods as network namespaces.
//!
//! ```text
//!   fabric netns: br0 (192.168.<id>.254, 2001:db8:<id>::fe) ── the policy server lives here
//!     ├─ veth ── node netns n0: eth0 192.168.<id>.1 ── vpK (169.254.1.1, fe80::1) ── pod netns: eth0 <pod ip>/32
//!     ├─ veth ── node netns n1 …
//! ```
//!
//! Routed like a CNI without overlay: a pod's default route points at its node (link-local
//! gateway), nodes route each pod address to the pod's veth or to the owning node over the
//! fabric. Nothing is reachable from the root namespace, and only addresses inside these
//! namespaces are used. Everything is deleted on drop (also on panic), and `sweep` removes
//! what a crashed run left behind.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::agent::{ProbeReq, Proto, Request, StreamOp};
use crate::client::AgentHandle;

#[derive(Clone, Debug)]
pub struct PodSpec {
    /// `namespace/name`.
    pub key: String,
    pub node: usize,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

#[derive(Clone, Debug)]
pub struct Spec {
    /// Address slot (1..=200): keeps clusters that run side by side apart.
    pub id: u8,
    pub nodes: usize,
    pub pods: Vec<PodSpec>,
    pub tcp: Vec<u16>,
    pub udp: Vec<u16>,
    pub sctp: Vec<u16>,
}

impl Spec {
    pub fn node_v4(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, self.id, i as u8 + 1)
    }

    pub fn node_v6(&self, i: usize) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, u16::from(self.id), 0, 0, 0, 0, i as u16 + 1)
    }

    pub fn fabric_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, self.id, 254)
    }

    pub fn fabric_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, u16::from(self.id), 0, 0, 0, 0, 0xfe)
    }
}

pub struct Cluster {
    pub spec: Spec,
    prefix: String,
    namespaces: Vec<String>,
    agents: BTreeMap<String, AgentHandle>,
    /// Other processes started inside the namespaces, killed on drop.
    children: Vec<Child>,
    /// Pod key → its namespace and the node-side name of its veth. Pods added later get
    /// fresh names, so a pod recreated on an old address gets a new interface, as with a CNI.
    pods: BTreeMap<String, (String, String)>,
    next_pod: usize,
}

pub(crate) const PREFIX: &str = "moat-";

/// Runs `ip` with `args`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn sysctl(ns: &str, settings: &[&str]) -> Result<()> {
    let mut args = vec!["netns", "exec", ns, "sysctl", "-q", "-w"];
    args.extend_from_slice(settings);
    ip(&args)
}

/// Removes namespaces (and kills what runs in them) left by runs whose process is gone.
pub fn sweep() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid: Option<u32> = rest.split('-').next().and_then(|p| p.parse().ok());
        if pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists()) {
            continue;
        }
        delete_netns(name);
    }
}

/// The bpffs every harness node pins its eBPF maps and links under, each in a directory
/// named after its namespace. Mounted here, in the test's own mount namespace, because
/// `ip netns exec` remounts /sys (and with it /sys/fs/bpf) for the commands it runs.
pub const BPFFS: &str = "/run/moat-harness/bpf";

/// Mounts [`BPFFS`] unless a bpffs is there already (the enforcer's own check and mount).
pub fn ensure_bpffs() -> anyhow::Result<()> {
    moat_enforcer_ebpf::sys::ensure_bpffs(std::path::Path::new(BPFFS))
        .map_err(|e| anyhow::anyhow!("bpffs at {BPFFS}: {e}"))
}

fn delete_netns(name: &str) {
    // Pins of the node's eBPF dataplane: without them its programs and maps go with the
    // namespace's interfaces.
    let _ = std::fs::remove_dir_all(std::path::Path::new(BPFFS).join(name));
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
    let _ = Command::new("ip").args(["netns", "del", name]).status();
}

/// Where sibling binaries live: `MOAT_BIN_DIR`, else next to this executable (or one level
/// up, for test executables in `target/<profile>/deps`).
pub fn binary(name: &str) -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("MOAT_BIN_DIR") {
        let p = PathBuf::from(dir).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!(
        "{name} not found next to {} (build the workspace binaries first)",
        exe.display()
    )
}

/// A lock on an address slot, released on drop.
pub struct Slot {
    pub id: u8,
    path: PathBuf,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Takes a free address slot (1..=200), reclaiming those of dead processes.
pub fn slot() -> Result<Slot> {
    let dir = std::env::temp_dir().join("moat-harness-slots");
    std::fs::create_dir_all(&dir)?;
    let me = std::process::id();
    for id in 1..=200u8 {
        let path = dir.join(id.to_string());
        let taken = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if taken {
            continue;
        }
        let _ = std::fs::remove_file(&path);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                write!(f, "{me}")?;
                return Ok(Slot { id, path });
            }
            Err(_) => continue,
        }
    }
    bail!("no free harness address slot")
}

impl Cluster {
    pub fn create(spec: Spec) -> Result<Cluster> {
        Self::create_tagged(spec, "")
    }

    /// [`create`](Self::create), `tag` in every namespace's name: another cluster on the same
    /// address slot in this process then keeps its names (their fabrics are separate, so the
    /// same addresses never meet).
    pub fn create_tagged(spec: Spec, tag: &str) -> Result<Cluster> {
        sweep();
        let mut prefix = format!("{PREFIX}{}-{}", std::process::id(), spec.id);
        if !tag.is_empty() {
            prefix = format!("{prefix}-{tag}");
        }
        let mut c = Cluster {
            spec,
            prefix,
            namespaces: Vec::new(),
            agents: BTreeMap::new(),
            children: Vec::new(),
            pods: BTreeMap::new(),
            next_pod: 0,
        };
        c.build().context("building the netns cluster")?;
        Ok(c)
    }

    pub fn fabric(&self) -> String {
        format!("{}-fab", self.prefix)
    }

    pub fn node(&self, i: usize) -> String {
        format!("{}-n{i}", self.prefix)
    }

    pub fn pod(&self, key: &str) -> String {
        self.pods.get(key).expect("known pod").0.clone()
    }

    /// The node-side interface of pod `key`'s veth.
    pub fn pod_iface(&self, key: &str) -> String {
        self.pods.get(key).expect("known pod").1.clone()
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        sysctl(
            name,
            &[
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.all.dad_transmits=0",
                "net.ipv6.conf.default.dad_transmits=0",
            ],
        )?;
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    fn build(&mut self) -> Result<()> {
        let s = self.spec.clone();
        let fab = self.fabric();
        self.add_ns(&fab)?;
        ip(&["-n", &fab, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            &fab,
            "addr",
            "add",
            &format!("{}/24", s.fabric_v4()),
            "dev",
            "br0",
        ])?;
        ip(&[
            "-n",
            &fab,
            "addr",
            "add",
            &format!("{}/64", s.fabric_v6()),
            "dev",
            "br0",
            "nodad",
        ])?;
        ip(&["-n", &fab, "link", "set", "br0", "up"])?;
        for i in 0..s.nodes {
            let n = self.node(i);
            self.add_ns(&n)?;
            sysctl(
                &n,
                &[
                    "net.ipv4.ip_forward=1",
                    "net.ipv6.conf.all.forwarding=1",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                ],
            )?;
            let fab_if = format!("n{i}");
            ip(&[
                "-n", &fab, "link", "add", &fab_if, "type", "veth", "peer", "name", "eth0",
                "netns", &n,
            ])?;
            ip(&["-n", &fab, "link", "set", &fab_if, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &n,
                "addr",
                "add",
                &format!("{}/24", s.node_v4(i)),
                "dev",
                "eth0",
            ])?;
            ip(&[
                "-n",
                &n,
                "addr",
                "add",
                &format!("{}/64", s.node_v6(i)),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ip(&["-n", &n, "link", "set", "eth0", "up"])?;
        }
        for p in &s.pods {
            self.wire_pod(p)?;
        }
        for p in &s.pods {
            let a = AgentHandle::spawn(&self.pod(&p.key), &s.tcp, &s.udp, &s.sctp)?;
            self.agents.insert(p.key.clone(), a);
        }
        self.warm_up()
    }

    /// A pod's namespace, veth, addresses and routes (its node routes it to the veth, every
    /// other node via its node), as a CNI's ADD would make them.
    fn wire_pod(&mut self, p: &PodSpec) -> Result<()> {
        let s = self.spec.clone();
        let k = self.next_pod;
        self.next_pod += 1;
        let pn = format!("{}-p{k}", self.prefix);
        let host_if = format!("vp{k}");
        self.pods
            .insert(p.key.clone(), (pn.clone(), host_if.clone()));
        {
            let n = self.node(p.node);
            self.add_ns(&pn)?;
            ip(&[
                "-n", &n, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns",
                &pn,
            ])?;
            ip(&["-n", &n, "addr", "add", "169.254.1.1/32", "dev", &host_if])?;
            ip(&[
                "-n",
                &n,
                "addr",
                "add",
                "fe80::1/64",
                "dev",
                &host_if,
                "nodad",
            ])?;
            ip(&["-n", &n, "link", "set", &host_if, "up"])?;
            ip(&[
                "-n",
                &pn,
                "addr",
                "add",
                &format!("{}/32", p.v4),
                "dev",
                "eth0",
            ])?;
            ip(&[
                "-n",
                &pn,
                "addr",
                "add",
                &format!("{}/128", p.v6),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ip(&["-n", &pn, "link", "set", "eth0", "up"])?;
            ip(&[
                "-n",
                &pn,
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ])?;
            ip(&[
                "-n",
                &pn,
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ])?;
            ip(&[
                "-n", &pn, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
            ])?;
            // The owning node routes the pod to its veth, every other node via the owner.
            for i in 0..s.nodes {
                let ni = self.node(i);
                let (v4, v6) = (format!("{}/32", p.v4), format!("{}/128", p.v6));
                let (gw4, gw6) = (s.node_v4(p.node).to_string(), s.node_v6(p.node).to_string());
                let (to4, to6) = if i == p.node {
                    (["dev", host_if.as_str()], ["dev", host_if.as_str()])
                } else {
                    (["via", gw4.as_str()], ["via", gw6.as_str()])
                };
                ip(&["-n", &ni, "route", "add", &v4, to4[0], to4[1]])?;
                ip(&["-n", &ni, "-6", "route", "add", &v6, to6[0], to6[1]])?;
            }
        }
        Ok(())
    }

    /// Adds a pod while the cluster runs (what a CNI's ADD does: namespace, veth, addresses,
    /// routes), with an agent serving the cluster's ports.
    pub fn add_pod(&mut self, p: PodSpec) -> Result<()> {
        if self.pods.contains_key(&p.key) {
            bail!("pod {} exists", p.key);
        }
        self.wire_pod(&p)?;
        let a = AgentHandle::spawn(
            &self.pod(&p.key),
            &self.spec.tcp,
            &self.spec.udp,
            &self.spec.sctp,
        )?;
        self.agents.insert(p.key.clone(), a);
        self.spec.pods.push(p);
        Ok(())
    }

    /// Deletes a pod (CNI DEL): its agent, namespace (and with it the veth and its node's route
    /// to it) and the other nodes' routes to it.
    pub fn remove_pod(&mut self, key: &str) -> Result<()> {
        let p = self
            .spec
            .pods
            .iter()
            .find(|p| p.key == key)
            .cloned()
            .with_context(|| format!("no pod {key}"))?;
        self.agents.remove(key);
        let (ns, _) = self.pods.remove(key).expect("wired pod");
        delete_netns(&ns);
        self.namespaces.retain(|n| *n != ns);
        for i in (0..self.spec.nodes).filter(|i| *i != p.node) {
            let n = self.node(i);
            ip(&["-n", &n, "route", "del", &format!("{}/32", p.v4)])?;
            ip(&["-n", &n, "-6", "route", "del", &format!("{}/128", p.v6)])?;
        }
        self.spec.pods.retain(|x| x.key != key);
        Ok(())
    }

    /// Waits until every pod reaches every pod in both families (links, neighbours, routes).
    fn warm_up(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        // Pods that serve no TCP still answer echo requests (their kernel does).
        let (proto, port) = match self.spec.tcp.first() {
            Some(p) => (Proto::Tcp, *p),
            None => (Proto::Icmp, 0),
        };
        loop {
            let mut reqs = Vec::new();
            for from in self.spec.pods.iter().map(|p| p.key.clone()) {
                let probes = self
                    .spec
                    .pods
                    .iter()
                    .flat_map(|p| [IpAddr::V4(p.v4), IpAddr::V6(p.v6)])
                    .map(|dst| ProbeReq { dst, proto, port })
                    .collect();
                reqs.push((from, probes));
            }
            let results = self.probe(&reqs, Duration::from_millis(500), 0)?;
            if results.iter().flatten().all(|ok| *ok) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the cluster never became fully reachable");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Sends each pod its probes (all at once, all pods in parallel); results per request.
    pub fn probe(
        &mut self,
        reqs: &[(String, Vec<ProbeReq>)],
        timeout: Duration,
        retries: u32,
    ) -> Result<Vec<Vec<bool>>> {
        let reqs: Vec<(String, Request)> = reqs
            .iter()
            .map(|(from, probes)| {
                let r = Request {
                    probes: probes.clone(),
                    timeout_ms: timeout.as_millis() as u64,
                    retries,
                    ..Request::default()
                };
                (from.clone(), r)
            })
            .collect();
        for (from, r) in &reqs {
            self.agent(from)?.send(r)?;
        }
        let mut out = Vec::with_capacity(reqs.len());
        for (from, r) in &reqs {
            out.push(self.agent(from)?.receive(r)?.results);
        }
        Ok(out)
    }

    /// Runs stream operations in pod `from`.
    pub fn streams(
        &mut self,
        from: &str,
        ops: Vec<StreamOp>,
        timeout: Duration,
    ) -> Result<Vec<bool>> {
        self.agent(from)?.streams(ops, timeout)
    }

    pub fn agent(&mut self, key: &str) -> Result<&mut AgentHandle> {
        self.agents
            .get_mut(key)
            .with_context(|| format!("no pod {key}"))
    }

    /// A second agent in pod `key` that only probes, for a test thread of its own.
    pub fn prober(&self, key: &str) -> Result<AgentHandle> {
        AgentHandle::spawn(&self.pod(key), &[], &[], &[])
    }

    /// A probing agent in node `i`'s namespace: traffic from the node itself.
    pub fn node_prober(&self, i: usize) -> Result<AgentHandle> {
        AgentHandle::spawn(&self.node(i), &[], &[], &[])
    }

    /// An agent in node `i`'s namespace serving these ports on the node's own addresses (as a
    /// node's daemon or host-network pod would), for as long as the handle lives.
    ///
    /// The node's routes to its own pods get the node's address as their preferred source
    /// (as on a CNI whose node holds no address on the pods' veths): else a UDP reply from
    /// the agent's wildcard socket to one of them would leave from the veth's 169.254.1.1,
    /// which the pod's client does not take for the node's answer.
    pub fn node_server(&self, i: usize, tcp: &[u16], udp: &[u16]) -> Result<AgentHandle> {
        let n = self.node(i);
        let src = self.spec.node_v4(i).to_string();
        for p in self.spec.pods.iter().filter(|p| p.node == i) {
            let (_, host_if) = self.pods.get(&p.key).context("wired pod")?;
            let dst = format!("{}/32", p.v4);
            ip(&[
                "-n", &n, "route", "replace", &dst, "dev", host_if, "src", &src,
            ])?;
        }
        AgentHandle::spawn(&n, tcp, udp, &[])
    }

    /// Starts a process inside a namespace, its stdout and stderr appended to `log`; it is
    /// killed when the cluster is dropped.
    pub fn spawn_in(
        &mut self,
        netns: &str,
        cmd: &mut Command,
        log: &std::path::Path,
    ) -> Result<&mut Child> {
        let program = cmd.get_program().to_owned();
        let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
        let envs: Vec<_> = cmd
            .get_envs()
            .map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned())))
            .collect();
        let mut c = Command::new("ip");
        c.args(["netns", "exec", netns]).arg(program).args(args);
        for (k, v) in envs {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        c.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        let child = c.spawn().context("spawning in a namespace")?;
        self.children.push(child);
        Ok(self.children.last_mut().expect("pushed"))
    }

    /// Starts a process in this process's own namespaces (a container runtime, which puts
    /// its container into a node's namespace itself: under `ip netns exec`, whose private
    /// /sys hides the cgroup mounts, it cannot create one), output appended to `log`;
    /// killed when the cluster is dropped.
    pub fn spawn_here(&mut self, cmd: &mut Command, log: &std::path::Path) -> Result<()> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        self.children.push(cmd.spawn().context("spawning")?);
        Ok(())
    }

    /// Runs a command inside a namespace to completion.
    pub fn run_in(&self, netns: &str, program: &str, args: &[&str]) -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", netns, program])
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "{program} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// kube-proxy's situation: traffic to `service:port` arriving at node `i` is DNATed to
    /// `backend:target` in prerouting, before any filtering.
    pub fn dnat(
        &self,
        i: usize,
        service: IpAddr,
        port: u16,
        backend: IpAddr,
        target: u16,
    ) -> Result<()> {
        let fam = if service.is_ipv6() { "ip6" } else { "ip" };
        let to = if backend.is_ipv6() {
            format!("[{backend}]:{target}")
        } else {
            format!("{backend}:{target}")
        };
        let script = format!(
            "table {fam} kubeproxy {{\n chain pre {{ type nat hook prerouting priority -100; {fam} daddr {service} tcp dport {port} dnat to {to}; }}\n}}\n"
        );
        self.nft_script(i, &script)
    }
}

impl Cluster {
    /// Runs an nft script in node `i`'s namespace.
    pub fn nft_script(&self, i: usize, script: &str) -> Result<()> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node(i), "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(script.as_bytes())?;
        if !child.wait()?.success() {
            bail!("nft script failed in node {i}: {script}");
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.agents.clear();
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.namespaces.iter().rev() {
            delete_netns(ns);
        }
    }
}
