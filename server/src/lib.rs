//! The policy server: sources feed the index, the index compiles per-node snapshots, the
//! sync service streams them to node enforcers over mutually authenticated TLS.
//!
//! ```text
//!  source::file ──SourceEvent──► index task ──► hub::ClusterState ──watch per node──► sync (gRPC)
//!                                 (sync updates,       │   ▲                              │
//!                                  std RwLock)         │   └── delta bases ◄── store ◄── Ack
//!                                                      └──► status::Fleet ◄──────────────┘
//! ```
//!
//! `main.rs` is the one place that wires them.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod admin;
pub mod bootstrap;
pub mod cost;
pub mod degraded;
pub mod ha;
pub mod hub;
pub mod index;
pub mod listen;
pub mod metrics;
pub mod prune;
pub mod source;
pub mod status;
pub mod store;
pub mod streams;
pub mod sync;
pub mod throttle;
pub mod tls;
