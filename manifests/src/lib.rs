//! A directory of Kubernetes manifests as a source of cluster state.
//!
//! [`ManifestSet::reload`] re-reads the directory and returns the events that turn the last
//! state into the new one. It never fails open: an invalid update to an object keeps that
//! object's last valid version, and a file that can't be parsed at all keeps every object it
//! held, so a typo in one policy never drops the rest (or that policy's previous rules).

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

mod parse;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use moat_policy::Event;
use moat_policy::model::{K8sObject, Object, ObjectKey};

pub use parse::{Diagnostic, FileResult, Loaded, Severity, parse_file, parse_file_with};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read manifest directory {path}: {source}")]
    Root {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The files a directory holds, recursively, in a stable order: `*.yaml`, `*.yml`, `*.json`.
pub fn manifest_files(root: &Path) -> Result<Vec<PathBuf>, Error> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') {
                continue;
            }
            if path.is_dir() {
                walk(&path, out)?;
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    if root.is_file() {
        out.push(root.to_path_buf());
    } else {
        walk(root, &mut out).map_err(|source| Error::Root {
            path: root.to_path_buf(),
            source,
        })?;
    }
    out.sort();
    Ok(out)
}

#[derive(Clone, Debug)]
struct Entry {
    file: PathBuf,
    loaded: Loaded,
}

/// What one reload found.
#[derive(Debug, Default)]
pub struct Reload {
    /// Events turning the previous state into the new one (empty if nothing changed).
    pub events: Vec<Event>,
    pub diagnostics: Vec<Diagnostic>,
    /// Objects whose current text is invalid (what stays of them is their last valid
    /// version, if any): the file source's refused policies.
    pub rejected: Vec<ObjectKey>,
}

impl Reload {
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
    }
}

/// The valid state of a manifest directory.
pub struct ManifestSet {
    root: PathBuf,
    objects: BTreeMap<ObjectKey, Entry>,
    parse: moat_policy::model::parse::Options,
}

impl ManifestSet {
    /// With every experimental feature off.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self::with_options(root, moat_policy::model::parse::Options::default())
    }

    /// Accepting what `parse` enables (experimental ClusterNetworkPolicy peers).
    pub fn with_options(
        root: impl Into<PathBuf>,
        parse: moat_policy::model::parse::Options,
    ) -> Self {
        Self {
            root: root.into(),
            objects: BTreeMap::new(),
            parse,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Re-reads every file. An unreadable directory is an error and changes nothing.
    pub fn reload(&mut self) -> Result<Reload, Error> {
        let files = manifest_files(&self.root)?;
        let mut results = Vec::new();
        for f in files {
            let r = match std::fs::read_to_string(&f) {
                Ok(text) => parse_file_with(&f, &text, &self.parse),
                Err(e) => {
                    // Vanished between listing and reading (an editor's rename) or unreadable:
                    // treat like a file we can't parse, keeping its objects until next time.
                    let mut r = FileResult {
                        unreadable: true,
                        ..Default::default()
                    };
                    r.diagnostics.push(Diagnostic {
                        severity: Severity::Error,
                        file: f.clone(),
                        object: None,
                        field: None,
                        message: format!("cannot read: {e}"),
                        key: None,
                    });
                    r
                }
            };
            results.push((f, r));
        }
        Ok(self.apply(results))
    }

    /// Merges parsed files into the state (separate from I/O for tests and fuzzing).
    pub fn apply(&mut self, files: Vec<(PathBuf, FileResult)>) -> Reload {
        let mut diagnostics = Vec::new();
        let mut next: BTreeMap<ObjectKey, Entry> = BTreeMap::new();
        let mut keep_from_files = Vec::new();
        let mut rejected = Vec::new();
        for (file, r) in files {
            diagnostics.extend(r.diagnostics);
            if r.unreadable {
                keep_from_files.push(file.clone());
            }
            rejected.extend(r.rejected);
            for loaded in r.objects {
                let key = loaded.object.key();
                if let Some(first) = next.get(&key) {
                    diagnostics.push(Diagnostic {
                        severity: Severity::Error,
                        file: file.clone(),
                        object: Some(key.to_string()),
                        field: None,
                        message: format!(
                            "also defined in {}; using that one",
                            first.file.display()
                        ),
                        key: Some(key.clone()),
                    });
                    continue;
                }
                next.insert(
                    key,
                    Entry {
                        file: file.clone(),
                        loaded,
                    },
                );
            }
        }
        // A key refused in one file but valid in another is enforced from the valid one.
        rejected.retain(|k| !next.contains_key(k));
        rejected.sort();
        rejected.dedup();
        // Never fail open: invalid updates and unparseable files keep the last valid objects.
        for (key, old) in &self.objects {
            if next.contains_key(key) {
                continue;
            }
            let keep = rejected.contains(key) || keep_from_files.contains(&old.file);
            if keep {
                if rejected.contains(key) {
                    diagnostics.push(Diagnostic {
                        severity: Severity::Warning,
                        file: old.file.clone(),
                        object: Some(key.to_string()),
                        field: None,
                        message: "keeping its last valid version".into(),
                        key: Some(key.clone()),
                    });
                }
                next.insert(key.clone(), old.clone());
            }
        }
        let mut events = Vec::new();
        for (key, e) in &next {
            if self.objects.get(key).map(|o| &o.loaded.object) != Some(&e.loaded.object) {
                events.push(Event::Apply(e.loaded.object.clone()));
            }
        }
        for key in self.objects.keys() {
            if !next.contains_key(key) {
                events.push(Event::Delete(key.clone()));
            }
        }
        self.objects = next;
        Reload {
            events,
            diagnostics,
            rejected,
        }
    }

    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.objects.values().map(|e| &e.loaded.object)
    }

    pub fn k8s_objects(&self) -> Vec<K8sObject> {
        self.objects
            .values()
            .map(|e| e.loaded.k8s.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }
}

#[cfg(test)]
mod tests;
