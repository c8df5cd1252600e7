//! A node that changes dataplane (a kernel upgrade makes eBPF possible, an operator forces
//! nft) must not keep the other one's rules: stale rules would deny what policy now allows.
//! They are removed only once the new dataplane enforces, so the switch leaves no gap.

use std::collections::BTreeMap;

use moat_dataplane::{Adopted, Applied, Backend, BackendError, Capabilities, LocalPods};
use moat_policy::ir::NodeSnapshot;
use moat_policy::ir::delta::Delta;

/// Removes the other dataplane's state; `Ok(true)` if there was some.
pub type Remover = Box<dyn FnMut() -> anyhow::Result<bool> + Send>;

/// `inner`, removing what the other dataplane (`other`) left once `inner` enforces.
pub struct Switching<B> {
    inner: B,
    other: &'static str,
    remove: Option<Remover>,
}

impl<B: Backend> Switching<B> {
    pub fn new(inner: B, other: &'static str, remove: Remover) -> Self {
        Switching {
            inner,
            other,
            remove: Some(remove),
        }
    }

    /// Called whenever `inner` enforces a version; the removal is retried until it succeeds.
    fn enforcing(&mut self) {
        let Some(remove) = self.remove.as_mut() else {
            return;
        };
        match remove() {
            Ok(found) => {
                if found {
                    tracing::info!(
                        dataplane = self.other,
                        "removed the rules a previous run left in the other dataplane"
                    );
                }
                self.remove = None;
            }
            Err(e) => tracing::warn!(
                dataplane = self.other,
                error = %e,
                "could not remove the other dataplane's rules; retrying with the next version"
            ),
        }
    }
}

impl<B: Backend> Backend for Switching<B> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn adopt(
        &mut self,
        last: Option<&NodeSnapshot>,
        local: &LocalPods,
    ) -> Result<Adopted, BackendError> {
        let adopted = self.inner.adopt(last, local)?;
        if adopted == Adopted::Enforcing {
            self.enforcing();
        }
        Ok(adopted)
    }

    fn apply_full(
        &mut self,
        snap: &NodeSnapshot,
        local: &LocalPods,
    ) -> Result<Applied, BackendError> {
        let applied = self.inner.apply_full(snap, local)?;
        self.enforcing();
        Ok(applied)
    }

    fn apply_delta(
        &mut self,
        old: &NodeSnapshot,
        delta: &Delta,
        new: &NodeSnapshot,
        local: &LocalPods,
    ) -> Result<Applied, BackendError> {
        let applied = self.inner.apply_delta(old, delta, new, local)?;
        self.enforcing();
        Ok(applied)
    }

    fn set_local(&mut self, local: &LocalPods) -> Result<(), BackendError> {
        self.inner.set_local(local)
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        self.inner.counters()
    }

    fn maintain(&mut self) -> Result<(), BackendError> {
        self.inner.maintain()
    }

    fn remove_all(&mut self) -> Result<(), BackendError> {
        self.inner.remove_all()?;
        if let Some(remove) = self.remove.as_mut() {
            remove().map_err(|e| {
                BackendError::failed(format!("removing the {} dataplane", self.other), e)
            })?;
        }
        Ok(())
    }
}
