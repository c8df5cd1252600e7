//! The dataplane together with what its local pod table is made of: the bindings (persisted),
//! the snapshot it enforces and the table it holds. One lock guards them all, so a version
//! and a topology change can't interleave: whichever comes second reconciles against the
//! first one's result.
//!
//! ```text
//!  topology (host::Watcher) ─┐
//!  bindings (sled) ──────────┼─► Bindings::reconcile (on a clone) ─► backend ─► commit + persist
//!  snapshot being applied ───┘                                      (adopt / apply / set_local)
//! ```
//!
//! Persisting: bindings are what makes an address that moved while the enforcer was down
//! unknown after the restart, so a binding the dataplane is about to rely on is written before
//! the backend call (together with the ones it may replace: a crash in between must never
//! leave fewer bindings than the dataplane enforced), and the exact set once it succeeded.

use std::sync::Arc;

use moat_dataplane::local::{Bindings, Interfaces, PodInterfaces, Topology, UnknownPods};
use moat_dataplane::plan::Degraded;
use moat_dataplane::{Applied, Backend, BackendError, LocalPods};
use moat_policy::ir::NodeSnapshot;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::state::LocalState;

/// `--pod-interfaces` and `--unknown-pods`.
#[derive(Clone, Debug)]
pub struct LocalConfig {
    pub pod_interfaces: PodInterfaces,
    pub unknown_pods: UnknownPods,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    State(#[from] crate::state::Error),
}

pub struct Dataplane<B> {
    pub backend: B,
    cfg: LocalConfig,
    /// The bindings the dataplane's table was built from (and sled holds).
    bindings: Bindings,
    /// What the backend enforces, if the agent can name it.
    enforced: Option<Arc<NodeSnapshot>>,
    /// The local pod table the backend holds.
    local: Option<LocalPods>,
    /// What the enforced version could not hold.
    degraded: Vec<Degraded>,
}

/// Bindings `new` adds to `old`, with `old`'s for every address `new` forgot: what must be
/// durable before a backend call that may enforce `new`.
fn ahead(old: &Bindings, new: &Bindings) -> Option<Bindings> {
    if new
        .by_addr
        .iter()
        .all(|(a, b)| old.by_addr.get(a) == Some(b))
    {
        return None;
    }
    let mut u = old.clone();
    u.by_addr.extend(new.by_addr.iter().map(|(a, b)| (*a, *b)));
    Some(u)
}

impl<B: Backend> Dataplane<B> {
    pub fn new(backend: B, cfg: LocalConfig) -> Self {
        Dataplane {
            backend,
            cfg,
            bindings: Bindings::default(),
            enforced: None,
            local: None,
            degraded: Vec::new(),
        }
    }

    pub fn local(&self) -> Option<&LocalPods> {
        self.local.as_ref()
    }

    pub fn degraded(&self) -> &[Degraded] {
        &self.degraded
    }

    fn reconcile(&self, topo: &Topology, snap: Option<&NodeSnapshot>) -> (Bindings, LocalPods) {
        let ifaces = Interfaces::classify(topo, &self.cfg.pod_interfaces);
        let mut b = self.bindings.clone();
        let local = b.reconcile(&ifaces, snap, self.cfg.unknown_pods);
        (b, local)
    }

    fn hold(&mut self, local: LocalPods, bindings: Bindings, metrics: &Metrics) {
        let (known, unknown) = local.counts();
        metrics.pod_addresses_known.set(known as i64);
        metrics.pod_addresses_unknown.set(unknown as i64);
        metrics
            .source_validation_unsupported
            .set(local.unsupported.is_some() as i64);
        let was = self.local.as_ref().and_then(|l| l.unsupported.clone());
        if local.unsupported != was {
            match &local.unsupported {
                Some(why) => warn!(why, "source validation is not enforced on every pod"),
                None => info!("source validation is enforced on every pod again"),
            }
        }
        self.local = Some(local);
        self.bindings = bindings;
    }

    /// Takes over what a previous run left, with the node's pods bound against `last`
    /// (`bindings`: the ones persisted).
    pub fn adopt(
        &mut self,
        bindings: Bindings,
        topo: &Topology,
        last: Option<Arc<NodeSnapshot>>,
        state: &LocalState,
        metrics: &Metrics,
    ) -> Result<moat_dataplane::Adopted, Error> {
        self.bindings = bindings;
        let (b, local) = self.reconcile(topo, last.as_deref());
        if let Some(u) = ahead(&self.bindings, &b) {
            state.save_bindings(&u)?;
        }
        let adopted = self.backend.adopt(last.as_deref(), &local)?;
        if adopted == moat_dataplane::Adopted::Enforcing {
            state.save_bindings(&b)?;
            self.enforced = last;
            // What the persisted version could not hold when it was applied: still reported.
            self.degraded = state.load_degraded()?;
            metrics.degraded.set(!self.degraded.is_empty() as i64);
            self.hold(local, b, metrics);
        }
        Ok(adopted)
    }

    /// Applies a version (`f` is the backend call), persists it, and keeps what it
    /// enforces. The local pod table is bound against `snap` on the newest topology.
    pub fn apply(
        &mut self,
        topo: &Topology,
        snap: Arc<NodeSnapshot>,
        state: &LocalState,
        metrics: &Metrics,
        f: impl FnOnce(&mut B, &LocalPods) -> Result<Applied, BackendError>,
    ) -> Result<Applied, (bool, String)> {
        let (b, local) = self.reconcile(topo, Some(&snap));
        if let Some(u) = ahead(&self.bindings, &b) {
            state
                .save_bindings(&u)
                .map_err(|e| (false, format!("persisting pod bindings: {e}")))?;
        }
        let applied =
            f(&mut self.backend, &local).map_err(|e| (false, moat_dataplane::chain(&e)))?;
        self.enforced = Some(snap.clone());
        self.degraded = applied.degraded.clone();
        self.hold(local, b, metrics);
        metrics.degraded.set(!self.degraded.is_empty() as i64);
        // One flush for all: the bindings and degradations ride along with the snapshot.
        state
            .stage_bindings(&self.bindings)
            .and_then(|()| state.stage_degraded(&self.degraded))
            .and_then(|()| state.save(&snap))
            .map_err(|e| (true, e.to_string()))?;
        Ok(applied)
    }

    /// The same content under a new version number.
    pub fn renamed(&mut self, snap: Arc<NodeSnapshot>) {
        self.enforced = Some(snap);
    }

    /// Brings the dataplane's local pod table up to date with `topo`; the new table if it
    /// changed. Nothing happens before a version the agent can name is enforced: the first
    /// one carries the table.
    pub fn refresh(
        &mut self,
        topo: &Topology,
        state: &LocalState,
        metrics: &Metrics,
    ) -> Result<Option<LocalPods>, Error> {
        let Some(snap) = self.enforced.clone() else {
            return Ok(None);
        };
        let (b, local) = self.reconcile(topo, Some(&snap));
        if self.local.as_ref() == Some(&local) {
            if b != self.bindings {
                state.save_bindings(&b)?;
                self.bindings = b;
            }
            return Ok(None);
        }
        if let Some(u) = ahead(&self.bindings, &b) {
            state.save_bindings(&u)?;
        }
        self.backend.set_local(&local)?;
        if b != self.bindings {
            state.save_bindings(&b)?;
        }
        self.hold(local.clone(), b, metrics);
        Ok(Some(local))
    }
}

#[cfg(test)]
mod tests;
