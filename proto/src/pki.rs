//! Certificate files and lifetimes, the same for `moatctl certs` and node bootstrap.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LifetimeError {
    #[error("duration {0:?}: expected e.g. 90d, 12h, 30m, 45s")]
    Number(String),
    #[error("duration {0:?}: unit must be d, h, m or s")]
    Unit(String),
}

/// A certificate lifetime: a whole number with a unit, `d`, `h`, `m` or `s`.
pub fn parse_lifetime(s: &str) -> Result<Duration, LifetimeError> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| LifetimeError::Number(s.into()))?;
    let secs = match unit {
        "d" => n * 86_400,
        "h" => n * 3_600,
        "m" => n * 60,
        "s" => n,
        _ => return Err(LifetimeError::Unit(s.into())),
    };
    Ok(Duration::from_secs(secs))
}

/// Writes a PEM file via a temporary file, fsync and rename, so a reader (the server's
/// reloader, the agent's next connection) never sees half a file; keys with mode 0600.
/// Creates the parent directory.
pub fn write_pem(path: &Path, pem: &[u8], secret: bool) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    if secret {
        o.mode(0o600);
    }
    let mut f = o.open(&tmp)?;
    f.write_all(pem)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes() {
        assert_eq!(parse_lifetime("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert_eq!(parse_lifetime("12h"), Ok(Duration::from_secs(12 * 3_600)));
        assert_eq!(parse_lifetime("45s"), Ok(Duration::from_secs(45)));
        assert!(matches!(parse_lifetime("h"), Err(LifetimeError::Number(_))));
        assert!(matches!(parse_lifetime("90"), Err(LifetimeError::Unit(_))));
        assert!(matches!(parse_lifetime("1w"), Err(LifetimeError::Unit(_))));
    }

    #[test]
    fn pem_files_are_whole_and_keys_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("sub/k.pem");
        write_pem(&key, b"secret", true).unwrap();
        write_pem(&key, b"new", true).unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), b"new");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!d.path().join("sub/k.tmp").exists());
    }
}
