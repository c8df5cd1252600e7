//! The dataplane seam, below the enforcer agent and above nothing but the policy model:
//!
//! ```text
//!  moat-enforcer (agent: connect, verify, persist, ack) ──► Backend (this crate)
//!                                                            ▲          ▲
//!                                    moat-enforcer-nft ──────┘          └────── moat-enforcer-ebpf
//!                                    (both build their kernel state from `plan`)
//! ```
//!
//! Pure: no kube, tonic, sled, netlink or file I/O, so both dataplanes depend on it without
//! pulling in the control plane.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod backend;
pub mod local;
pub mod plan;

pub use backend::{
    Adopted, Applied, Backend, BackendError, Capabilities, Cause, MAINTAIN_EVERY, chain, counters,
};
pub use local::LocalPods;
