//! `moat-enforcer`: the node agent with a real dataplane.

use anyhow::{Result, bail};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "moat-enforcer", version, about = "Moat node enforcer")]
struct EnforcerArgs {
    /// Dataplane: `auto` probes the kernel for eBPF and falls back to nftables.
    #[arg(long, env = "MOAT_BACKEND", default_value = "auto", value_parser = ["auto", "ebpf", "nft"])]
    backend: String,
    #[command(flatten)]
    common: moat_enforcer::cli::Args,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = EnforcerArgs::parse();
    // The dataplanes are their own components (enforcer-nft, enforcer-ebpf); until one is
    // linked in, refuse to run rather than pretend to enforce.
    bail!(
        "backend {:?} is not built into this binary yet: the nftables and eBPF dataplanes are \
         separate components (see enforcer-nft/ and enforcer-ebpf/); nothing was changed on this node (node {})",
        args.backend,
        args.common.node
    )
}
