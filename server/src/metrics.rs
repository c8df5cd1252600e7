//! Prometheus metrics of the policy server.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `snapshot`, `delta` or `current`.
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabel {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub connected: Gauge,
    pub generation: Gauge,
    pub compile_seconds: Histogram,
    pub messages: Family<KindLabel, Counter>,
    pub bytes_sent: Family<KindLabel, Counter>,
    pub acks: Counter,
    pub nacks: Counter,
    pub refused: Family<ReasonLabel, Counter>,
    /// Connections and streams the server ended, by why.
    pub disconnected: Family<ReasonLabel, Counter>,
    pub accept_errors: Counter,
    pub source_reloads: Counter,
    /// 1 while a cluster's source reaches its input, 0 while it serves a stale state.
    pub source_up: Family<ClusterLabel, Gauge>,
    pub certificates_issued: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("moat_server");
        let m = Metrics {
            connected: Gauge::default(),
            generation: Gauge::default(),
            compile_seconds: Histogram::new(exponential_buckets(0.000_01, 4.0, 12)),
            messages: Family::default(),
            bytes_sent: Family::default(),
            acks: Counter::default(),
            nacks: Counter::default(),
            refused: Family::default(),
            disconnected: Family::default(),
            accept_errors: Counter::default(),
            source_reloads: Counter::default(),
            source_up: Family::default(),
            certificates_issued: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connected_enforcers",
            "Enforcer streams open now",
            m.connected.clone(),
        );
        registry.register(
            "generation",
            "Newest version the compiler produced",
            m.generation.clone(),
        );
        registry.register(
            "compile_seconds",
            "Time to apply one source event to the index",
            m.compile_seconds.clone(),
        );
        registry.register("messages", "Messages sent to enforcers", m.messages.clone());
        registry.register(
            "sent_bytes",
            "Encoded bytes sent to enforcers",
            m.bytes_sent.clone(),
        );
        registry.register("acks", "Versions acknowledged by enforcers", m.acks.clone());
        registry.register("nacks", "Versions rejected by enforcers", m.nacks.clone());
        registry.register(
            "refused",
            "Connections and streams refused",
            m.refused.clone(),
        );
        registry.register(
            "disconnected",
            "Connections and streams the server ended (idle, replaced, superseded, ack-timeout, cert-expired)",
            m.disconnected.clone(),
        );
        registry.register(
            "accept_errors",
            "Failed accepts on the TLS listeners (out of file descriptors, …)",
            m.accept_errors.clone(),
        );
        registry.register(
            "source_reloads",
            "Times the source re-read its input after a change or a poll",
            m.source_reloads.clone(),
        );
        registry.register(
            "source_up",
            "1 while the cluster's source reaches its input; 0 while its last state is served stale",
            m.source_up.clone(),
        );
        registry.register(
            "certificates_issued",
            "Node certificates issued by bootstrap",
            m.certificates_issued.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn refused(&self, reason: &str) {
        self.refused
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }

    pub fn disconnected(&self, reason: &str) {
        self.disconnected
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }

    pub fn sent(&self, kind: &str, bytes: usize) {
        let l = KindLabel { kind: kind.into() };
        self.messages.get_or_create(&l).inc();
        self.bytes_sent.get_or_create(&l).inc_by(bytes as u64);
    }

    pub fn source_up(&self, cluster: &str) -> Gauge {
        self.source_up
            .get_or_create(&ClusterLabel {
                cluster: cluster.into(),
            })
            .clone()
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry)
            .expect("writing to a String");
        s
    }
}
