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
    /// What enforces the cases.
    #[arg(long, value_enum, default_value = "model")]
    mode: Mode,
    /// Address families to run.
    #[arg(long, default_value = "both", value_parser = ["ipv4", "ipv6", "both"])]
    family: String,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Mode {
    /// Compiled snapshots through the IR interpreter, and the reference evaluator; a case
    /// passes only if both match its table.
    Model,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let cases = load_dir(&args.cases)?;
    let families = match args.family.as_str() {
        "ipv4" => vec![Family::Ipv4],
        "ipv6" => vec![Family::Ipv6],
        _ => vec![Family::Ipv4, Family::Ipv6],
    };
    let mut backends = match args.mode {
        Mode::Model => model_backends(),
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
    Ok(if report.failed() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
