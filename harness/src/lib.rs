//! The test bed every dataplane is judged on: nodes and pods as network namespaces joined by
//! a routed fabric, with real TCP, UDP and SCTP packets.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod agent;
pub mod sctp;
pub mod cluster;

pub use cluster::{Cluster, PodSpec, Spec};
