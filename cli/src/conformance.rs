//! `moatctl conformance`: run case files against the model (and, later, dataplanes).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use moat_conformance::cluster::Family;
use moat_conformance::{Options, load_dir, model_backends, run as run_cases};

#[derive(clap::Args)]
pub struct Args {
    /// Directory of case files (the schema of shared/conformance/README.md).
    #[arg(long)]
    cases: PathBuf,
    /// `model`: compiled snapshots through the IR interpreter, and the reference evaluator.
    #[arg(long, default_value = "model", value_parser = ["model"])]
    mode: String,
    /// Address families to run.
    #[arg(long, default_value = "both", value_parser = ["ipv4", "ipv6", "both"])]
    family: String,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let cases = load_dir(&args.cases)?;
    let families = match args.family.as_str() {
        "ipv4" => vec![Family::Ipv4],
        "ipv6" => vec![Family::Ipv6],
        _ => vec![Family::Ipv4, Family::Ipv6],
    };
    let mut backends = match args.mode.as_str() {
        _ => model_backends(),
    };
    let report = run_cases(
        &cases,
        &mut backends,
        &Options {
            families,
            scratch: true,
            live: true,
        },
    );
    println!("{report}");
    Ok(if report.failed() == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
