//! Prometheus metrics of the enforcer.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub struct Metrics {
    pub registry: Registry,
    pub connected: Gauge,
    pub applied_version: Gauge,
    pub apply_seconds: Histogram,
    pub applied: Counter,
    pub nacks: Counter,
    pub reconnects: Counter,
    pub received_bytes: Counter,
    pub degraded: Gauge,
    pub pod_addresses_known: Gauge,
    pub pod_addresses_unknown: Gauge,
    pub source_validation_unsupported: Gauge,
    pub local_updates: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            registry: Registry::default(),
            connected: Gauge::default(),
            applied_version: Gauge::default(),
            apply_seconds: Histogram::new(exponential_buckets(0.000_01, 4.0, 12)),
            applied: Counter::default(),
            nacks: Counter::default(),
            reconnects: Counter::default(),
            received_bytes: Counter::default(),
            degraded: Gauge::default(),
            pod_addresses_known: Gauge::default(),
            pod_addresses_unknown: Gauge::default(),
            source_validation_unsupported: Gauge::default(),
            local_updates: Counter::default(),
        };
        let mut registry = Registry::with_prefix("moat_enforcer");
        registry.register(
            "connected",
            "1 while a sync stream is open",
            m.connected.clone(),
        );
        registry.register(
            "applied_version",
            "Version enforced now",
            m.applied_version.clone(),
        );
        registry.register(
            "apply_seconds",
            "Time to verify, apply and persist one version",
            m.apply_seconds.clone(),
        );
        registry.register("applied", "Versions applied", m.applied.clone());
        registry.register("nacks", "Versions rejected", m.nacks.clone());
        registry.register(
            "reconnects",
            "Sync streams opened after the first",
            m.reconnects.clone(),
        );
        registry.register(
            "received_bytes",
            "Encoded bytes received from the server",
            m.received_bytes.clone(),
        );
        registry.register(
            "degraded",
            "1 while the enforced version has rule lists the dataplane could not hold (denied instead)",
            m.degraded.clone(),
        );
        registry.register(
            "pod_addresses_known",
            "Local pod addresses bound to the pod the enforced snapshot names",
            m.pod_addresses_known.clone(),
        );
        registry.register(
            "pod_addresses_unknown",
            "Local pod addresses no enforced snapshot names for the pod there (denied under --unknown-pods deny)",
            m.pod_addresses_unknown.clone(),
        );
        registry.register(
            "source_validation_unsupported",
            "1 while some pods can't be told apart by interface (a bridge-based CNI)",
            m.source_validation_unsupported.clone(),
        );
        registry.register(
            "local_updates",
            "Local pod tables handed to the dataplane between versions",
            m.local_updates.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry)
            .expect("writing to a String");
        s
    }
}
