//! NetworkPolicy and ClusterNetworkPolicy conformance: the case schema of
//! `shared/conformance/`, the cluster each case describes (the 9-pod x/y/z model or its own
//! `cluster:` section), a runner generic over [`Backend`], and the model backends. Dataplane
//! backends (nftables, eBPF) plug into the same runner.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod case;
pub mod cluster;
pub mod layout;
pub mod model;
mod policy;
pub mod random;
pub mod runner;

use std::path::PathBuf;

pub use case::{Case, load_dir};
pub use runner::{Backend, Factory, Options, Probe, Report, run};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Case { path: PathBuf, message: String },
    #[error("backend: {0}")]
    Backend(String),
}

/// The model mode of `moatctl conformance`: compiled snapshots and the evaluator, both.
pub fn model_backends() -> Vec<(String, Factory<'static>)> {
    vec![
        (
            "compiled".to_string(),
            Box::new(|_| Ok(Box::new(model::Compiled::default()) as Box<dyn Backend>)),
        ),
        (
            "evaluator".to_string(),
            Box::new(|_| Ok(Box::new(model::Evaluator::default()) as Box<dyn Backend>)),
        ),
    ]
}
