//! `moatctl`: ask the policy model questions.

mod admin;
mod certs;
mod conformance;
mod degraded;
mod demo;
mod explain;
mod manifests;
mod snapshot;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "moatctl", version, about = "Moat command-line tool")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Why is a flow allowed or denied? Both directions, with the deciding policies and rules.
    Explain(explain::Args),
    /// Run NetworkPolicy and ClusterNetworkPolicy conformance cases.
    Conformance(conformance::Args),
    /// Print the snapshot a node would receive (JSON).
    Snapshot(snapshot::Args),
    /// Every node's sync status (admin API), or where one policy is enforced (`--policy`).
    Status(admin::StatusArgs),
    /// Moat end to end on network namespaces: the examples as a cluster, real server and
    /// enforcers, the reachability matrix before and after policy (needs root).
    Demo(demo::Args),
    /// Create the CA and the server, node and admin certificates.
    #[command(subcommand)]
    Certs(certs::Command),
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("moatctl: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<ExitCode> {
    match Cli::parse().command {
        Command::Explain(a) => explain::run(a),
        Command::Conformance(a) => conformance::run(a),
        Command::Snapshot(a) => snapshot::run(a),
        Command::Certs(c) => certs::run(c),
        Command::Demo(a) => demo::run(a),
        Command::Status(a) => admin::status(a),
    }
}
