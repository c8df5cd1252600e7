//! `ClusterNetworkPolicy` as the Kubernetes source reads it: a CRD that may be missing.
//!
//! The CRD is optional: many clusters have none, and one installed later must be picked up
//! without a restart. Its presence is asked of API discovery (the version's resource list),
//! which every authenticated client may read, so following it costs no extra permission
//! (watching CustomResourceDefinitions would need read access to every CRD of the cluster).

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use kube::Client;
use moat_policy::model::cnp_api as api;
use serde::{Deserialize, Deserializer};

/// The condition type Moat owns in `status.conditions`. Prefixed: the list is a map keyed
/// by type that every implementation of the API in the cluster shares, and upstream defines
/// no type of its own, so a bare `Accepted` could be another implementation's.
pub const CONDITION_TYPE: &str = "moat.io/Accepted";

/// One object as the API serves it. An object that does not even match the API types (a
/// CRD without Moat's schema lets anything in) still arrives, as `Err`, so the source can
/// refuse it by name instead of the whole watch failing on it.
#[derive(Clone, Debug)]
pub struct Cnp {
    pub metadata: ObjectMeta,
    pub object: Result<api::ClusterNetworkPolicy, String>,
}

impl<'de> Deserialize<'de> for Cnp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        let metadata: ObjectMeta = v
            .get("metadata")
            .cloned()
            .map(serde_json::from_value)
            .transpose()
            .map_err(serde::de::Error::custom)?
            .unwrap_or_default();
        let object = serde_json::from_value(v).map_err(|e| format!("not a {}: {e}", api::KIND));
        Ok(Cnp { metadata, object })
    }
}

impl kube::Resource for Cnp {
    type DynamicType = ();
    type Scope = kube::core::ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        api::KIND.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        api::GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        api::VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        api::PLURAL.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl Cnp {
    /// The condition of [`CONDITION_TYPE`] the object carries now.
    pub fn our_condition(&self) -> Option<Condition> {
        self.object
            .as_ref()
            .ok()?
            .status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == CONDITION_TYPE)
            .cloned()
    }
}

/// Whether the API server serves `clusternetworkpolicies` in `policy.networking.k8s.io/v1alpha2`.
/// `Ok(false)` is an answer (the group version or the resource is unknown), never an error.
pub async fn served(client: &Client) -> Result<bool, kube::Error> {
    let gv = format!("{}/{}", api::GROUP, api::VERSION);
    match client.list_api_group_resources(&gv).await {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == api::PLURAL)),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether a watcher error says the resource is not served (any more).
pub fn not_served(e: &kube::runtime::watcher::Error) -> bool {
    use kube::runtime::watcher::Error as W;
    match e {
        W::InitialListFailed(kube::Error::Api(s))
        | W::WatchStartFailed(kube::Error::Api(s))
        | W::WatchFailed(kube::Error::Api(s)) => s.is_not_found(),
        W::WatchError(s) => s.is_not_found(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_off_the_api_types_still_arrives_by_name() {
        let good: Cnp = serde_json::from_value(serde_json::json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "a", "generation": 3},
            "spec": {"tier": "Admin", "priority": 1, "subject": {"namespaces": {}}},
            "status": {"conditions": [{"type": CONDITION_TYPE, "status": "True", "reason": "Accepted",
                "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        }))
        .unwrap();
        assert!(good.object.is_ok());
        assert_eq!(good.our_condition().unwrap().status, "True");
        let bad: Cnp = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "b"}, "spec": {"priority": "high"}
        }))
        .unwrap();
        assert_eq!(bad.metadata.name.as_deref(), Some("b"));
        assert!(bad.object.unwrap_err().contains("ClusterNetworkPolicy"));
    }
}
