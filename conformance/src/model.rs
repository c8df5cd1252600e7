//! The two model backends: compiled snapshots run through the IR interpreter, and the
//! reference evaluator reading the Kubernetes objects. A case passes in model mode only if
//! both agree with the expected table.

use std::collections::BTreeMap;

use moat_policy::eval::{self, Flow};
use moat_policy::ir::sim::{Fleet, Packet};
use moat_policy::model::{self, K8sObject, Object, ObjectKey};
use moat_policy::{Event, Index};

use crate::Error;
use crate::runner::{Backend, Probe};

/// The compiler: live updates go through the incremental index, probes through the
/// snapshots every node would receive.
#[derive(Default)]
pub struct Compiled {
    index: Index,
    current: BTreeMap<ObjectKey, Object>,
}

impl Backend for Compiled {
    fn supports_cluster_section(&self) -> bool {
        true
    }

    fn apply(&mut self, objects: &[K8sObject]) -> Result<(), Error> {
        let mut next = BTreeMap::new();
        for o in objects {
            let m = model::parse::object(o)
                .map_err(|e| Error::Backend(e.to_string()))?
                .value;
            next.insert(m.key(), m);
        }
        let mut events = Vec::new();
        for (k, o) in &next {
            if self.current.get(k) != Some(o) {
                events.push(Event::Apply(o.clone()));
            }
        }
        for k in self.current.keys() {
            if !next.contains_key(k) {
                events.push(Event::Delete(k.clone()));
            }
        }
        self.index.batch(events);
        self.index.verify().map_err(Error::Backend)?;
        self.current = next;
        Ok(())
    }

    fn probe(&mut self, probes: &[Probe]) -> Result<Vec<bool>, Error> {
        let snaps: Vec<_> = self
            .index
            .nodes()
            .iter()
            .filter_map(|n| self.index.snapshot(&n.node))
            .collect();
        let fleet = Fleet::new(&snaps);
        Ok(probes
            .iter()
            .map(|p| {
                fleet.allows(&Packet {
                    src: p.from_ip,
                    dst: p.to_ip,
                    proto: p.spec.protocol.number(),
                    port: p.spec.port,
                })
            })
            .collect())
    }
}

/// The reference evaluator over the raw objects.
#[derive(Default)]
pub struct Evaluator {
    cluster: eval::Cluster,
}

impl Backend for Evaluator {
    fn supports_cluster_section(&self) -> bool {
        true
    }

    fn apply(&mut self, objects: &[K8sObject]) -> Result<(), Error> {
        self.cluster = eval::Cluster::from_objects(objects.iter().cloned());
        Ok(())
    }

    fn probe(&mut self, probes: &[Probe]) -> Result<Vec<bool>, Error> {
        Ok(probes
            .iter()
            .map(|p| {
                eval::verdict(
                    &self.cluster,
                    &Flow {
                        src: p.from_ip,
                        dst: p.to_ip,
                        proto: p.spec.protocol.number(),
                        port: p.spec.port,
                    },
                )
                .allowed
            })
            .collect())
    }
}
