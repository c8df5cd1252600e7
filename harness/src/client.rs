//! The test's side of a pod agent: a `moat-pod` process in a namespace, driven over its
//! stdin/stdout. A handle is `Send`, so a test can probe from its own thread while the main
//! thread changes policy or kills enforcers.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::agent::{ProbeReq, Request, Response, StreamOp};
use crate::cluster::binary;
use crate::spoof::SpoofReq;

pub struct AgentHandle {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    netns: String,
}

fn ports(v: &[u16]) -> String {
    v.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
}

impl AgentHandle {
    /// Starts an agent in `netns` serving these ports (none: a prober only).
    pub fn spawn(netns: &str, tcp: &[u16], udp: &[u16], sctp: &[u16]) -> Result<AgentHandle> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(binary("moat-pod")?)
            .args([
                "--tcp",
                &ports(tcp),
                "--udp",
                &ports(udp),
                "--sctp",
                &ports(sctp),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting moat-pod")?;
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut ready = String::new();
        stdout.read_line(&mut ready)?;
        if !ready.contains("ready") {
            bail!("agent in {netns} did not start: {ready:?}");
        }
        Ok(AgentHandle {
            child,
            stdin,
            stdout,
            netns: netns.to_string(),
        })
    }

    /// Sends a request without waiting (so many agents can work at once).
    pub fn send(&mut self, req: &Request) -> Result<()> {
        let line = serde_json::to_string(req)?;
        self.stdin.write_all(line.as_bytes())?;
        self.stdin.write_all(b"\n")?;
        self.stdin.flush()?;
        Ok(())
    }

    /// The answer to the request sent before.
    pub fn receive(&mut self, req: &Request) -> Result<Response> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let r: Response = serde_json::from_str(&line)
            .with_context(|| format!("agent in {} answered {line:?}", self.netns))?;
        if r.results.len() != req.probes.len() || r.streams.len() != req.streams.len() {
            bail!("agent in {} answered {line:?} to {req:?}", self.netns);
        }
        Ok(r)
    }

    pub fn probe(
        &mut self,
        probes: Vec<ProbeReq>,
        timeout: Duration,
        retries: u32,
    ) -> Result<Vec<bool>> {
        let req = Request {
            probes,
            timeout_ms: timeout.as_millis() as u64,
            retries,
            ..Request::default()
        };
        self.send(&req)?;
        Ok(self.receive(&req)?.results)
    }

    /// Sends packets with forged sources; whether each could be sent.
    pub fn spoof(&mut self, reqs: Vec<SpoofReq>) -> Result<Vec<bool>> {
        let req = Request {
            spoof: reqs,
            ..Request::default()
        };
        self.send(&req)?;
        Ok(self.receive(&req)?.spoofed)
    }

    /// Whether this agent received each of these forged packets.
    pub fn heard(&mut self, reqs: Vec<SpoofReq>) -> Result<Vec<bool>> {
        let req = Request {
            heard: reqs,
            ..Request::default()
        };
        self.send(&req)?;
        Ok(self.receive(&req)?.heard)
    }

    pub fn streams(&mut self, ops: Vec<StreamOp>, timeout: Duration) -> Result<Vec<bool>> {
        let req = Request {
            streams: ops,
            timeout_ms: timeout.as_millis() as u64,
            ..Request::default()
        };
        self.send(&req)?;
        Ok(self.receive(&req)?.streams)
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
