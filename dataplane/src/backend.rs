//! The dataplane seam. A backend turns snapshots into kernel state; the agent handles
//! everything else (connection, verification, persistence, acknowledgement).

use std::collections::BTreeMap;

use moat_policy::ir::NodeSnapshot;
use moat_policy::ir::delta::Delta;

use crate::local::LocalPods;
use crate::plan::Degraded;

/// What this node's kernel offers, reported to the server and shown in `moatctl status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub kernel: String,
    /// Probe name → "ok" or why not.
    pub probes: BTreeMap<String, String>,
}

impl Capabilities {
    /// This machine's kernel release with the backend's probe results.
    pub fn of_this_kernel(probes: BTreeMap<String, String>) -> Self {
        Capabilities {
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            probes,
        }
    }
}

/// Any error a dataplane can carry as its cause.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a backend call failed. Every variant keeps its cause as a `source`, so the agent can
/// report the whole chain (see [`chain`]) and callers can match on the kind.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The version can't be enforced as given; nothing of it was written.
    #[error("version {version} refused")]
    Refused {
        version: u64,
        #[source]
        cause: Cause,
    },
    /// A kernel or system operation failed; the previous version is still in force.
    #[error("{op}")]
    Failed {
        op: String,
        #[source]
        cause: Cause,
    },
}

impl BackendError {
    pub fn refused(version: u64, cause: impl Into<Cause>) -> Self {
        BackendError::Refused {
            version,
            cause: cause.into(),
        }
    }

    pub fn failed(op: impl Into<String>, cause: impl Into<Cause>) -> Self {
        BackendError::Failed {
            op: op.into(),
            cause: cause.into(),
        }
    }
}

/// An error and all its sources, as one line: `op: cause: cause's cause`.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// What `adopt` found in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adopted {
    /// The persisted snapshot is what is enforced now (reconciled if needed).
    Enforcing,
    /// The kernel enforces rules the agent holds no content for (e.g. a newer version applied
    /// just before a crash). They stay in force; the agent must ask for a full snapshot.
    Unknown,
    /// Nothing is enforced.
    Nothing,
}

/// What an applied version could not hold: the rule lists denied in its place (empty when
/// the version was applied exactly). The node reports itself `degraded` while non-empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub degraded: Vec<Degraded>,
}

/// Counter names both dataplanes report (in [`Backend::counters`]).
pub mod counters {
    /// Packets from a pod interface whose source is not an address routed to that interface.
    pub const SPOOFED: &str = "spoofed_packets";
    /// Packets from or to a local pod address the enforced snapshot does not name (yet).
    pub const UNKNOWN_POD: &str = "unknown_pod_packets";
    /// Forwarded packets through an interface the dataplane has not classified yet.
    pub const UNCLASSIFIED: &str = "unclassified_interface_packets";
}

/// A dataplane. Every method is all-or-nothing: after an error the previously applied
/// version (and local pod table) is still fully in force.
///
/// Every method that takes [`LocalPods`] enforces it together with the rules, atomically:
/// which local addresses are known (and bound to which interface) changes in the same step
/// as the rules that name them.
pub trait Backend: Send + 'static {
    fn name(&self) -> &str;
    fn capabilities(&self) -> Capabilities;
    /// Takes over whatever a previous run left in the kernel, given the snapshot the node
    /// persisted last (if any), without ever removing enforcement first. Called once, before
    /// anything else. `local` is the node's pods as they are now, bound against `last`.
    fn adopt(
        &mut self,
        last: Option<&NodeSnapshot>,
        local: &LocalPods,
    ) -> Result<Adopted, BackendError>;
    /// Replaces whatever is enforced with `snap`, atomically.
    fn apply_full(
        &mut self,
        snap: &NodeSnapshot,
        local: &LocalPods,
    ) -> Result<Applied, BackendError>;
    /// Moves from `old` to `new`; `delta` is the difference, for backends that update in place.
    fn apply_delta(
        &mut self,
        old: &NodeSnapshot,
        delta: &Delta,
        new: &NodeSnapshot,
        local: &LocalPods,
    ) -> Result<Applied, BackendError>;
    /// The node's pods changed between versions (an interface or a route came or went, an
    /// address was bound or became unknown).
    fn set_local(&mut self, local: &LocalPods) -> Result<(), BackendError>;
    /// Dataplane counters (packets allowed, denied, …), reported to the server.
    fn counters(&self) -> BTreeMap<String, u64>;
    /// Removes everything this backend installed (uninstall).
    fn remove_all(&mut self) -> Result<(), BackendError>;
    /// Upkeep between versions, called every [`MAINTAIN_EVERY`] once adopted (e.g. putting
    /// the programs on an interface that just appeared). Must return quickly.
    fn maintain(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
}

/// How often the agent calls [`Backend::maintain`].
pub const MAINTAIN_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
