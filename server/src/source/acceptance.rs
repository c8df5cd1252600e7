//! Whether each policy the source delivered was taken into the model, and if not, why.
//!
//! A refused object is never an error of the source (the rest keeps flowing) and never
//! changes what nodes enforce (its last valid version stays), so without this record the
//! only trace of a refusal would be a log line. `moatctl status --policy` and the optional
//! `status.conditions` write-back read it.

use std::collections::HashMap;
use std::sync::Mutex;

use moat_policy::model::ObjectKey;
use moat_policy::model::parse::ValidationError;

/// Why a policy was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The object breaks the API's own validation (an API server without the CRD's schema,
    /// an older CRD, or a manifest no API server checked).
    Invalid,
    /// Valid upstream, but uses what this Moat does not enforce (`domainNames`, `nodes`
    /// peers): refused whole rather than enforced narrower than written.
    Unsupported,
}

impl Refusal {
    /// The peers this Moat refuses rather than narrows; everything else refused is invalid.
    pub fn of(e: &ValidationError) -> Refusal {
        let last = e.field.rsplit('.').next().unwrap_or("");
        if matches!(last, "domainNames" | "nodes") && e.message.contains("not supported") {
            Refusal::Unsupported
        } else {
            Refusal::Invalid
        }
    }

    /// The `reason` of a condition (CamelCase, as the API asks).
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Invalid => "Invalid",
            Refusal::Unsupported => "Unsupported",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// In the model; `warnings` name what was accepted with a caveat (a normalised CIDR, a
    /// peer of a newer CRD failing closed).
    Accepted { warnings: Vec<String> },
    Refused {
        why: Refusal,
        message: String,
        /// A previous valid version of the object stays in force (else none ever was).
        last_valid_in_force: bool,
    },
}

impl Verdict {
    pub fn accepted(&self) -> bool {
        matches!(self, Verdict::Accepted { .. })
    }

    /// One line for humans.
    pub fn describe(&self) -> String {
        match self {
            Verdict::Accepted { warnings } if warnings.is_empty() => "accepted".into(),
            Verdict::Accepted { warnings } => {
                format!("accepted with warnings: {}", warnings.join("; "))
            }
            Verdict::Refused {
                message,
                last_valid_in_force,
                ..
            } => {
                let kept = if *last_valid_in_force {
                    "its last valid version stays in force"
                } else {
                    "no version of it is enforced"
                };
                format!("refused: {message} ({kept})")
            }
        }
    }
}

/// The verdict on every policy object a source currently has (deleted ones leave).
#[derive(Debug, Default)]
pub struct Acceptance {
    verdicts: Mutex<HashMap<ObjectKey, Verdict>>,
}

impl Acceptance {
    pub fn get(&self, key: &ObjectKey) -> Option<Verdict> {
        self.lock().get(key).cloned()
    }

    /// Every refused policy, for an overview.
    pub fn refused(&self) -> Vec<(ObjectKey, Verdict)> {
        let mut v: Vec<_> = self
            .lock()
            .iter()
            .filter(|(_, v)| !v.accepted())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.sort_by_key(|(k, _)| k.to_string());
        v
    }

    pub fn set(&self, key: ObjectKey, v: Verdict) {
        self.lock().insert(key, v);
    }

    pub fn remove(&self, key: &ObjectKey) {
        self.lock().remove(key);
    }

    /// Removes every verdict whose key `keep` refuses; returns their keys.
    pub fn remove_unless(&self, keep: impl Fn(&ObjectKey) -> bool) -> Vec<ObjectKey> {
        let mut m = self.lock();
        let gone: Vec<ObjectKey> = m.keys().filter(|k| !keep(k)).cloned().collect();
        for k in &gone {
            m.remove(k);
        }
        gone
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectKey, Verdict>> {
        self.verdicts.lock().expect("acceptance lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(field: &str, message: &str) -> ValidationError {
        ValidationError {
            object: "ClusterNetworkPolicy a".into(),
            field: field.into(),
            message: message.into(),
        }
    }

    #[test]
    fn unsupported_peers_are_told_apart_from_invalid_objects() {
        let dn = err(
            "spec.egress[0].to[1].domainNames",
            "domainNames peers are not supported by Moat",
        );
        assert_eq!(Refusal::of(&dn), Refusal::Unsupported);
        let prio = err("spec.priority", "5000 is out of range: must be 0 to 1000");
        assert_eq!(Refusal::of(&prio), Refusal::Invalid);
        // A peer setting two fields is invalid, whatever they are.
        let two = err(
            "spec.egress[0].to[0]",
            "exactly one of namespaces, pods, nodes, networks and domainNames may be set",
        );
        assert_eq!(Refusal::of(&two), Refusal::Invalid);
    }

    #[test]
    fn the_description_says_what_stays_enforced() {
        let v = Verdict::Refused {
            why: Refusal::Invalid,
            message: "spec.priority: out of range".into(),
            last_valid_in_force: true,
        };
        assert!(v.describe().contains("last valid version stays"));
        let a = Acceptance::default();
        let k = ObjectKey::ClusterPolicy("a".into());
        a.set(k.clone(), v);
        a.set(
            ObjectKey::ClusterPolicy("b".into()),
            Verdict::Accepted { warnings: vec![] },
        );
        assert_eq!(a.refused().len(), 1);
        a.remove(&k);
        assert!(a.get(&k).is_none());
    }
}
