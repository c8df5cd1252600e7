//! The ClusterNetworkPolicy CRD's endpoints beyond list and watch: API discovery, which
//! says whether the CRD is installed, and the status subresource.

use std::collections::HashMap;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::store::{Kind, Refused};
use super::{Body, Inner, error, json_response};

const CNP_GROUP: &str = "policy.networking.k8s.io";
pub(super) const CNP_GROUP_PATH: &str = "/apis/policy.networking.k8s.io";

fn group(name: &str, version: &str) -> Value {
    let gv = json!({"groupVersion": format!("{name}/{version}"), "version": version});
    json!({"name": name, "versions": [gv], "preferredVersion": gv})
}

/// The legacy discovery documents of the API groups served here.
pub(super) fn discovery(path: &str, crd: bool) -> Option<Value> {
    let cnp_group = || group(CNP_GROUP, "v1alpha2");
    match path.trim_end_matches('/') {
        "/apis" => {
            let mut groups = vec![
                group("networking.k8s.io", "v1"),
                group("authentication.k8s.io", "v1"),
            ];
            if crd {
                groups.push(cnp_group());
            }
            Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        CNP_GROUP_PATH => {
            let mut g = cnp_group();
            g["kind"] = json!("APIGroup");
            g["apiVersion"] = json!("v1");
            Some(g)
        }
        "/apis/policy.networking.k8s.io/v1alpha2" => {
            let resource = |name: &str, singular: &str, verbs: &[&str]| {
                json!({"name": name, "singularName": singular, "namespaced": false,
                    "kind": "ClusterNetworkPolicy", "verbs": verbs})
            };
            let mut main = resource(
                "clusternetworkpolicies",
                "clusternetworkpolicy",
                &[
                    "create",
                    "delete",
                    "deletecollection",
                    "get",
                    "list",
                    "patch",
                    "update",
                    "watch",
                ],
            );
            main["shortNames"] = json!(["cnp"]);
            let status = resource(
                "clusternetworkpolicies/status",
                "",
                &["get", "patch", "update"],
            );
            Some(json!({"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": "policy.networking.k8s.io/v1alpha2",
                "resources": [main, status]}))
        }
        _ => None,
    }
}

/// `PATCH /apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies/{name}/status`.
pub(super) async fn patch_status(
    inner: Arc<Inner>,
    req: Request<Incoming>,
    q: &HashMap<String, String>,
    name: String,
) -> Response<Body> {
    if req.method() != Method::PATCH {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        );
    }
    let ctype = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let apply = match ctype.as_str() {
        "application/apply-patch+yaml" => true,
        "application/merge-patch+json" => false,
        other => {
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                &format!(
                    "the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/apply-patch+yaml ({other})"
                ),
            );
        }
    };
    if apply && q.get("fieldManager").is_none_or(|m| m.is_empty()) {
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "PATCH, application/apply-patch+yaml requests must have fieldManager set",
        );
    }
    let Ok(body) = req.into_body().collect().await else {
        return error(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
    };
    // Apply patches are YAML, of which JSON (what kube sends) is a subset.
    let Ok(patch) = serde_yaml::from_slice::<Value>(&body.to_bytes()) else {
        return error(StatusCode::BAD_REQUEST, "BadRequest", "unparseable patch");
    };
    if apply
        && (patch["kind"] != "ClusterNetworkPolicy"
            || patch["apiVersion"] != Kind::ClusterNetworkPolicy.api_version()
            || patch["metadata"]["name"] != name.as_str())
    {
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "an apply patch names the object's apiVersion, kind and metadata.name",
        );
    }
    let r = inner.objects.lock().unwrap().patch_status(
        Kind::ClusterNetworkPolicy,
        &name,
        &patch,
        apply,
    );
    match r {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(Refused::Missing) => error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("clusternetworkpolicies.policy.networking.k8s.io \"{name}\" not found"),
        ),
        Err(_) => error(
            StatusCode::CONFLICT,
            "Conflict",
            &format!(
                "Operation cannot be fulfilled on clusternetworkpolicies.policy.networking.k8s.io \"{name}\": the UID in the precondition does not match the UID in record"
            ),
        ),
    }
}
