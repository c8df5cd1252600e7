//! The policy server: sources feed the index, the index compiles per-node snapshots.
//!
//! ```text
//!  source::file (manifest dir, watched) ──SourceEvent──► index task ──Changes──► output
//!                                                        (sync updates under a
//!                                                         std RwLock, never across .await)
//! ```
//!
//! Later stages (gRPC sync, sled history, Kubernetes sources) attach to the same seams.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod index;
pub mod source;
