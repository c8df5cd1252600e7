//! Several server replicas on the netns cluster: the test Kubernetes API server
//! (`moat-test-apiserver`) runs in the fabric namespace and holds exactly what the manifests
//! say (each [`Moat::write_manifests`] syncs it), and `n` `moat-server` replicas there watch
//! it, coordinate through it (`--ha-cluster`) and serve every enforcer, which is given all
//! of their addresses.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{Moat, SYNC_PORT, log_level, tls_args};
use crate::cluster::binary;

/// The test API server process and the pipe the harness drives it through.
pub(super) struct KubeApi {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub kubeconfig: PathBuf,
}

impl KubeApi {
    pub(super) fn start(netns: &str, kubeconfig: &Path) -> Result<KubeApi> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(binary("moat-test-apiserver")?)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting moat-test-apiserver")?;
        let stdin = child.stdin.take().context("stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("moat-test-apiserver did not start: {line:?}");
        }
        Ok(KubeApi {
            child,
            stdin,
            stdout,
            kubeconfig: kubeconfig.to_path_buf(),
        })
    }

    /// Makes the API server hold exactly the objects of `file`.
    pub(super) fn sync(&mut self, file: &Path) -> Result<()> {
        writeln!(self.stdin, "sync {}", file.display())?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        if !line.starts_with("ok") {
            bail!("syncing the test API server: {line:?}");
        }
        Ok(())
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moat {
    /// Replica `i`'s sync port (its health and metrics ports follow it).
    pub fn replica_port(i: usize) -> u16 {
        SYNC_PORT + 10 * i as u16
    }

    /// The enforcers' `--server`: every replica, or the one server.
    pub(super) fn server_urls(&self) -> String {
        let host = self.server_vip.unwrap_or(self.server_addr);
        if self.replicas == 0 {
            return format!("https://{host}:{SYNC_PORT}");
        }
        (0..self.replicas)
            .map(|i| format!("https://{host}:{}", Self::replica_port(i)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts (or restarts) replica `i`; returns once it is ready (first full sync).
    pub fn start_replica(&mut self, i: usize) -> Result<()> {
        let kube = self.kube.as_ref().context("not a replicated cluster")?;
        let kubeconfig = kube.lock().expect("kube api").kubeconfig.clone();
        let port = Self::replica_port(i);
        let c = self.path("certs");
        let mut cmd = Command::new(binary("moat-server")?);
        cmd.arg("--source")
            .arg(format!("kube:{}", kubeconfig.display()))
            .args(["--listen", &format!("[::]:{port}")])
            .args(["--health-addr", &format!("127.0.0.1:{}", port + 1)])
            .args(["--metrics-addr", &format!("127.0.0.1:{}", port + 2)])
            .args(tls_args(&c, "server"))
            .arg("--state-dir")
            .arg(self.path(&format!("state/server-{i}")))
            .args(["--ha-cluster", "default", "--ha-namespace", "moat-system"])
            .args(["--replica", &format!("r{i}")])
            .args(["--ha-stale-after", "3s", "--ha-drain", "2s"])
            .args(self.server_flags())
            .env("MOAT_LOG", log_level())
            .env("NO_COLOR", "1");
        let fab = self.cluster.fabric();
        let log = self.log(&format!("server-{i}"));
        self.cluster.spawn_in(&fab, &mut cmd, &log)?;
        self.down.remove(&i);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.replica_ready(i) {
            if Instant::now() > deadline {
                bail!("replica r{i} not ready after 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Whether replica `i` answers `moatctl status` with its first full sync in.
    fn replica_ready(&self, i: usize) -> bool {
        self.status_of(i)
            .is_ok_and(|s| s["clusters"][0]["synced"] == true)
    }

    /// The pid of replica `i`'s process, if it runs.
    fn replica_pid(&self, i: usize) -> Result<Option<u32>> {
        let fab = self.cluster.fabric();
        let out = Command::new("ip").args(["netns", "pids", &fab]).output()?;
        let server = binary("moat-server")?;
        let mark = format!("--replica\0r{i}\0");
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe"));
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if exe.is_ok_and(|e| e == server) && String::from_utf8_lossy(&cmdline).contains(&mark) {
                return Ok(pid.parse().ok());
            }
        }
        Ok(None)
    }

    /// SIGKILL to replica `i`: no drain, no shutdown path.
    pub fn kill_replica(&mut self, i: usize) -> Result<()> {
        self.signal_replica(i, "-9")
    }

    /// SIGTERM to replica `i`, and waits for it to exit (its drain included).
    pub fn terminate_replica(&mut self, i: usize) -> Result<()> {
        self.signal_replica(i, "-TERM")
    }

    fn signal_replica(&mut self, i: usize, signal: &str) -> Result<()> {
        let pid = self
            .replica_pid(i)?
            .with_context(|| format!("replica r{i} is not running"))?;
        Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Path::new(&format!("/proc/{pid}/exe")).exists() {
            if Instant::now() > deadline {
                bail!("replica r{i} did not exit after kill {signal}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.down.insert(i);
        Ok(())
    }

    /// `moatctl status -o json` of replica `i`.
    pub fn status_of(&self, i: usize) -> Result<serde_json::Value> {
        let text = self.status_at(Self::replica_port(i), &["-o", "json"])?;
        Ok(serde_json::from_str(&text)?)
    }

    /// The replica holding the most streams, by the fleet view.
    pub fn busiest_replica(&self) -> Result<usize> {
        let s = self.status()?;
        let mut held = vec![0usize; self.replicas];
        for n in s["nodes"].as_array().context("nodes")? {
            if let Some(i) = n["replica"]
                .as_str()
                .and_then(|r| r.strip_prefix('r'))
                .and_then(|i| i.parse::<usize>().ok())
                .filter(|i| *i < self.replicas)
            {
                held[i] += 1;
            }
        }
        Ok((0..self.replicas).max_by_key(|i| held[*i]).unwrap_or(0))
    }
}
