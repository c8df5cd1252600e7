//! Moat's policy model: pure, synchronous, and the one piece everything else trusts.
//!
//! ```text
//!  k8s-openapi objects ─► model (validated, compact) ─► index ─► compile ─► ir::NodeSnapshot
//!          │                                                                    │
//!          └──────────────► eval (reference evaluator) ◄── compared with ── ir::sim
//! ```
//!
//! No Kubernetes client, no gRPC, no netlink, no file I/O: sources feed objects in, the sync
//! plane takes snapshots out. The evaluator shares nothing with the compiler beyond the
//! Kubernetes types, so it can be the oracle for every other test.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

mod compile;
pub mod eval;
pub mod faults;
pub mod index;
pub mod intern;
pub mod ir;
pub mod labels;
pub mod model;
pub mod selector;
mod table;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use index::{Changes, Event, Index, NodeVersion, Stats};
