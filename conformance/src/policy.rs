//! A case's policy manifests as Kubernetes objects: `networking.k8s.io/v1` NetworkPolicy or
//! `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicy, with the IP placeholders
//! (`{{podIP ns/pod}}`, `{{podCIDR ns/pod}}`, `{{podLargeCIDR ns/pod}}`) resolved from the
//! addresses the runner gave the pods.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use moat_policy::model::K8sObject;
use moat_policy::model::cnp_api::{self, ClusterNetworkPolicy};

/// The object of one manifest. `ip_of` gives a pod's address by `"ns/name"`.
pub fn object(
    manifest: &serde_yaml::Value,
    ip_of: &dyn Fn(&str) -> Option<IpAddr>,
) -> Result<K8sObject, String> {
    let field = |k: &str| manifest.get(k).and_then(serde_yaml::Value::as_str);
    // The kind decides the type; serde would otherwise read any manifest as either, since
    // both types ignore unknown fields.
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    let mut manifest = manifest.clone();
    substitute(&mut manifest, ip_of)?;
    match (api_version, kind) {
        (Some("networking.k8s.io/v1"), Some("NetworkPolicy")) => serde_yaml::from_value(manifest)
            .map(|p: NetworkPolicy| K8sObject::NetworkPolicy(p))
            .map_err(|e| e.to_string()),
        (Some(cnp_api::API_VERSION), Some(cnp_api::KIND)) => serde_yaml::from_value(manifest)
            .map(|p: ClusterNetworkPolicy| K8sObject::ClusterNetworkPolicy(p))
            .map_err(|e| e.to_string()),
        _ => Err(format!(
            "apiVersion {api_version:?} kind {kind:?} is neither networking.k8s.io/v1 NetworkPolicy nor {} {}",
            cnp_api::API_VERSION,
            cnp_api::KIND
        )),
    }
}

/// Resolves every placeholder in the manifest: in practice NetworkPolicy `ipBlock` and
/// ClusterNetworkPolicy egress `networks`, the only places the schema allows them.
fn substitute(
    v: &mut serde_yaml::Value,
    ip_of: &dyn Fn(&str) -> Option<IpAddr>,
) -> Result<(), String> {
    match v {
        serde_yaml::Value::String(s) if s.contains("{{") => *s = resolve(s, ip_of)?,
        serde_yaml::Value::Sequence(items) => {
            for i in items {
                substitute(i, ip_of)?;
            }
        }
        serde_yaml::Value::Mapping(m) => {
            for (_, i) in m.iter_mut() {
                substitute(i, ip_of)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn resolve(s: &str, ip_of: &dyn Fn(&str) -> Option<IpAddr>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find("}}")
            .ok_or_else(|| format!("unterminated placeholder in {s:?}"))?
            + start;
        let inner = rest[start + 2..end].trim();
        let (kind, pod) = inner
            .split_once(' ')
            .ok_or_else(|| format!("bad placeholder {inner:?}"))?;
        let ip = ip_of(pod.trim()).ok_or_else(|| format!("unknown pod {pod:?} in placeholder"))?;
        let text = match kind {
            "podIP" => ip.to_string(),
            "podCIDR" => match ip {
                IpAddr::V4(_) => format!("{ip}/32"),
                IpAddr::V6(_) => format!("{ip}/128"),
            },
            "podLargeCIDR" => match ip {
                IpAddr::V4(a) => format!("{}/4", Ipv4Addr::from(u32::from(a) & 0xf000_0000)),
                IpAddr::V6(a) => format!("{}/4", Ipv6Addr::from(u128::from(a) & (0xf << 124))),
            },
            other => return Err(format!("unknown placeholder {other:?}")),
        };
        out.push_str(&text);
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Family, Plan};

    fn xyz(plan: Plan) -> impl Fn(&str) -> Option<IpAddr> {
        move |pod| plan.ip_of(pod)
    }

    #[test]
    fn placeholders() {
        let v4 = xyz(Plan::new(Family::Ipv4));
        assert_eq!(resolve("{{podIP x/b}}", &v4).unwrap(), "10.0.0.11");
        assert_eq!(resolve("{{podCIDR z/c}}", &v4).unwrap(), "10.0.2.12/32");
        assert_eq!(resolve("{{ podLargeCIDR y/a }}", &v4).unwrap(), "0.0.0.0/4");
        let v6 = xyz(Plan::new(Family::Ipv6));
        assert_eq!(resolve("{{podCIDR x/a}}", &v6).unwrap(), "fd00::a/128");
        assert_eq!(resolve("{{podLargeCIDR x/a}}", &v6).unwrap(), "f000::/4");
        assert!(resolve("{{podIP q/a}}", &v4).is_err());
        assert!(resolve("{{podMask x/a}}", &v4).is_err());
    }

    /// CNP egress `networks` get their placeholders resolved like `ipBlock` does.
    #[test]
    fn a_cluster_network_policy_gets_its_networks_resolved() {
        let manifest: serde_yaml::Value = serde_yaml::from_str(
            "
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: n}
spec:
  tier: Admin
  priority: 3
  subject: {namespaces: {}}
  egress:
  - action: Deny
    to: [{networks: ['{{podCIDR y/c}}', '{{podLargeCIDR x/a}}']}]
",
        )
        .unwrap();
        let K8sObject::ClusterNetworkPolicy(p) =
            object(&manifest, &xyz(Plan::new(Family::Ipv6))).unwrap()
        else {
            panic!("not a ClusterNetworkPolicy");
        };
        let networks = p.spec.unwrap().egress[0].to[0].networks.clone().unwrap();
        assert_eq!(networks, ["fd00::1:c/128", "f000::/4"]);
    }

    #[test]
    fn a_manifest_of_another_kind_is_rejected() {
        for text in [
            "{apiVersion: networking.k8s.io/v1, kind: Service, metadata: {name: s}}",
            "{apiVersion: policy.networking.k8s.io/v1alpha1, kind: AdminNetworkPolicy, metadata: {name: a}}",
            "{metadata: {name: untyped}}",
        ] {
            let manifest: serde_yaml::Value = serde_yaml::from_str(text).unwrap();
            let e = object(&manifest, &xyz(Plan::new(Family::Ipv4))).unwrap_err();
            assert!(e.contains("neither"), "{e}");
        }
    }
}
