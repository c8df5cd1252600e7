//! ServiceAccount tokens as the API server issues them (ES256 JWTs in the documented claim
//! layout) and TokenReview as the API server answers it.
//!
//! Claim layout, from the Kubernetes documentation ("Service account tokens"):
//! `{"aud": [...], "exp", "iat", "nbf", "iss", "jti", "sub": "system:serviceaccount:NS:SA",
//!   "kubernetes.io": {"namespace", "serviceaccount": {name, uid}, "pod": {name, uid},
//!   "node": {name, uid}, "warnafter"}}`. Legacy secret-based tokens carry
//! `iss: kubernetes/serviceaccount` and flat `kubernetes.io/serviceaccount/*` claims.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};
use serde_json::{Value, json};

use super::store::{Kind, Objects};

pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// What the API server itself accepts tokens for (`--api-audiences`).
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

pub struct Signer {
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

/// What a bound token is for.
#[derive(Clone, Debug)]
pub struct Bound {
    pub namespace: String,
    pub service_account: String,
    pub pod: String,
    pub pod_uid: String,
    pub node: String,
    pub audiences: Vec<String>,
    /// Seconds from now; negative = already expired.
    pub ttl: i64,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

impl Default for Signer {
    fn default() -> Self {
        Self::new()
    }
}

impl Signer {
    pub fn new() -> Signer {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("generate key");
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("load key");
        Signer { key, rng }
    }

    pub fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": "ES256", "kid": "moat-test", "typ": "JWT"});
        let msg = format!(
            "{}.{}",
            B64.encode(serde_json::to_vec(&header).unwrap()),
            B64.encode(serde_json::to_vec(claims).unwrap())
        );
        let sig = self.key.sign(&self.rng, msg.as_bytes()).expect("sign");
        format!("{msg}.{}", B64.encode(sig.as_ref()))
    }

    /// A projected, audience- and pod-bound token, as kubelet mounts it.
    pub fn bound(&self, b: &Bound, objects: &Objects) -> String {
        let t = now();
        let node_uid = objects
            .get(Kind::Node, "", &b.node)
            .and_then(|n| n["metadata"]["uid"].as_str())
            .unwrap_or("")
            .to_string();
        self.sign(&json!({
            "aud": b.audiences,
            "exp": t + b.ttl,
            "iat": t.min(t + b.ttl) - 1,
            "nbf": t.min(t + b.ttl) - 1,
            "iss": ISSUER,
            "jti": format!("{:032x}", rand::random::<u128>()),
            "kubernetes.io": {
                "namespace": b.namespace,
                "node": {"name": b.node, "uid": node_uid},
                "pod": {"name": b.pod, "uid": b.pod_uid},
                "serviceaccount": {"name": b.service_account, "uid": sa_uid(&b.namespace, &b.service_account)},
                "warnafter": t + b.ttl.max(0) * 4 / 5,
            },
            "sub": format!("system:serviceaccount:{}:{}", b.namespace, b.service_account),
        }))
    }

    /// A legacy, secret-based token (no audience, no expiry, bound to nothing).
    pub fn legacy(&self, namespace: &str, sa: &str) -> String {
        self.sign(&json!({
            "iss": "kubernetes/serviceaccount",
            "kubernetes.io/serviceaccount/namespace": namespace,
            "kubernetes.io/serviceaccount/secret.name": format!("{sa}-token-abcde"),
            "kubernetes.io/serviceaccount/service-account.name": sa,
            "kubernetes.io/serviceaccount/service-account.uid": sa_uid(namespace, sa),
            "sub": format!("system:serviceaccount:{namespace}:{sa}"),
        }))
    }

    fn verify(&self, token: &str) -> Result<Value, String> {
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a JWT".into());
        };
        let sig = B64.decode(s).map_err(|_| "bad signature encoding")?;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, self.key.public_key().as_ref())
            .verify(format!("{h}.{c}").as_bytes(), &sig)
            .map_err(
                |_| "invalid bearer token, square/go-jose: error in cryptographic primitive",
            )?;
        serde_json::from_slice(&B64.decode(c).map_err(|_| "bad claims encoding")?)
            .map_err(|_| "bad claims".into())
    }

    /// Answers a TokenReview the way kube-apiserver's ServiceAccount authenticators do.
    pub fn review(&self, req: &Value, objects: &Objects) -> Value {
        let spec = &req["spec"];
        let token = spec["token"].as_str().unwrap_or("");
        let wanted: Vec<String> = match spec["audiences"].as_array() {
            Some(a) if !a.is_empty() => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => vec![API_AUDIENCE.to_string()],
        };
        let status = match self.authenticate(token, &wanted, objects) {
            Ok(s) => s,
            Err(e) => json!({"user": {}, "error": e}),
        };
        json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": spec,
            "status": status,
        })
    }

    fn authenticate(
        &self,
        token: &str,
        wanted: &[String],
        objects: &Objects,
    ) -> Result<Value, String> {
        let claims = self.verify(token)?;
        let t = now();
        if claims["iss"] == "kubernetes/serviceaccount" {
            // Legacy tokens are audience-agnostic: valid only for the API server's own
            // audiences.
            if !wanted.iter().any(|a| a == API_AUDIENCE) {
                return Err(format!(
                    "[invalid bearer token, token audiences [{API_AUDIENCE}] is invalid for the target audiences {wanted:?}]"
                ));
            }
            let ns = claims["kubernetes.io/serviceaccount/namespace"]
                .as_str()
                .unwrap_or("");
            let sa = claims["kubernetes.io/serviceaccount/service-account.name"]
                .as_str()
                .unwrap_or("");
            return Ok(json!({
                "authenticated": true,
                "user": {
                    "username": format!("system:serviceaccount:{ns}:{sa}"),
                    "uid": sa_uid(ns, sa),
                    "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
                    "extra": {"authentication.kubernetes.io/credential-id": [format!("JTI=legacy-{sa}")]},
                },
                "audiences": [API_AUDIENCE],
            }));
        }
        if claims["iss"] != ISSUER {
            return Err("[invalid bearer token, token issuer is not trusted]".into());
        }
        if claims["exp"].as_i64().is_none_or(|e| e < t) {
            return Err("[invalid bearer token, service account token has expired]".into());
        }
        if claims["nbf"].as_i64().is_some_and(|n| n > t + 60) {
            return Err("[invalid bearer token, service account token is not valid yet]".into());
        }
        let aud: Vec<String> = claims["aud"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let matched: Vec<&String> = wanted.iter().filter(|w| aud.contains(w)).collect();
        if matched.is_empty() {
            return Err(format!(
                "[invalid bearer token, token audiences {aud:?} is invalid for the target audiences {wanted:?}]"
            ));
        }
        let k = &claims["kubernetes.io"];
        let ns = k["namespace"].as_str().unwrap_or("");
        let sa = k["serviceaccount"]["name"].as_str().unwrap_or("");
        let pod = k["pod"]["name"].as_str().unwrap_or("");
        let pod_uid = k["pod"]["uid"].as_str().unwrap_or("");
        // Bound tokens die with the object they are bound to.
        let live = objects.get(Kind::Pod, ns, pod);
        if live.and_then(|p| p["metadata"]["uid"].as_str()) != Some(pod_uid) {
            return Err(format!(
                "[invalid bearer token, pod \"{pod}\" not found or has a different UID]"
            ));
        }
        let mut extra = json!({
            "authentication.kubernetes.io/credential-id": [format!("JTI={}", claims["jti"].as_str().unwrap_or(""))],
            "authentication.kubernetes.io/pod-name": [pod],
            "authentication.kubernetes.io/pod-uid": [pod_uid],
        });
        if let Some(node) = k["node"]["name"].as_str() {
            extra["authentication.kubernetes.io/node-name"] = json!([node]);
            extra["authentication.kubernetes.io/node-uid"] = json!([k["node"]["uid"]]);
        }
        Ok(json!({
            "authenticated": true,
            "user": {
                "username": format!("system:serviceaccount:{ns}:{sa}"),
                "uid": k["serviceaccount"]["uid"],
                "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
                "extra": extra,
            },
            "audiences": matched,
        }))
    }
}

fn sa_uid(ns: &str, sa: &str) -> String {
    let h = fnv(&format!("{ns}/{sa}"));
    format!(
        "{:08x}-0000-4000-8000-{:012x}",
        h >> 32,
        h & 0xffff_ffff_ffff
    )
}

/// A stable small hash (FNV-1a) for made-up UIDs.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request and response bodies from the Kubernetes documentation ("Webhook token
    /// authentication"), with our own token and user.
    /// A store with pod `ns/pod`, and a 10-minute token bound to it.
    fn pod_and_token(
        s: &Signer,
        ns: &str,
        sa: &str,
        pod: &str,
        node: &str,
        aud: &str,
    ) -> (Objects, String) {
        let mut o = Objects::default();
        let p = o
            .apply(json!({"kind": "Pod", "metadata": {"name": pod, "namespace": ns}, "spec": {"nodeName": node}}))
            .unwrap();
        let b = Bound {
            namespace: ns.into(),
            service_account: sa.into(),
            pod: pod.into(),
            pod_uid: p["metadata"]["uid"].as_str().unwrap().into(),
            node: node.into(),
            audiences: vec![aud.into()],
            ttl: 600,
        };
        let token = s.bound(&b, &o);
        (o, token)
    }

    #[test]
    fn review_bodies_have_the_documented_shape() {
        let s = Signer::new();
        let (o, token) = pod_and_token(&s, "moat-system", "moat-enforcer", "p", "n1", "moat");
        let req = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": ["moat", "https://myserver.internal.example.com"]},
        });
        let r = s.review(&req, &o);
        assert_eq!(r["kind"], "TokenReview");
        assert_eq!(r["apiVersion"], "authentication.k8s.io/v1");
        let st = &r["status"];
        assert_eq!(st["authenticated"], true, "{r}");
        assert_eq!(
            st["user"]["username"],
            "system:serviceaccount:moat-system:moat-enforcer"
        );
        assert_eq!(st["audiences"], json!(["moat"]));
        assert_eq!(
            st["user"]["extra"]["authentication.kubernetes.io/pod-name"],
            json!(["p"])
        );
        assert_eq!(
            st["user"]["extra"]["authentication.kubernetes.io/node-name"],
            json!(["n1"])
        );
        // The documented failure shape: no `authenticated`, an `error`.
        let bad = s.review(
            &json!({"spec": {"token": token, "audiences": ["other"]}}),
            &o,
        );
        assert!(bad["status"]["authenticated"].is_null());
        assert!(
            bad["status"]["error"]
                .as_str()
                .unwrap()
                .contains("audiences")
        );
        // Legacy tokens only for the API server's own audience.
        let legacy = s.legacy("moat-system", "moat-enforcer");
        let r = s.review(
            &json!({"spec": {"token": legacy, "audiences": ["moat"]}}),
            &o,
        );
        assert!(r["status"]["authenticated"].is_null());
        let r = s.review(&json!({"spec": {"token": legacy}}), &o);
        assert_eq!(r["status"]["authenticated"], true);
        // A tampered token.
        let mut t = token.clone();
        t.pop();
        t.push(if token.ends_with('A') { 'B' } else { 'A' });
        let r = s.review(&json!({"spec": {"token": t, "audiences": ["moat"]}}), &o);
        assert!(r["status"]["authenticated"].is_null());
    }

    fn keys(v: &Value) -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    }

    fn golden(name: &str) -> Value {
        let path = format!("{}/src/kubeapi/golden/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// The documentation's own bodies parse as the real client types, and what this server
    /// answers and mints has their layout.
    #[test]
    fn documented_golden_bodies() {
        use k8s_openapi::api::authentication::v1::TokenReview;
        let req = golden("tokenreview-request.json");
        let ok = golden("tokenreview-response.json");
        let failed = golden("tokenreview-response-failed.json");
        for g in [&req, &ok, &failed] {
            serde_json::from_value::<TokenReview>(g.clone()).expect("documented body parses");
        }
        let s = Signer::new();
        let (o, token) = pod_and_token(
            &s,
            "kube-system",
            "coredns",
            "coredns-69cbfb9798-jv9gn",
            "127.0.0.1",
            "https://myserver.example.com",
        );
        // The minted claims have the documented layout, key for key.
        let claims: Value =
            serde_json::from_slice(&B64.decode(token.split('.').nth(1).unwrap()).unwrap()).unwrap();
        let doc = golden("serviceaccount-token-claims.json");
        assert_eq!(keys(&claims), keys(&doc));
        assert_eq!(keys(&claims["kubernetes.io"]), keys(&doc["kubernetes.io"]));
        // The documented request, with our token, gets a response of the documented shape.
        let mut req = req;
        req["spec"]["token"] = json!(token);
        let r = s.review(&req, &o);
        let parsed: TokenReview = serde_json::from_value(r.clone()).unwrap();
        assert_eq!(
            parsed.status.unwrap().audiences.unwrap(),
            ["https://myserver.example.com"]
        );
        assert_eq!(keys(&r["status"]), keys(&ok["status"]));
        assert_eq!(keys(&r["status"]["user"]), keys(&ok["status"]["user"]));
        // A failure carries `error`, as documented.
        req["spec"]["token"] = json!("not-a-token");
        let r = s.review(&req, &o);
        assert!(r["status"]["error"].is_string());
        serde_json::from_value::<TokenReview>(r).unwrap();
    }
}
