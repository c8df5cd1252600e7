//! `moat-test-enforcer`: the real enforcer agent with the recording backend (tests only).

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;

#[derive(Parser, Debug)]
struct TestEnforcer {
    /// Where the recording backend writes `applied.json` and `events.jsonl`.
    #[arg(long)]
    record_dir: PathBuf,
    #[command(flatten)]
    common: moat_enforcer::cli::Args,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = TestEnforcer::parse();
    let backend = moat_integration::record::Recording::new(args.record_dir)?;
    moat_enforcer::cli::run(args.common, backend, "recording (tests only)").await
}
