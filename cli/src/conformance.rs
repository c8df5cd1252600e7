//! `moatctl conformance`: run case files against the model or a dataplane on real packets.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use moat_conformance::cluster::Family;
use moat_conformance::layout::Layout;
use moat_conformance::{Backend, Factory, Options, load_dir, model_backends, run as run_cases};
use moat_harness::container::{Containers, Seccomp};
use moat_harness::packets::PacketBackend;

#[derive(clap::Args)]
pub struct Args {
    /// Directory of case files (the schema of shared/conformance/README.md).
    #[arg(long)]
    cases: PathBuf,
    /// The model (compiled snapshots and the reference evaluator), when no --backend is given.
    #[arg(long, value_enum, default_value = "model")]
    mode: Mode,
    /// Enforce with this dataplane on a netns cluster with real packets (needs root);
    /// `mixed` runs eBPF and nft on alternate nodes.
    #[arg(long, value_parser = ["nft", "ebpf", "mixed"])]
    backend: Option<String>,
    /// Address families to run.
    #[arg(long, default_value = "both", value_parser = ["ipv4", "ipv6", "both"])]
    family: String,
    /// Run the server and enforcers as containers of this image (`./scripts/image.sh`),
    /// under the Helm chart's security context, as `moatctl demo --image` does.
    #[arg(long, requires = "backend")]
    image: Option<String>,
    /// With --image: the seccomp profiles (see `moatctl demo --help`).
    #[arg(long, default_value = "containerd", value_parser = ["podman", "containerd", "chart"])]
    seccomp: String,
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
    let report = match args.backend {
        None => {
            let Mode::Model = args.mode;
            let opts = Options {
                families,
                plan_id: 0,
                scratch: true,
                live: true,
            };
            run_cases(&cases, &mut model_backends(), &opts)
        }
        Some(backend) => {
            // Per family, one netns cluster per layout (x/y/z, or a `cluster:` section), every
            // case applied to its layout's cluster as a live update; the first case's is built
            // first, so a run of `cluster:` cases builds no x/y/z cluster it never uses.
            let slot = moat_harness::cluster::slot()?;
            let first = match cases.first() {
                Some(c) => Layout::of(c)?,
                None => moat_conformance::layout::xyz(),
            };
            let b = backend.clone();
            let image = args.image.clone();
            let seccomp: Seccomp = args.seccomp.parse()?;
            let factory: Factory<'_> = Box::new(move |plan| {
                let containers = match &image {
                    Some(i) => Some(
                        Containers::new(i, seccomp)
                            .map_err(|e| moat_conformance::Error::Backend(format!("{e:#}")))?,
                    ),
                    None => None,
                };
                let backend = PacketBackend::start_for(plan, &b, containers, &first)?;
                Ok(Box::new(backend) as Box<dyn Backend>)
            });
            let opts = Options {
                families,
                plan_id: slot.id,
                scratch: false,
                live: true,
            };
            run_cases(&cases, &mut [(backend, factory)], &opts)
        }
    };
    println!("{report}");
    Ok(if report.failed() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
