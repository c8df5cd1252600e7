//! The server and enforcers as containers of the image (see [`crate::container`]): the
//! volumes the chart mounts, filled with the harness's certificates and directories, and
//! the same arguments as the processes get, with the paths where the chart mounts them.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::{Moat, SYNC_PORT};
use crate::cluster::binary;
use crate::container::{Run, Volume};

/// Where the demo's manifest directory (the file source) appears in the server's
/// container: the one mount the chart does not have (it watches the Kubernetes API).
const MANIFESTS: &str = "/etc/moat/manifests";

impl Moat {
    /// What `/proc/<pid>/exe` reads for process `name`: the image's path in a container.
    pub(super) fn executable(&self, name: &str) -> Result<PathBuf> {
        match &self.containers {
            Some(_) => Ok(Path::new("/usr/local/bin").join(name)),
            None => binary(name),
        }
    }

    /// The server's container name.
    pub fn server_container(&self) -> String {
        format!("{}-server", self.cluster.fabric())
    }

    /// Node `i`'s enforcer's container name.
    pub fn enforcer_container(&self, i: usize) -> String {
        format!("{}-enforcer", self.cluster.node(i))
    }

    fn log_env(&self) -> Vec<(String, String)> {
        vec![
            ("MOAT_LOG".into(), super::log_level()),
            ("NO_COLOR".into(), "1".into()),
        ]
    }

    /// A directory (`dir`, made once: a running container may be reading it) holding copies
    /// of `files` (certificates dir → name in the volume), owned and moded as kubelet makes
    /// a Secret's files: root, group `fs_group`, `mode(file)`.
    fn secret(
        &self,
        dir: &str,
        files: &[(&str, &str)],
        fs_group: Option<u32>,
        mode: impl Fn(&str) -> u32,
    ) -> Result<PathBuf> {
        let path = self.path(&format!("volumes/{dir}"));
        if path.exists() {
            return Ok(path);
        }
        let tmp = self.path(&format!("volumes/.{dir}"));
        std::fs::create_dir_all(&tmp)?;
        for (from, to) in files {
            let target = tmp.join(to);
            std::fs::copy(self.path("certs").join(from), &target)
                .with_context(|| format!("copying {from} into volume {dir}"))?;
            if let Some(g) = fs_group {
                std::os::unix::fs::chown(&target, Some(0), Some(g))?;
            }
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode(to)))?;
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    pub(super) fn start_server_container(&mut self) -> Result<()> {
        let c = self.containers.as_ref().expect("container mode");
        let fs_group = c.server_fs_group();
        let ca = self.secret("server-ca", &[("ca.pem", "ca.pem")], fs_group, |f| {
            c.server_secret_mode("ca", f)
        })?;
        let tls = self.secret(
            "server-tls",
            &[
                ("server.pem", "server.pem"),
                ("server-key.pem", "server-key.pem"),
            ],
            fs_group,
            |f| c.server_secret_mode("tls", f),
        )?;
        // The chart's clusters file: the demo serves a manifest directory instead.
        let clusters = self.path("volumes/server-clusters");
        std::fs::create_dir_all(&clusters)?;
        std::fs::write(
            clusters.join("clusters.yaml"),
            "# unused: the harness serves a directory of manifests\n",
        )?;
        // A PersistentVolume with the pod's fsGroup: group-owned, group-writable, setgid.
        let state = self.path("state/server");
        std::fs::create_dir_all(&state)?;
        if let Some(g) = fs_group {
            std::os::unix::fs::chown(&state, Some(0), Some(g))?;
        }
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o2770))?;
        let volumes = BTreeMap::from([
            ("ca", Volume::Dir(ca)),
            ("tls", Volume::Dir(tls)),
            ("clusters", Volume::Dir(clusters)),
            ("state", Volume::Dir(state)),
        ]);
        let at = |v: &str, file: &str| -> Result<String> {
            Ok(c.server_mount(v)?.join(file).display().to_string())
        };
        let mut args: Vec<String> = vec![
            "--source".into(),
            format!("dir:{MANIFESTS}"),
            "--poll-seconds".into(),
            "3600".into(),
            "--listen".into(),
            format!("[::]:{SYNC_PORT}"),
            "--health-addr".into(),
            "127.0.0.1:7444".into(),
            "--metrics-addr".into(),
            "127.0.0.1:7445".into(),
            "--tls-ca".into(),
            at("ca", "ca.pem")?,
            "--tls-cert".into(),
            at("tls", "server.pem")?,
            "--tls-key".into(),
            at("tls", "server-key.pem")?,
            "--state-dir".into(),
            c.server_mount("state")?.display().to_string(),
        ];
        args.extend(self.server_flags().into_iter().map(String::from));
        let fab = self.cluster.fabric();
        let name = self.server_container();
        let run = Run {
            volumes: &volumes,
            extra: &[(self.manifests(), PathBuf::from(MANIFESTS))],
            env: &self.log_env(),
            args: &args,
        };
        let mut cmd = c.server(&name, &fab, &run)?;
        self.container_names.insert(name);
        let log = self.log("server");
        self.cluster.spawn_here(&mut cmd, &log)?;
        crate::container::wait_running(&self.server_container(), &log)?;
        Ok(())
    }

    pub(super) fn start_enforcer_container(&mut self, i: usize) -> Result<()> {
        let c = self.containers.as_ref().expect("container mode");
        let name = self.node_names[i].clone();
        let node_ns = self.cluster.node(i);
        let ca = self.secret("enforcer-ca", &[("ca.pem", "ca.pem")], None, |f| {
            c.enforcer_secret_mode("ca", f)
        })?;
        // The projected ServiceAccount token: mounted as the chart mounts it, unused (the
        // harness issues node certificates itself; bootstrap needs a TokenReview).
        let token = self.path("volumes/enforcer-token");
        std::fs::create_dir_all(&token)?;
        std::fs::write(token.join("token"), "unused\n")?;
        // The node's hostPath state directory; its certificate is put there as bootstrap
        // would have written it.
        let state = self.path(&format!("state/{name}"));
        std::fs::create_dir_all(&state)?;
        for (from, to) in [
            (format!("node-{name}.pem"), "node.pem"),
            (format!("node-{name}-key.pem"), "node-key.pem"),
        ] {
            std::fs::copy(self.path("certs").join(from), state.join(to))?;
        }
        let bpffs = Path::new(crate::cluster::BPFFS).join(&node_ns);
        std::fs::create_dir_all(&bpffs)?;
        let volumes = BTreeMap::from([
            ("bpffs", Volume::Dir(bpffs)),
            ("state", Volume::Dir(state)),
            ("ca", Volume::Dir(ca)),
            ("token", Volume::Dir(token)),
        ]);
        let state_at = c.enforcer_mount("state")?;
        let mut args: Vec<String> = vec![
            "--backend".into(),
            self.backend_of(i).to_string(),
            "--node".into(),
            name.clone(),
            "--server".into(),
            format!(
                "https://{}:{SYNC_PORT}",
                self.server_vip.unwrap_or(self.server_addr)
            ),
            "--tls-server-name".into(),
            "moat-server".into(),
            "--tls-ca".into(),
            c.enforcer_mount("ca")?.join("ca.pem").display().to_string(),
            "--tls-cert".into(),
            state_at.join("node.pem").display().to_string(),
            "--tls-key".into(),
            state_at.join("node-key.pem").display().to_string(),
            "--state-dir".into(),
            state_at.display().to_string(),
            "--health-addr".into(),
            "127.0.0.1:7446".into(),
            "--metrics-addr".into(),
            "127.0.0.1:7447".into(),
            "--backoff-max-seconds".into(),
            "1".into(),
        ];
        args.extend(self.enforcer_args.iter().cloned());
        args.extend(self.node_args.get(&i).into_iter().flatten().cloned());
        let cname = self.enforcer_container(i);
        let run = Run {
            volumes: &volumes,
            extra: &[],
            env: &self.log_env(),
            args: &args,
        };
        let mut cmd = c.enforcer(&cname, &node_ns, &run)?;
        self.container_names.insert(cname);
        let log = self.log(&format!("enforcer-{name}"));
        self.cluster.spawn_here(&mut cmd, &log)?;
        crate::container::wait_running(&self.enforcer_container(i), &log)?;
        Ok(())
    }
}
