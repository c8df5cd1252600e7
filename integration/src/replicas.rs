//! Several `moat-server` replicas on one bed, each reaching the test API server through its
//! own [`Proxy`] (so a test can partition one), with its own ports and state directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::bed::{Bed, WAIT, free_port, metric, moatctl, scrape};
use crate::binary;
use crate::kubeapi::ApiServer;
use crate::process::Proc;
use crate::proxy::Proxy;
use moat_harness::moat::tls_args;

pub struct Replica {
    pub name: String,
    pub listen: SocketAddr,
    pub health: SocketAddr,
    pub metrics: SocketAddr,
    pub proxy: Proxy,
    kubeconfig: PathBuf,
    pub proc: Option<Proc>,
}

pub struct Replicas {
    pub all: Vec<Replica>,
    certs: PathBuf,
    state: PathBuf,
    /// More arguments for every replica's next start.
    pub args: Vec<String>,
}

impl Replicas {
    /// `n` replicas of `bed`'s server, none started yet.
    pub fn new(bed: &Bed, api: &ApiServer, n: usize) -> Replicas {
        let all = (0..n)
            .map(|i| {
                let proxy = Proxy::start(api.addr);
                let kubeconfig = bed.path(&format!("replica-{i}.kubeconfig"));
                api.kubeconfig(&kubeconfig, "default");
                let text = std::fs::read_to_string(&kubeconfig).expect("kubeconfig");
                let text = text.replace(&api.addr.to_string(), &proxy.addr.to_string());
                std::fs::write(&kubeconfig, text).expect("kubeconfig");
                Replica {
                    name: format!("r{i}"),
                    listen: free_port(),
                    health: free_port(),
                    metrics: free_port(),
                    proxy,
                    kubeconfig,
                    proc: None,
                }
            })
            .collect();
        Replicas {
            all,
            certs: bed.certs(),
            state: bed.path("state"),
            args: Vec::new(),
        }
    }

    /// Every replica's URL, for the enforcers' `--server`.
    pub fn urls(&self) -> Vec<String> {
        self.all
            .iter()
            .map(|r| format!("https://{}", r.listen))
            .collect()
    }

    /// Starts replica `i` and waits for its first full sync.
    pub fn start(&mut self, i: usize) {
        let r = &mut self.all[i];
        let mut cmd = Command::new(binary("moat-server"));
        cmd.arg("--source")
            .arg(format!("kube:{}", r.kubeconfig.display()))
            .args(["--tls-reload-seconds", "1"])
            .arg("--listen")
            .arg(r.listen.to_string())
            .arg("--health-addr")
            .arg(r.health.to_string())
            .arg("--metrics-addr")
            .arg(r.metrics.to_string())
            .args(tls_args(&self.certs, "server"))
            .arg("--state-dir")
            .arg(self.state.join(format!("replica-{}", r.name)))
            .args(["--ha-cluster", "default", "--replica", &r.name])
            .args(["--ha-stale-after", "3s", "--ha-drain", "2s"])
            .args(&self.args)
            .env("MOAT_LOG", "info,moat_server=debug")
            .env("NO_COLOR", "1");
        let mut p = Proc::spawn(&mut cmd);
        p.until(WAIT, |l| l.starts_with("synced "));
        r.proc = Some(p);
    }

    pub fn start_all(&mut self) {
        for i in 0..self.all.len() {
            self.start(i);
        }
    }

    /// SIGKILL: no drain, no shutdown path.
    pub fn kill(&mut self, i: usize) {
        self.all[i].proc = None;
    }

    /// SIGTERM, and waits for the exit (the drain included): its status and its stderr.
    pub fn terminate(&mut self, i: usize) -> (std::process::ExitStatus, String) {
        let mut p = self.all[i].proc.take().expect("running");
        let status = p
            .terminate(WAIT)
            .expect("the replica exits after its drain");
        // What it wrote on the way out is read once the pipe is drained.
        std::thread::sleep(Duration::from_millis(200));
        (status, p.stderr())
    }

    /// Enforcer streams replica `i` holds now.
    pub fn connected(&self, i: usize) -> usize {
        if self.all[i].proc.is_none() {
            return 0;
        }
        metric(
            &scrape(self.all[i].metrics),
            "moat_server_connected_enforcers",
        ) as usize
    }

    /// The running replica holding the most streams.
    pub fn busiest(&self) -> usize {
        (0..self.all.len())
            .max_by_key(|i| self.connected(*i))
            .expect("replicas")
    }

    /// `moatctl status -o json` of replica `i`.
    pub fn status(&self, i: usize) -> Value {
        let mut args = vec![
            "status".to_string(),
            "-o".into(),
            "json".into(),
            "--server".into(),
            format!("https://{}", self.all[i].listen),
            "--tls-server-name".into(),
            "localhost".into(),
        ];
        args.extend(tls_args(&self.certs, "admin-ops"));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = moatctl(&a);
        assert_eq!(code, 0, "moatctl status on {}: {err}", self.all[i].name);
        serde_json::from_str(&out).expect("status json")
    }

    /// The newest digest of every node, as replica `i` compiles it.
    pub fn latest(&self, i: usize) -> std::collections::BTreeMap<String, String> {
        self.status(i)["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|n| {
                (
                    n["node"].as_str().unwrap_or_default().to_string(),
                    n["latest_digest"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    pub fn stderr(&mut self, i: usize) -> String {
        self.all[i]
            .proc
            .as_mut()
            .map(|p| p.stderr())
            .unwrap_or_default()
    }
}

/// Waits a little for something that should already be true, for a clearer failure.
pub const SETTLE: Duration = Duration::from_secs(30);
