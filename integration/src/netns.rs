//! Running a test's body inside a private network namespace, so it can change nftables
//! without touching the machine: the test re-executes its own binary (just that test) under
//! `ip netns exec`, and the namespace is deleted afterwards, also on failure.

use std::process::Command;

const INSIDE: &str = "MOAT_TEST_INSIDE_NETNS";

/// Call first in a test: `true` inside the namespace (run the body), `false` outside, after
/// the body ran inside and passed (panics with its output if it failed). `test` is the test
/// function's name.
pub fn inside(test: &str) -> bool {
    if std::env::var_os(INSIDE).is_some() {
        return true;
    }
    moat_harness::cluster::sweep();
    let ns = format!("moat-{}-lab-{test}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .expect("ip netns add");
    assert!(ok.success(), "creating netns {ns} (needs root)");
    let _guard = Deleter(ns.clone());
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(exe)
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env(INSIDE, "1")
        .output()
        .expect("re-running the test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{test} failed inside {ns}:\n{text}");
    assert!(
        text.contains("1 passed"),
        "{test} did not run inside {ns}:\n{text}"
    );
    eprintln!("{text}");
    false
}

struct Deleter(String);

impl Drop for Deleter {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
