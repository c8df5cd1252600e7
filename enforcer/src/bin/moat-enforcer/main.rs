//! `moat-enforcer`: the node agent with a real dataplane.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use moat_enforcer_nft::NftBackend;

mod switch;
use switch::{Remover, Switching};

#[derive(Parser, Debug)]
#[command(name = "moat-enforcer", version, about = "Moat node enforcer")]
struct EnforcerArgs {
    /// Dataplane: `auto` probes the kernel and runs eBPF where it can, nftables otherwise
    /// (saying which probe failed); `ebpf` and `nft` force one.
    #[arg(long, env = "MOAT_BACKEND", default_value = "auto", value_parser = ["auto", "ebpf", "nft"])]
    backend: String,
    /// Largest table (elements) the nft backend accepts before refusing a version.
    #[arg(long, env = "MOAT_NFT_MAX_ELEMENTS", default_value_t = moat_enforcer_nft::DEFAULT_MAX_ELEMENTS)]
    nft_max_elements: usize,
    /// A total element budget for whichever dataplane runs (nft: the smaller of this and
    /// `--nft-max-elements`). A version that needs more is applied with its biggest rule
    /// lists denied, and the node reports itself degraded.
    #[arg(long, env = "MOAT_MAX_ELEMENTS")]
    max_elements: Option<usize>,
    /// A bpffs the eBPF dataplane pins its maps and links under (in `moat/<node>/`), mounted
    /// there if it is not one yet. Pins outlive the enforcer, so a restart leaves no gap.
    #[arg(long, env = "MOAT_BPFFS", default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// Remove everything Moat's dataplanes hold on this node (eBPF pins and the nft table),
    /// and exit.
    #[arg(long)]
    uninstall: bool,
    #[command(flatten)]
    common: moat_enforcer::cli::Args,
}

fn nft(args: &EnforcerArgs, probes: BTreeMap<String, String>) -> Result<NftBackend> {
    if let Err(why) = NftBackend::probe() {
        bail!("the nftables dataplane cannot run here: {why}");
    }
    std::fs::create_dir_all(&args.common.state_dir)?;
    let budget = args
        .max_elements
        .map_or(args.nft_max_elements, |m| m.min(args.nft_max_elements));
    Ok(NftBackend::open(budget, &args.common.state_dir.join("nft.lock"))?.with_probes(probes))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = EnforcerArgs::parse();
    moat_telemetry::init_logging(&args.common.log)?;
    // Before the backend probe touches anything.
    moat_enforcer::cli::check_urls(&args.common)?;
    let mode = args.backend.clone();
    if mode == "nft" {
        let backend = nft(&args, selected("nft: --backend nft".into()))?;
        let backend = Switching::new(backend, "ebpf", ebpf_leftover(&args));
        return run(args, backend, "nftables (--backend nft)").await;
    }
    match moat_enforcer_ebpf::probe::open(
        args.bpffs.clone(),
        &args.common.node,
        // The same rule the agent classifies by, so the attacher picks the program variant
        // the local pod table will expect.
        args.common.pod_interfaces.clone(),
    ) {
        Ok(mut backend) => {
            backend.note_probe("selected", format!("ebpf: --backend {mode}"));
            backend.set_max_elements(args.max_elements);
            let backend = Switching::new(backend, "nft", nft_leftover(&args));
            run(args, backend, "eBPF").await
        }
        Err(failed) if mode == "auto" => {
            tracing::warn!(
                probe = %failed.probe,
                why = %failed.why,
                "the eBPF dataplane cannot run on this node; falling back to nftables"
            );
            let summary = format!("nft: {failed}");
            let mut probes = failed.probes;
            probes.extend(selected(summary));
            let backend = nft(&args, probes)?;
            let backend = Switching::new(backend, "ebpf", ebpf_leftover(&args));
            run(args, backend, "auto: nftables (an eBPF probe failed)").await
        }
        Err(failed) => bail!("--backend ebpf: {failed}"),
    }
}

/// Removes what an eBPF run left (this node runs nft now).
fn ebpf_leftover(args: &EnforcerArgs) -> Remover {
    let (bpffs, node) = (args.bpffs.clone(), args.common.node.clone());
    Box::new(move || Ok(moat_enforcer_ebpf::remove_leftover(&bpffs, &node)?))
}

/// Removes what an nft run left (this node runs eBPF now).
fn nft_leftover(args: &EnforcerArgs) -> Remover {
    let lock = args.common.state_dir.join("nft.lock");
    Box::new(move || Ok(NftBackend::remove_leftover(&lock)?))
}

/// The `selected` probe: why this node runs its backend (shown by `moatctl status`).
fn selected(why: String) -> BTreeMap<String, String> {
    BTreeMap::from([("selected".to_string(), why)])
}

async fn run<B: moat_dataplane::Backend>(
    args: EnforcerArgs,
    mut backend: B,
    selection: &str,
) -> Result<()> {
    if args.uninstall {
        // Both dataplanes' state: the other one may be left from an earlier run.
        backend.remove_all().context("uninstall")?;
        println!(
            "removed the Moat dataplanes (this node ran {})",
            backend.name()
        );
        return Ok(());
    }
    moat_enforcer::cli::run(args.common, backend, selection).await
}
