//! The test bed every dataplane is judged on: nodes and pods as network namespaces joined by
//! a routed fabric, with real TCP, UDP, SCTP and ICMP packets.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod agent;
pub mod client;
pub mod cluster;
pub mod container;
pub mod icmp;
pub mod raw;
pub mod sctp;
pub mod spoof;

pub use cluster::{Cluster, PodSpec, Spec};
pub mod moat;
pub mod packets;
