//! Cluster generators shared by tests, benchmarks and fuzzing (feature `testkit`).
//!
//! * [`random`]: small clusters that exercise every feature, for the property test.
//! * [`synthetic`]: large, realistically shaped clusters, for benchmarks.

pub mod random;
pub mod synthetic;

use serde::de::DeserializeOwned;

/// Builds a Kubernetes object from JSON; generators only produce valid ones.
pub fn k8s<T: DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("generated object deserialises")
}

/// What generated objects are parsed with: every experimental feature on, since
/// [`random`] generates them (ClusterNetworkPolicy `nodes` peers).
pub const PARSE: crate::model::parse::Options = crate::model::parse::Options {
    experimental_cnp_node_peers: true,
};

/// Parses objects the way a source would (with [`PARSE`]), panicking on anything invalid
/// (generators only produce valid objects).
pub fn parse_all(objects: &[crate::model::K8sObject]) -> Vec<crate::model::Object> {
    objects
        .iter()
        .map(|o| {
            crate::model::parse::object_with(o, &PARSE)
                .expect("generated object is valid")
                .value
        })
        .collect()
}
