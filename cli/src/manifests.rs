//! Loading a manifest directory for one-shot commands.

use std::path::Path;

use anyhow::{Result, bail};
use moat_manifests::{ManifestSet, Severity};

/// Loads `dir`, printing diagnostics to stderr. Invalid objects are left out (and named);
/// an unreadable directory is an error.
pub fn load(dir: &Path) -> Result<ManifestSet> {
    let mut set = ManifestSet::new(dir);
    let r = set.reload()?;
    for d in &r.diagnostics {
        eprintln!("{d}");
    }
    if set.is_empty() {
        let errors = r
            .diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .count();
        bail!("no usable objects in {} ({errors} errors)", dir.display());
    }
    Ok(set)
}
