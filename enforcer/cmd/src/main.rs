//! `moat-enforcer`: the node agent with a real dataplane.

use anyhow::{Result, bail};
use clap::Parser;
use moat_enforcer_nft::NftBackend;

#[derive(Parser, Debug)]
#[command(name = "moat-enforcer", version, about = "Moat node enforcer")]
struct EnforcerArgs {
    /// Dataplane: `auto` picks the best one this kernel can run (today: nftables), `nft`
    /// forces nftables.
    #[arg(long, env = "MOAT_BACKEND", default_value = "auto", value_parser = ["auto", "ebpf", "nft"])]
    backend: String,
    /// Largest table (elements) the nft backend accepts before refusing a version.
    #[arg(long, env = "MOAT_NFT_MAX_ELEMENTS", default_value_t = moat_enforcer_nft::DEFAULT_MAX_ELEMENTS)]
    nft_max_elements: usize,
    /// Remove everything this node's dataplane holds, and exit.
    #[arg(long)]
    uninstall: bool,
    #[command(flatten)]
    common: moat_enforcer::cli::Args,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = EnforcerArgs::parse();
    let selection = match args.backend.as_str() {
        "ebpf" => {
            bail!("the eBPF dataplane is not built into this binary yet; use --backend nft or auto")
        }
        "auto" => "auto: nftables (the eBPF dataplane is not built into this binary yet)",
        _ => "nftables (--backend nft)",
    };
    if let Err(why) = NftBackend::probe() {
        bail!("the nftables dataplane cannot run here: {why}");
    }
    std::fs::create_dir_all(&args.common.state_dir)?;
    let mut backend = NftBackend::open(
        args.nft_max_elements,
        &args.common.state_dir.join("nft.lock"),
    )?;
    if args.uninstall {
        moat_enforcer::Backend::remove_all(&mut backend)?;
        println!("removed the Moat nftables table");
        return Ok(());
    }
    moat_enforcer::cli::run(args.common, backend, selection).await
}
