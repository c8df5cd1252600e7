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

/// Parses objects the way a source would, panicking on anything invalid (generators only
/// produce valid objects).
pub fn parse_all(objects: &[crate::model::K8sObject]) -> Vec<crate::model::Object> {
    objects
        .iter()
        .map(|o| {
            crate::model::parse::object(o)
                .expect("generated object is valid")
                .value
        })
        .collect()
}
