//! A child process whose output lines can be awaited, killed when dropped (also on panic).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct Proc {
    child: Child,
    out: mpsc::Receiver<String>,
    err: mpsc::Receiver<String>,
    pub seen_err: Vec<String>,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let out = lines(child.stdout.take().expect("stdout"));
        let err = lines(child.stderr.take().expect("stderr"));
        Proc {
            child,
            out,
            err,
            seen_err: Vec::new(),
        }
    }

    /// The next stdout line, or panics after `timeout` (showing stderr so far).
    pub fn line(&mut self, timeout: Duration) -> String {
        match self.out.recv_timeout(timeout) {
            Ok(l) => l,
            Err(_) => {
                self.drain_err();
                panic!(
                    "no output within {timeout:?}; stderr:\n{}",
                    self.seen_err.join("\n")
                );
            }
        }
    }

    /// Stdout lines until one satisfies `pred`; returns all of them.
    pub fn until(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let l = self.line(left.max(Duration::from_millis(1)));
            let done = pred(&l);
            got.push(l);
            if done {
                return got;
            }
        }
    }

    /// Stdout lines that arrive within `window` (for asserting that nothing happens).
    pub fn quiet_for(&mut self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut got = Vec::new();
        while let Ok(l) = self
            .out
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            got.push(l);
        }
        got
    }

    /// Stderr lines so far (accumulated).
    /// Every stdout line not consumed yet (waits briefly for lines in flight).
    pub fn stdout_so_far(&mut self) -> Vec<String> {
        let mut got = Vec::new();
        while let Ok(l) = self.out.recv_timeout(Duration::from_millis(200)) {
            got.push(l);
        }
        got
    }

    pub fn stderr(&mut self) -> String {
        self.drain_err();
        self.seen_err.join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits up to `timeout` for the process to exit; its exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until stderr contains `needle`.
    pub fn wait_stderr(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stderr().contains(needle) {
                return;
            }
            if Instant::now() > deadline {
                panic!("stderr never contained {needle:?}:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn drain_err(&mut self) {
        while let Ok(l) = self.err.try_recv() {
            self.seen_err.push(l);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines() {
            let Ok(l) = l else { return };
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    rx
}
