//! Where cluster state comes from.

pub mod file;

use std::path::PathBuf;
use std::str::FromStr;

use moat_policy::Event;
use moat_policy::model::Object;

/// What a source tells the index.
#[derive(Debug)]
pub enum SourceEvent {
    /// The complete state (the first full sync, or a relist): applied as one atomic reset.
    Reset(Vec<Object>),
    /// Changes since the last event.
    Batch(Vec<Event>),
}

/// `--source` values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    /// A directory of Kubernetes manifests, watched for changes.
    Dir(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("unknown source {0:?}: expected dir:PATH")]
    Unknown(String),
    #[error("empty path in source {0:?}")]
    EmptyPath(String),
}

impl FromStr for SourceSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some(("dir", "")) => Err(SpecError::EmptyPath(s.to_string())),
            Some(("dir", path)) => Ok(SourceSpec::Dir(PathBuf::from(path))),
            _ => Err(SpecError::Unknown(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!(
            "dir:examples".parse::<SourceSpec>().unwrap(),
            SourceSpec::Dir("examples".into())
        );
        assert!("dir:".parse::<SourceSpec>().is_err());
        assert!("kube:prod".parse::<SourceSpec>().is_err());
        assert!("examples".parse::<SourceSpec>().is_err());
    }
}
