//! `moatctl snapshot`: what one node would receive, compiled from manifests.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, anyhow};
use moat_policy::Index;

use crate::manifests;

#[derive(clap::Args)]
pub struct Args {
    /// Directory of Kubernetes manifests (searched recursively).
    #[arg(long, env = "MOAT_MANIFESTS")]
    manifests: PathBuf,
    /// Node name (a Node object in the manifests).
    #[arg(long)]
    node: String,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let set = manifests::load(&args.manifests)?;
    let index = Index::build(set.objects().cloned());
    let snap = index.snapshot(&args.node).ok_or_else(|| {
        let known: Vec<String> = index
            .nodes()
            .into_iter()
            .map(|n| n.node.to_string())
            .collect();
        anyhow!("no node {:?} (nodes: {})", args.node, known.join(", "))
    })?;
    println!("{}", serde_json::to_string_pretty(&snap)?);
    Ok(ExitCode::SUCCESS)
}
