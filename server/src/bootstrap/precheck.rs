//! What a token says about itself, read before anyone is asked to verify it.
//!
//! A projected ServiceAccount token is a JWT; its claims can be read without its key. Nothing
//! here trusts them — TokenReview verifies the signature and the later checks decide — but a
//! token whose own claims already fail (not a JWT, another account, another audience, not
//! pod-bound, expired) can be refused without costing the API server a TokenReview. Every
//! refusal here is one the full checks would make too.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::Value;

use super::{Policy, Refusal};

/// Real tokens are about 1 KiB; anything this long is not one.
const MAX_TOKEN: usize = 8 * 1024;
/// Clock skew allowed between this server and the API server.
const SKEW: Duration = Duration::from_secs(60);

fn malformed(why: &str) -> Refusal {
    Refusal::Malformed(why.to_string())
}

/// Refuses a token whose unverified claims cannot pass the checks after TokenReview.
pub fn precheck(p: &Policy, token: &str, now: SystemTime) -> Result<(), Refusal> {
    if token.len() > MAX_TOKEN {
        return Err(malformed("longer than any ServiceAccount token"));
    }
    let mut parts = token.split('.');
    let (Some(header), Some(claims), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("not a JWT"));
    };
    if sig.is_empty() {
        return Err(malformed("unsigned"));
    }
    let json = |part: &str| -> Result<Value, Refusal> {
        let bytes = B64
            .decode(part.trim_end_matches('='))
            .map_err(|_| malformed("not base64url"))?;
        serde_json::from_slice(&bytes).map_err(|_| malformed("not JSON"))
    };
    let header = json(header)?;
    match header.get("alg").and_then(Value::as_str) {
        Some(alg) if !alg.eq_ignore_ascii_case("none") => {}
        _ => return Err(malformed("no signature algorithm")),
    }
    let c = json(claims)?;
    let want = format!(
        "system:serviceaccount:{}:{}",
        p.namespace, p.service_account
    );
    let sub = c.get("sub").and_then(Value::as_str).unwrap_or_default();
    if sub != want {
        return Err(Refusal::Account(sub.to_string()));
    }
    if c.pointer("/kubernetes.io/pod/name").is_none() {
        return Err(Refusal::Unbound);
    }
    let aud = c.get("aud");
    let for_us = match aud {
        Some(Value::String(a)) => *a == p.audience,
        Some(Value::Array(a)) => a.iter().any(|a| a.as_str() == Some(p.audience.as_str())),
        _ => false,
    };
    if !for_us {
        return Err(Refusal::Audience(p.audience.clone()));
    }
    let exp = c
        .get("exp")
        .and_then(Value::as_u64)
        .ok_or_else(|| malformed("no expiry"))?;
    if UNIX_EPOCH + Duration::from_secs(exp) + SKEW < now {
        return Err(Refusal::Expired);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy() -> Policy {
        Policy {
            audience: "moat".into(),
            namespace: "moat-system".into(),
            service_account: "moat-enforcer".into(),
            cert_ttl: Duration::from_secs(3600),
        }
    }

    fn jwt(claims: &Value) -> String {
        format!(
            "{}.{}.c2ln",
            B64.encode(br#"{"alg":"ES256","kid":"k"}"#),
            B64.encode(serde_json::to_vec(claims).unwrap())
        )
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn good() -> Value {
        json!({
            "aud": ["moat"], "exp": now() + 600, "iss": "https://kubernetes.default.svc",
            "sub": "system:serviceaccount:moat-system:moat-enforcer",
            "kubernetes.io": {"namespace": "moat-system", "pod": {"name": "e-1", "uid": "u"}},
        })
    }

    fn check(token: &str) -> Result<(), Refusal> {
        precheck(&policy(), token, SystemTime::now())
    }

    #[test]
    fn a_well_formed_token_for_us_passes() {
        assert_eq!(check(&jwt(&good())), Ok(()));
        let mut single = good();
        single["aud"] = json!("moat");
        assert_eq!(check(&jwt(&single)), Ok(()));
    }

    #[test]
    fn garbage_and_foreign_tokens_are_refused_without_a_review() {
        for garbage in ["", "x", "a.b", "a.b.c.d", "!!.??.**", &"a".repeat(9000)] {
            assert!(
                matches!(check(garbage), Err(Refusal::Malformed(_))),
                "{garbage:?}"
            );
        }
        let unsigned = jwt(&good()).rsplit_once('.').unwrap().0.to_string() + ".";
        assert!(matches!(check(&unsigned), Err(Refusal::Malformed(_))));
        let none = format!(
            "{}.{}.c2ln",
            B64.encode(br#"{"alg":"none"}"#),
            B64.encode(serde_json::to_vec(&good()).unwrap())
        );
        assert!(matches!(check(&none), Err(Refusal::Malformed(_))));
        let mut tenant = good();
        tenant["sub"] = json!("system:serviceaccount:shop:default");
        assert!(matches!(check(&jwt(&tenant)), Err(Refusal::Account(_))));
        let mut other = good();
        other["aud"] = json!(["https://kubernetes.default.svc"]);
        assert!(matches!(check(&jwt(&other)), Err(Refusal::Audience(_))));
        let mut expired = good();
        expired["exp"] = json!(now() - 3600);
        assert_eq!(check(&jwt(&expired)), Err(Refusal::Expired));
        let legacy = json!({"iss": "kubernetes/serviceaccount",
            "sub": "system:serviceaccount:moat-system:moat-enforcer"});
        assert_eq!(check(&jwt(&legacy)), Err(Refusal::Unbound));
    }

    #[test]
    fn clock_skew_is_tolerated() {
        let mut just = good();
        just["exp"] = json!(now() - 30);
        assert_eq!(check(&jwt(&just)), Ok(()));
    }
}
