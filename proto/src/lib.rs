//! `moat.sync.v1`: generated gRPC types and services, and pure conversions between them and
//! the rule IR (`moat_policy::ir`). Conversions *from* the wire validate everything an
//! enforcer will act on (address lengths, protocols, enum values) and never panic.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod convert;
pub mod identity;
pub mod pki;
pub mod url;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("moat.sync.v1");
}

pub use convert::{ConvertError, FromProto, ToProto};
pub use identity::Identity;

/// Largest message either side accepts. A full snapshot of a very large node (100,000
/// addresses in its groups) is a few MiB; anything far beyond is an attack or a bug.
pub const MAX_SERVER_MESSAGE: usize = 64 * 1024 * 1024;
/// Enforcers only send small control messages.
pub const MAX_ENFORCER_MESSAGE: usize = 64 * 1024;

/// A time as the `*_unix_micros` fields carry it (0 for anything before the epoch).
pub fn unix_micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The time a `*_unix_micros` field names.
pub fn from_unix_micros(us: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(us)
}
