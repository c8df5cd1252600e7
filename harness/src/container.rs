//! Moat's image run as the Helm chart runs it: `moat-server` and `moat-enforcer` as podman
//! containers inside the harness's network namespaces, with the security context, user,
//! seccomp profile and mounts of the chart *as `helm template` renders it* — read, never
//! restated here, so a chart that drifts from what was tested fails the run.
//!
//! What the harness adds, because no cluster runs here: the volumes' contents (certificates
//! issued by `moatctl certs` instead of bootstrap, which needs a TokenReview), the demo's
//! manifest directory (the file source) and its own arguments (addresses, timings).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_yaml::Value;

/// Which seccomp profiles the containers run under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seccomp {
    /// The chart's `RuntimeDefault`, realised as podman's default profile (containers-common:
    /// CRI-O's too).
    Podman,
    /// The chart's `RuntimeDefault`, realised as containerd's (the Localhost equivalent in
    /// `integration/fixtures/seccomp/`).
    Containerd,
    /// The enforcer under the chart's own profile (`files/seccomp-enforcer.json`, rendered
    /// as `type: Localhost`); the server's `RuntimeDefault` as containerd's.
    Chart,
}

impl std::str::FromStr for Seccomp {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "podman" => Seccomp::Podman,
            "containerd" => Seccomp::Containerd,
            "chart" => Seccomp::Chart,
            _ => bail!("unknown seccomp mode {s} (podman, containerd or chart)"),
        })
    }
}

impl std::fmt::Display for Seccomp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Seccomp::Podman => "podman",
            Seccomp::Containerd => "containerd",
            Seccomp::Chart => "chart",
        })
    }
}

/// Where the chart's `Localhost` profile names are installed (kubelet's seccomp directory
/// in a cluster, the chart's own files here).
const LOCALHOST_PROFILES: &[(&str, &str)] =
    &[("moat/enforcer.json", "files/seccomp-enforcer.json")];

/// What the harness puts behind one of the chart's volumes.
#[derive(Clone, Debug)]
pub enum Volume {
    /// A directory (hostPath, a Secret's files, a PersistentVolume).
    Dir(PathBuf),
}

/// What the harness gives one container beyond the chart.
pub struct Run<'a> {
    /// The contents of the chart's volumes, by volume name.
    pub volumes: &'a BTreeMap<&'a str, Volume>,
    /// Read-only mounts the chart does not have (the demo's manifest directory).
    pub extra: &'a [(PathBuf, PathBuf)],
    pub env: &'a [(String, String)],
    pub args: &'a [String],
}

/// The chart's two workloads, rendered for one image.
pub struct Containers {
    pub image: String,
    pub seccomp: Seccomp,
    root: PathBuf,
    server: Workload,
    enforcer: Workload,
}

/// A rendered pod template: the pod's spec and its one container.
struct Workload {
    pod: Value,
    container: Value,
}

/// The repository: `MOAT_REPO_ROOT`, else where this crate was built from.
pub fn repo_root() -> PathBuf {
    std::env::var_os("MOAT_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
}

/// `helm template` of `charts/moat` (the helm `scripts/chart-tools.sh` installs), in
/// namespace moat-system with `args` (`--set`, `-f`…): its documents.
pub fn render_chart(args: &[String]) -> Result<Vec<Value>> {
    let root = repo_root();
    let helm = root.join(".tools/bin/helm");
    if !helm.exists() {
        bail!("{} not found: run ./scripts/setup.sh", helm.display());
    }
    let out = Command::new(&helm)
        .args(["template", "moat"])
        .arg(root.join("charts/moat"))
        .args(["--namespace", "moat-system"])
        .args(args)
        .output()
        .context("running helm")?;
    if !out.status.success() {
        bail!(
            "helm template: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_slice(&out.stdout) {
        let v = Value::deserialize(doc)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// The rendered object `kind`/`name`.
pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|v| v["kind"].as_str() == Some(kind) && v["metadata"]["name"].as_str() == Some(name))
        .with_context(|| format!("the rendered chart has no {kind}/{name}"))
}

impl Containers {
    /// Renders the chart (`helm template`, the helm `scripts/chart-tools.sh` installs) for
    /// `image` and checks podman and the image are there.
    pub fn new(image: &str, seccomp: Seccomp) -> Result<Containers> {
        let root = repo_root();
        let (repository, tag) = split_reference(image);
        let mut sets = vec![
            format!("image.repository={repository}"),
            format!("image.tag={tag}"),
        ];
        if seccomp == Seccomp::Chart {
            sets.push("enforcer.seccompProfile.type=Localhost".into());
            sets.push("enforcer.seccompProfile.localhostProfile=moat/enforcer.json".into());
        }
        let args: Vec<String> = sets.into_iter().flat_map(|s| ["--set".into(), s]).collect();
        let docs = render_chart(&args)?;
        let server = workload(find(&docs, "StatefulSet", "moat-server")?)?;
        let enforcer = workload(find(&docs, "DaemonSet", "moat-enforcer")?)?;
        let c = Containers {
            image: image.to_string(),
            seccomp,
            root,
            server,
            enforcer,
        };
        for w in [&c.server, &c.enforcer] {
            w.env_paths_are_mounted()?;
            let rendered = w.container["image"].as_str().unwrap_or_default();
            if rendered != image {
                bail!("the chart renders image {rendered}, not {image}");
            }
        }
        let inspect = Command::new("podman")
            .args(["image", "exists", image])
            .status()
            .context("podman not found: run ./scripts/setup.sh")?;
        if !inspect.success() {
            bail!("image {image} not found: build it with ./scripts/image.sh --tag {image}");
        }
        Ok(c)
    }

    /// Where the chart mounts `volume` in the server's container.
    pub fn server_mount(&self, volume: &str) -> Result<PathBuf> {
        self.server.mount_path(volume)
    }

    /// Where the chart mounts `volume` in the enforcer's container.
    pub fn enforcer_mount(&self, volume: &str) -> Result<PathBuf> {
        self.enforcer.mount_path(volume)
    }

    /// The mode kubelet gives `file` of the server's Secret volume `volume`.
    pub fn server_secret_mode(&self, volume: &str, file: &str) -> u32 {
        secret_mode(&self.server.pod, volume, file)
    }

    /// The mode kubelet gives `file` of the enforcer's Secret volume `volume`.
    pub fn enforcer_secret_mode(&self, volume: &str, file: &str) -> u32 {
        secret_mode(&self.enforcer.pod, volume, file)
    }

    /// The user id the server runs as (the owner its writable volumes need).
    pub fn server_fs_group(&self) -> Option<u32> {
        self.server.pod["securityContext"]["fsGroup"]
            .as_u64()
            .map(|g| g as u32)
    }

    /// `podman run` for the server in network namespace `netns`.
    pub fn server(&self, name: &str, netns: &str, run: &Run<'_>) -> Result<Command> {
        self.run(&self.server, name, netns, run)
    }

    /// `podman run` for an enforcer in network namespace `netns`.
    pub fn enforcer(&self, name: &str, netns: &str, run: &Run<'_>) -> Result<Command> {
        self.run(&self.enforcer, name, netns, run)
    }

    fn run(&self, w: &Workload, name: &str, netns: &str, run: &Run<'_>) -> Result<Command> {
        let mut cmd = Command::new("podman");
        // --replace: a restart after a kill need not wait for the old one's removal.
        cmd.args(["run", "--rm", "--replace", "--name", name]);
        cmd.args(["--label", "moat-harness=1"]);
        if w.pod["hostNetwork"].as_bool() != Some(true) {
            bail!("{name}: the chart no longer runs it in the node's network namespace");
        }
        cmd.arg(format!("--network=ns:/run/netns/{netns}"));
        // No runtime defaults Kubernetes does not have: podman's extra tmpfs on a
        // read-only root, its rlimits (this machine's containers.conf drops those too).
        cmd.arg("--read-only-tmpfs=false");
        let command = w.container["command"]
            .as_sequence()
            .context("the chart's container has no command")?;
        let entry = command
            .first()
            .and_then(Value::as_str)
            .context("empty command")?;
        cmd.arg(format!("--entrypoint={entry}"));
        cmd.args(self.security(w, name, run.volumes)?);
        for (host, at) in run.extra {
            cmd.arg(format!("--volume={}:{}:ro", host.display(), at.display()));
        }
        for (k, v) in run.env {
            cmd.arg(format!("--env={k}={v}"));
        }
        cmd.arg(&self.image);
        cmd.args(command.iter().skip(1).filter_map(Value::as_str));
        cmd.args(run.args);
        Ok(cmd)
    }

    /// The chart's security context, seccomp profile and mounts as podman arguments.
    fn security(
        &self,
        w: &Workload,
        name: &str,
        volumes: &BTreeMap<&str, Volume>,
    ) -> Result<Vec<String>> {
        let pod = &w.pod["securityContext"];
        let c = &w.container["securityContext"];
        // The container's setting wins over the pod's, as in Kubernetes; these exist only on
        // the container.
        const CONTAINER_ONLY: &[&str] = &[
            "privileged",
            "allowPrivilegeEscalation",
            "readOnlyRootFilesystem",
            "capabilities",
        ];
        let field = |k: &str| {
            if c[k].is_null() && !CONTAINER_ONLY.contains(&k) {
                pod[k].clone()
            } else {
                c[k].clone()
            }
        };
        known(name, "pod", &w.pod, POD_KEYS)?;
        known(name, "container", &w.container, CONTAINER_KEYS)?;
        known(name, "pod securityContext", pod, POD_SECURITY_KEYS)?;
        known(name, "securityContext", c, CONTAINER_SECURITY_KEYS)?;
        let mut out = Vec::new();
        // eBPF maps are charged to the container's memory cgroup: the chart's limit applies.
        if let Some(m) = w.container["resources"]["limits"]["memory"].as_str() {
            out.push(format!("--memory={}", memory(m)?));
        }
        if field("privileged").as_bool() == Some(true) {
            bail!("{name}: the chart runs it privileged");
        }
        let user = field("runAsUser").as_u64();
        if field("runAsNonRoot").as_bool() == Some(true) && user.unwrap_or(0) == 0 {
            bail!("{name}: runAsNonRoot with user {user:?} (kubelet refuses to start it)");
        }
        match (user, field("runAsGroup").as_u64()) {
            (Some(u), Some(g)) => out.push(format!("--user={u}:{g}")),
            (Some(u), None) => out.push(format!("--user={u}")),
            (None, _) => {}
        }
        if let Some(g) = pod["fsGroup"].as_u64() {
            out.push(format!("--group-add={g}"));
        }
        // Kubernetes' default is true; only an explicit false sets no_new_privs.
        if field("allowPrivilegeEscalation").as_bool() == Some(false) {
            out.push("--security-opt=no-new-privileges".into());
        }
        if field("readOnlyRootFilesystem").as_bool() == Some(true) {
            out.push("--read-only".into());
        }
        // Capabilities: Kubernetes starts from the runtime's defaults, drops, then adds.
        let caps = &c["capabilities"];
        for d in caps["drop"].as_sequence().into_iter().flatten() {
            out.push(format!("--cap-drop={}", d.as_str().unwrap_or_default()));
        }
        for a in caps["add"].as_sequence().into_iter().flatten() {
            out.push(format!("--cap-add={}", a.as_str().unwrap_or_default()));
        }
        let profile = field("seccompProfile");
        match profile["type"].as_str() {
            // Unset, the kubelet runs it Unconfined (unless its seccompDefault is on): the chart
            // must say.
            None => bail!("{name}: the chart sets no seccomp profile"),
            Some("RuntimeDefault") => match self.seccomp {
                Seccomp::Podman => {}
                Seccomp::Containerd | Seccomp::Chart => out.push(format!(
                    "--security-opt=seccomp={}",
                    self.root
                        .join("integration/fixtures/seccomp/containerd-runtime-default.json")
                        .display()
                )),
            },
            Some("Localhost") => {
                let want = profile["localhostProfile"].as_str().unwrap_or_default();
                let (_, file) = LOCALHOST_PROFILES
                    .iter()
                    .find(|(n, _)| *n == want)
                    .with_context(|| format!("{name}: no Localhost profile {want} here"))?;
                out.push(format!(
                    "--security-opt=seccomp={}",
                    self.root.join("charts/moat").join(file).display()
                ));
            }
            Some(other) => bail!("{name}: seccomp profile type {other} is not run here"),
        }
        out.extend(mounts(w, name, volumes)?);
        Ok(out)
    }
}

impl Workload {
    /// The harness passes its own arguments, not the chart's env; every path the chart's env
    /// names must at least lie in one of its mounts (a read-only root holds nothing else).
    fn env_paths_are_mounted(&self) -> Result<()> {
        let mounts: Vec<&str> = self.container["volumeMounts"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|m| m["mountPath"].as_str())
            .collect();
        for e in self.container["env"].as_sequence().into_iter().flatten() {
            let Some(v) = e["value"].as_str() else {
                continue;
            };
            if v.starts_with('/') && !mounts.iter().any(|m| Path::new(v).starts_with(m)) {
                bail!(
                    "the chart's {} is {v}, in no volume it mounts",
                    e["name"].as_str().unwrap_or_default()
                );
            }
        }
        Ok(())
    }

    fn mount_path(&self, volume: &str) -> Result<PathBuf> {
        self.container["volumeMounts"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|m| m["name"].as_str() == Some(volume))
            .and_then(|m| m["mountPath"].as_str())
            .map(PathBuf::from)
            .with_context(|| format!("the chart mounts no volume {volume}"))
    }
}

/// Pod and container fields this mapping understands. Anything else in the rendered chart
/// (an init container, host PID, sysctls, AppArmor, supplemental groups…) is an error, so a
/// chart that grows one is not run without it.
const POD_KEYS: &[&str] = &[
    "serviceAccountName",
    "automountServiceAccountToken",
    "hostNetwork",
    "dnsPolicy",
    "priorityClassName",
    "terminationGracePeriodSeconds",
    "tolerations",
    "nodeSelector",
    "affinity",
    "imagePullSecrets",
    "securityContext",
    "containers",
    "volumes",
];
const CONTAINER_KEYS: &[&str] = &[
    "name",
    "image",
    "imagePullPolicy",
    "command",
    "args",
    "env",
    "ports",
    "readinessProbe",
    "livenessProbe",
    "resources",
    "securityContext",
    "volumeMounts",
];
const POD_SECURITY_KEYS: &[&str] = &[
    "runAsNonRoot",
    "runAsUser",
    "runAsGroup",
    "fsGroup",
    "seccompProfile",
];
const CONTAINER_SECURITY_KEYS: &[&str] = &[
    "runAsNonRoot",
    "runAsUser",
    "runAsGroup",
    "privileged",
    "allowPrivilegeEscalation",
    "readOnlyRootFilesystem",
    "seccompProfile",
    "capabilities",
];
const MOUNT_KEYS: &[&str] = &[
    "name",
    "mountPath",
    "readOnly",
    "subPath",
    "mountPropagation",
];

fn known(name: &str, what: &str, v: &Value, keys: &[&str]) -> Result<()> {
    for k in v.as_mapping().into_iter().flat_map(|m| m.keys()) {
        let k = k.as_str().unwrap_or_default();
        if !keys.contains(&k) {
            bail!("{name}: the chart's {what} sets {k}, which the harness does not run");
        }
    }
    Ok(())
}

/// A Kubernetes memory quantity as podman's `--memory` (bytes).
fn memory(q: &str) -> Result<u64> {
    let units = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ];
    for (suffix, mult) in units {
        if let Some(n) = q.strip_suffix(suffix) {
            return Ok(n.parse::<u64>()? * mult);
        }
    }
    Ok(q.parse()?)
}

/// The mode kubelet gives a file of Secret, ConfigMap or projected volume `volume`: the item's
/// or the volume's `defaultMode` (0644), group-readable with the pod's fsGroup.
pub fn secret_mode(w_pod: &Value, volume: &str, file: &str) -> u32 {
    let def = w_pod["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|v| v["name"].as_str() == Some(volume));
    let source = def.and_then(|d| {
        ["secret", "configMap", "projected"]
            .iter()
            .map(|k| &d[*k])
            .find(|s| s.is_mapping())
    });
    let item = source.and_then(|s| {
        s["items"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|i| i["path"].as_str() == Some(file))
            .and_then(|i| i["mode"].as_u64())
    });
    let mode = item
        .or_else(|| source.and_then(|s| s["defaultMode"].as_u64()))
        .unwrap_or(0o644) as u32;
    if w_pod["securityContext"]["fsGroup"].is_u64() {
        mode | 0o440
    } else {
        mode
    }
}

/// The chart's volume mounts as podman `--volume`/`--tmpfs` arguments. Every mount needs a
/// source: a volume the harness does not provide is an error, so a new chart mount is
/// noticed rather than left out.
fn mounts(w: &Workload, name: &str, provided: &BTreeMap<&str, Volume>) -> Result<Vec<String>> {
    let defined: BTreeMap<&str, &Value> = w.pod["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|v| Some((v["name"].as_str()?, v)))
        .collect();
    let mut out = Vec::new();
    for m in w.container["volumeMounts"]
        .as_sequence()
        .into_iter()
        .flatten()
    {
        known(name, "volumeMount", m, MOUNT_KEYS)?;
        let vname = m["name"].as_str().context("volumeMount without name")?;
        let at = m["mountPath"]
            .as_str()
            .context("volumeMount without path")?;
        let def = defined
            .get(vname)
            .with_context(|| format!("{name}: mount of undefined volume {vname}"))?;
        if def["emptyDir"].is_mapping() {
            if def["emptyDir"]["medium"].as_str() != Some("Memory") {
                bail!("{name}: emptyDir {vname} on disk is not run here");
            }
            // An emptyDir starts empty: no copy of the image's directory.
            out.push(format!("--tmpfs={at}:rw,nosuid,nodev,notmpcopyup"));
            continue;
        }
        let Some(Volume::Dir(dir)) = provided.get(vname) else {
            bail!(
                "{name}: the chart mounts volume {vname} at {at}, which the harness does not provide"
            );
        };
        let source = match m["subPath"].as_str() {
            Some(sub) => dir.join(sub),
            None => dir.clone(),
        };
        // Secrets, ConfigMaps and projected volumes are read-only whatever the mount says.
        let ro = m["readOnly"].as_bool() == Some(true)
            || ["secret", "configMap", "projected"]
                .iter()
                .any(|k| def[*k].is_mapping());
        let propagation = match m["mountPropagation"].as_str() {
            None | Some("None") => "rprivate",
            Some("HostToContainer") => "rslave",
            Some("Bidirectional") => "rshared",
            Some(other) => bail!("{name}: mountPropagation {other}"),
        };
        out.push(format!(
            "--volume={}:{at}:{}{propagation}",
            source.display(),
            if ro { "ro," } else { "" }
        ));
    }
    Ok(out)
}

/// A rendered StatefulSet's or DaemonSet's pod template and its one container.
fn workload(v: &Value) -> Result<Workload> {
    let name = format!(
        "{}/{}",
        v["kind"].as_str().unwrap_or("?"),
        v["metadata"]["name"].as_str().unwrap_or("?")
    );
    let mut pod = v["spec"]["template"]["spec"].clone();
    // A StatefulSet's claim templates are volumes of its pods.
    for claim in v["spec"]["volumeClaimTemplates"]
        .as_sequence()
        .into_iter()
        .flatten()
    {
        let mut vol = serde_yaml::Mapping::new();
        vol.insert("name".into(), claim["metadata"]["name"].clone());
        vol.insert(
            "persistentVolumeClaim".into(),
            Value::Mapping(Default::default()),
        );
        if let Value::Sequence(list) = &mut pod["volumes"] {
            list.push(Value::Mapping(vol));
        }
    }
    let containers = pod["containers"].as_sequence().context("no containers")?;
    if containers.len() != 1 {
        bail!(
            "{name}: expected one container, the chart has {}",
            containers.len()
        );
    }
    let container = containers[0].clone();
    Ok(Workload { pod, container })
}

/// `repo:tag` (a registry port's colon is not a tag).
fn split_reference(image: &str) -> (&str, &str) {
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (image, "latest"),
    }
}

/// Removes harness containers whose test process is gone (named `<prefix><pid>-…`).
pub fn sweep(prefix: &str) {
    let Ok(out) = Command::new("podman")
        .args([
            "ps",
            "-a",
            "--filter",
            "label=moat-harness=1",
            "--format",
            "{{.Names}}",
        ])
        .output()
    else {
        return;
    };
    for name in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let pid: Option<u32> = rest.split('-').next().and_then(|p| p.parse().ok());
        if pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists()) {
            continue;
        }
        remove(name);
    }
}

/// Makes the mount at `path` shared (its own peer group), as a node's mounts are.
pub fn make_shared(path: &Path) -> Result<()> {
    let out = Command::new("mount")
        .arg("--make-shared")
        .arg(path)
        .output()
        .context("mount")?;
    if !out.status.success() {
        bail!(
            "making {} a shared mount: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The host process id of running container `name`'s first process.
pub fn pid(name: &str) -> Result<u32> {
    let out = Command::new("podman")
        .args(["inspect", "--format", "{{.State.Pid}}", name])
        .output()?;
    if !out.status.success() {
        bail!(
            "podman inspect {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    if pid == 0 {
        bail!("container {name} is not running");
    }
    Ok(pid)
}

/// Waits until container `name` runs (at most 30 s); its `podman run` writes to `log`.
pub fn wait_running(name: &str, log: &Path) -> Result<u32> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match pid(name) {
            Ok(p) => return Ok(p),
            Err(e) if std::time::Instant::now() > deadline => {
                let out = std::fs::read_to_string(log).unwrap_or_default();
                bail!("container {name} did not start: {e:#}\n{out}");
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
}

/// Stops and removes one container (no grace: the harness is done with it).
pub fn remove(name: &str) {
    let _ = Command::new("podman")
        .args(["rm", "--force", "--time", "0", name])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_at_the_tag_not_a_registry_port() {
        assert_eq!(
            split_reference("localhost/moat:dev"),
            ("localhost/moat", "dev")
        );
        assert_eq!(
            split_reference("registry:5000/moat"),
            ("registry:5000/moat", "latest")
        );
        assert_eq!(
            split_reference("registry:5000/moat:1.2"),
            ("registry:5000/moat", "1.2")
        );
    }
}
