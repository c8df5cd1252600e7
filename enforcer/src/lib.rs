//! The node enforcer: receives this node's snapshots from the policy server, applies them
//! through a dataplane [`Backend`](moat_dataplane::Backend), acknowledges each version, and keeps enforcing the last
//! good one through restarts and outages.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod agent;
pub mod bootstrap;
pub mod cli;
pub mod host;
pub mod metrics;
pub mod pods;
pub mod servers;
pub mod state;
