//! The case schema of `shared/conformance/README.md`: one file = one state of the cluster.
//! Parsing also checks a case against its own model (see [`Layout`]), so that a typo in a pod
//! name fails loudly instead of leaving a cell nobody compares.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::Error;
use crate::layout::Layout;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
pub struct ProbeSpec {
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Exception {
    pub from: String,
    pub to: String,
    pub allowed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Expectation {
    pub probe: ProbeSpec,
    pub default: bool,
    #[serde(default)]
    pub exceptions: Vec<Exception>,
}

impl Expectation {
    pub fn allowed(&self, from: &str, to: &str) -> bool {
        self.exceptions
            .iter()
            .rev()
            .find(|e| e.from == from && e.to == to)
            .map_or(self.default, |e| e.allowed)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ContainerPortSpec {
    pub name: String,
    pub port: u16,
    #[serde(default = "tcp")]
    pub protocol: Protocol,
}

fn tcp() -> Protocol {
    Protocol::Tcp
}

/// One pod of a `cluster:` section.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Container ports: they only matter to named-port resolution.
    #[serde(default)]
    pub ports: Vec<ContainerPortSpec>,
}

/// The `cluster:` section: when present it replaces the x/y/z model entirely.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// Every namespace with its full label set (pods are optional).
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Every pod, keyed `"ns/name"`.
    #[serde(default)]
    pub pods: BTreeMap<String, PodSpec>,
    /// What every pod serves; probes must be among these.
    pub serves: Vec<ProbeSpec>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Case {
    pub name: String,
    #[serde(default)]
    pub source: String,
    /// `None`: the x/y/z model.
    #[serde(default)]
    pub cluster: Option<ClusterSpec>,
    #[serde(default)]
    pub policies: Vec<serde_yaml::Value>,
    #[serde(default)]
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    pub pod_labels: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    pub pod_ports: BTreeMap<String, Vec<ContainerPortSpec>>,
    pub probes: Vec<ProbeSpec>,
    pub expect: Vec<Expectation>,
    #[serde(skip)]
    pub path: PathBuf,
}

impl Case {
    /// `(test, step)`: `foo-step2` → `("foo", 2)`; a single-state case is step 1.
    pub fn test_and_step(&self) -> (&str, u32) {
        if let Some((test, step)) = self.name.rsplit_once("-step")
            && let Ok(n) = step.parse()
        {
            return (test, n);
        }
        (&self.name, 1)
    }

    /// Cases whose name ends in `-ipv4` only hold for IPv4 pod addresses.
    pub fn ipv4_only(&self) -> bool {
        self.test_and_step().0.ends_with("-ipv4")
    }

    pub fn parse(path: &Path, text: &str) -> Result<Case, Error> {
        let mut case: Case = serde_yaml::from_str(text).map_err(|e| Error::Case {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        case.path = path.to_path_buf();
        let bad = |message: String| Error::Case {
            path: path.to_path_buf(),
            message,
        };
        if case.probes.len() != case.expect.len() {
            return Err(bad(format!(
                "{} probes but {} expectations",
                case.probes.len(),
                case.expect.len()
            )));
        }
        for (i, (p, e)) in case.probes.iter().zip(&case.expect).enumerate() {
            if *p != e.probe {
                return Err(bad(format!(
                    "expect[{i}] is for {:?}, probes[{i}] is {p:?}",
                    e.probe
                )));
            }
        }
        let layout = Layout::of(&case)?;
        for p in &case.probes {
            if !layout.serves.contains(p) {
                return Err(bad(format!(
                    "probe {}/{} is not served by the pods (serves: {:?})",
                    p.protocol, p.port, layout.serves
                )));
            }
        }
        for e in case.expect.iter().flat_map(|e| &e.exceptions) {
            for pod in [&e.from, &e.to] {
                if layout.pod(pod).is_none() {
                    return Err(bad(format!(
                        "exception names {pod:?}, not a pod of the case's model"
                    )));
                }
            }
        }
        Ok(case)
    }
}

/// Every case file in `dir`, in run order: by test, then by step number.
pub fn load_dir(dir: &Path) -> Result<Vec<Case>, Error> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| Error::Io {
            path: p.to_path_buf(),
            source: e,
        })
    };
    let mut cases = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    for entry in entries {
        let path = entry
            .map_err(|e| Error::Io {
                path: dir.to_path_buf(),
                source: e,
            })?
            .path();
        if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            cases.push(Case::parse(&path, &read(&path)?)?);
        }
    }
    cases.sort_by(|a, b| {
        let (ta, sa) = a.test_and_step();
        let (tb, sb) = b.test_and_step();
        (ta, sa).cmp(&(tb, sb))
    });
    if cases.is_empty() {
        return Err(Error::Case {
            path: dir.to_path_buf(),
            message: "no case files (*.yaml) found".into(),
        });
    }
    Ok(cases)
}
