//! One file's text → Kubernetes objects → validated model objects, with diagnostics that name
//! the file, the object and the field.

use std::fmt;
use std::path::{Path, PathBuf};

use moat_policy::model::{self, K8sObject, Object};
use serde::Deserialize;
use serde_yaml::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// A problem with a manifest, pointing at the file, the object and the field where known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: PathBuf,
    /// `Kind namespace/name`, or `document N` when the object can't be identified.
    pub object: Option<String>,
    pub field: Option<String>,
    pub message: String,
    /// The object, when it could be identified: what a per-policy verdict is keyed by.
    pub key: Option<model::ObjectKey>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{sev}: {}", self.located())
    }
}

impl Diagnostic {
    /// File, object, field and message, without the severity.
    pub fn located(&self) -> String {
        let mut s = self.file.display().to_string();
        for part in [&self.object, &self.field].into_iter().flatten() {
            s.push_str(": ");
            s.push_str(part);
        }
        s.push_str(": ");
        s.push_str(&self.message);
        s
    }
}

/// A valid object from a file, in both forms: the model for the index, the Kubernetes
/// object for the reference evaluator.
#[derive(Clone, Debug, PartialEq)]
pub struct Loaded {
    pub object: Object,
    pub k8s: K8sObject,
}

/// What one file yielded.
#[derive(Debug, Default)]
pub struct FileResult {
    pub objects: Vec<Loaded>,
    /// Objects that were identified but invalid (their last valid version should stay).
    pub rejected: Vec<model::ObjectKey>,
    pub diagnostics: Vec<Diagnostic>,
    /// The file could not be read as YAML at all: keep everything it held before.
    pub unreadable: bool,
}

impl FileResult {
    fn error(
        &mut self,
        file: &Path,
        object: Option<String>,
        field: Option<String>,
        message: impl Into<String>,
    ) {
        self.diagnostics.push(Diagnostic {
            severity: Severity::Error,
            file: file.to_path_buf(),
            object,
            field,
            message: message.into(),
            key: None,
        });
    }

    /// Ties the last diagnostic to the object it is about.
    fn about(&mut self, key: Option<&model::ObjectKey>) {
        if let (Some(d), Some(k)) = (self.diagnostics.last_mut(), key) {
            d.key = Some(k.clone());
        }
    }

    /// The object is identified but invalid: its last valid version should stay.
    fn reject(&mut self, key: Option<model::ObjectKey>) {
        self.about(key.as_ref());
        self.rejected.extend(key);
    }
}

/// Parses a (multi-document) YAML or JSON file. Kinds Moat doesn't use (Deployments,
/// Services, …) are skipped silently: a manifests directory usually holds a whole app.
/// Experimental features are off; see [`parse_file_with`].
pub fn parse_file(file: &Path, text: &str) -> FileResult {
    parse_file_with(file, text, &model::parse::Options::default())
}

/// [`parse_file`], accepting what `opts` enables.
pub fn parse_file_with(file: &Path, text: &str, opts: &model::parse::Options) -> FileResult {
    let mut out = FileResult::default();
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        match Value::deserialize(de) {
            Ok(v) => docs.push((i + 1, v)),
            Err(e) => {
                out.error(
                    file,
                    Some(format!("document {}", i + 1)),
                    None,
                    format!("malformed YAML: {e}"),
                );
                out.unreadable = true;
                return out;
            }
        }
    }
    for (n, doc) in docs {
        document(file, n, doc, opts, &mut out);
    }
    out
}

fn document(file: &Path, n: usize, doc: Value, opts: &model::parse::Options, out: &mut FileResult) {
    if doc.is_null() {
        return;
    }
    let Value::Mapping(map) = &doc else {
        out.error(
            file,
            Some(format!("document {n}")),
            None,
            "not a Kubernetes object (expected a mapping)",
        );
        return;
    };
    let text = |k: &str| map.get(k).and_then(Value::as_str).map(str::to_string);
    let (Some(api), Some(kind)) = (text("apiVersion"), text("kind")) else {
        out.error(
            file,
            Some(format!("document {n}")),
            None,
            "missing apiVersion or kind",
        );
        return;
    };
    if kind == "List" || (kind.ends_with("List") && api == "v1") {
        let items = map
            .get("items")
            .and_then(Value::as_sequence)
            .cloned()
            .unwrap_or_default();
        for item in items {
            document(file, n, item, opts, out);
        }
        return;
    }
    let meta = map.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>")
        .to_string();
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let (name, ns) = (name.as_str(), ns.as_str());
    let label = match kind.as_str() {
        "Namespace" | "Node" | "ClusterNetworkPolicy" => format!("{kind} {name}"),
        _ => format!("{kind} {ns}/{name}"),
    };
    let key = key_of(&kind, ns, name);
    let k8s = match (api.as_str(), kind.as_str()) {
        ("v1", "Namespace") => typed(doc).map(K8sObject::Namespace),
        ("v1", "Pod") => typed(doc).map(K8sObject::Pod),
        ("v1", "Node") => typed(doc).map(K8sObject::Node),
        ("networking.k8s.io/v1", "NetworkPolicy") => typed(doc).map(K8sObject::NetworkPolicy),
        (_, "NetworkPolicy") => {
            out.error(
                file,
                Some(label),
                Some("apiVersion".into()),
                format!("{api} is not supported (use networking.k8s.io/v1)"),
            );
            out.about(key.as_ref());
            return;
        }
        (moat_policy::model::cnp_api::API_VERSION, "ClusterNetworkPolicy") => {
            typed(doc).map(K8sObject::ClusterNetworkPolicy)
        }
        // Another group's kind of that name (Antrea's `crd.antrea.io`, say) is not ours.
        (api, "ClusterNetworkPolicy") if api.starts_with("policy.networking.k8s.io/") => {
            out.error(
                file,
                Some(label),
                Some("apiVersion".into()),
                format!(
                    "{api} is not supported (use {})",
                    moat_policy::model::cnp_api::API_VERSION
                ),
            );
            out.reject(key.clone());
            return;
        }
        _ => return,
    };
    let k8s = match k8s {
        Ok(k) => k,
        Err((field, message)) => {
            out.error(file, Some(label), Some(field), message);
            out.reject(key.clone());
            return;
        }
    };
    match model::parse::object_with(&k8s, opts) {
        Ok(parsed) => {
            for w in parsed.warnings {
                out.diagnostics.push(Diagnostic {
                    severity: Severity::Warning,
                    file: file.to_path_buf(),
                    object: Some(w.object),
                    field: Some(w.field),
                    message: w.message,
                    key: key.clone(),
                });
            }
            out.objects.push(Loaded {
                object: parsed.value,
                k8s,
            });
        }
        Err(e) => {
            out.error(file, Some(e.object), Some(e.field), e.message);
            out.reject(key.clone());
        }
    }
}

/// Deserialises with the path of the offending field on error.
fn typed<T: serde::de::DeserializeOwned>(doc: Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = e.path().to_string();
        (
            if path == "." {
                "(object)".to_string()
            } else {
                path
            },
            e.into_inner().to_string(),
        )
    })
}

fn key_of(kind: &str, ns: &str, name: &str) -> Option<model::ObjectKey> {
    let (ns, name) = (ns.to_string(), name.to_string());
    Some(match kind {
        "Namespace" => model::ObjectKey::Namespace(name),
        "Node" => model::ObjectKey::Node(name),
        "Pod" => model::ObjectKey::Pod {
            namespace: ns,
            name,
        },
        "NetworkPolicy" => model::ObjectKey::Policy {
            namespace: ns,
            name,
        },
        "ClusterNetworkPolicy" => model::ObjectKey::ClusterPolicy(name),
        _ => return None,
    })
}
