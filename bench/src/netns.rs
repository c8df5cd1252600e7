//! Running a benchmark inside a private network namespace, so it never touches the host's
//! nftables: the binary re-executes itself under `ip netns exec`; the namespace goes after.

use std::process::Command;

use anyhow::{Result, bail};

const INSIDE: &str = "MOAT_BENCH_INSIDE_NETNS";

/// `Ok(true)` inside (run the body); `Ok(false)` outside, after the body ran inside.
pub fn inside() -> Result<bool> {
    if std::env::var_os(INSIDE).is_some() {
        return Ok(true);
    }
    let ns = format!("moat-bench-{}", std::process::id());
    let ok = Command::new("ip").args(["netns", "add", &ns]).status()?;
    if !ok.success() {
        bail!("cannot create netns {ns} (needs root)");
    }
    let status = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(std::env::current_exe()?)
        .args(std::env::args_os().skip(1))
        .env(INSIDE, "1")
        .status();
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    if !status?.success() {
        bail!("the benchmark failed inside {ns}");
    }
    Ok(false)
}
