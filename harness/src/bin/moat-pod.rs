//! `moat-pod`: the agent inside a pod's network namespace (see `moat_harness::agent`).

fn ports(s: &str) -> Vec<u16> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().expect("port"))
        .collect()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str, default: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| default.to_string())
    };
    moat_harness::agent::serve(
        ports(&get("--tcp", "80,81")),
        ports(&get("--udp", "80,81")),
        ports(&get("--sctp", "80,81")),
    )
    .await
}
