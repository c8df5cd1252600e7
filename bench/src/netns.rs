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

/// Runs an `nft -f -` script, in namespace `ns` or in this process's own.
pub fn nft(ns: Option<&str>, script: &str) -> Result<()> {
    use std::io::Write as _;
    use std::process::Stdio;
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "nft"]);
            c
        }
        None => Command::new("nft"),
    };
    let mut c = cmd
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    c.stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())?;
    if !c.wait()?.success() {
        bail!("nft failed (in {})", ns.unwrap_or("this namespace"));
    }
    Ok(())
}
