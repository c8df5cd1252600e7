//! Certificate files and lifetimes, the same for `moatctl certs` and node bootstrap.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LifetimeError {
    #[error("duration {0:?}: expected e.g. 90d, 12h, 30m, 45s")]
    Number(String),
    #[error("duration {0:?}: unit must be d, h, m or s")]
    Unit(String),
    #[error("duration {0:?} is too long: a certificate must expire before the year 10000")]
    TooLong(String),
}

/// A certificate lifetime: a whole number with a unit, `d`, `h`, `m` or `s`.
pub fn parse_lifetime(s: &str) -> Result<Duration, LifetimeError> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| LifetimeError::Number(s.into()))?;
    let per = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => return Err(LifetimeError::Unit(s.into())),
    };
    let secs = n
        .checked_mul(per)
        .filter(|s| *s <= MAX_LIFETIME_SECS)
        .ok_or_else(|| LifetimeError::TooLong(s.into()))?;
    Ok(Duration::from_secs(secs))
}

/// Far beyond any sensible certificate, and far below what the time arithmetic downstream
/// (and X.509's four-digit years) can hold: longer lifetimes are refused, never wrapped.
const MAX_LIFETIME_SECS: u64 = 1_000 * 366 * 86_400;

/// Latest expiry X.509's GeneralizedTime can state: 9999-12-31T23:59:59Z.
const LAST_EXPRESSIBLE: u64 = 253_402_300_799;

/// When a certificate issued at `now` for `lifetime` expires, or why it can't: the sum is
/// checked, never allowed to overflow or to pass the last instant X.509 can express.
pub fn expiry(now: SystemTime, lifetime: Duration) -> Result<SystemTime, LifetimeError> {
    let too_long = || LifetimeError::TooLong(format!("{}s", lifetime.as_secs()));
    let end = now.checked_add(lifetime).ok_or_else(too_long)?;
    match end.duration_since(UNIX_EPOCH) {
        Ok(d) if d.as_secs() <= LAST_EXPRESSIBLE => Ok(end),
        _ => Err(too_long()),
    }
}

/// Distinguishes temporary files written by one process.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Writes a PEM file via a temporary file, fsync and rename, so a reader (the server's
/// reloader, the agent's next connection) never sees half a file. Creates the parent
/// directory.
///
/// The temporary file is created exclusively (`O_EXCL`, `O_NOFOLLOW`) under a fresh name,
/// keys with mode 0600 from the first byte: a symlink or a readable file planted where the
/// key is about to be written is never followed or reused, and the rename replaces a
/// symlink at `path` instead of writing through it.
pub fn write_pem(path: &Path, pem: &[u8], secret: bool) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)?;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{}: not a file name", path.display())))?;
    let (tmp, mut f) = create_exclusive(&dir, &name.to_string_lossy(), secret)?;
    let written = f
        .write_all(pem)
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    // The rename itself survives a crash once the directory is synced.
    std::fs::File::open(&dir)?.sync_all()
}

fn create_exclusive(
    dir: &Path,
    name: &str,
    secret: bool,
) -> std::io::Result<(PathBuf, std::fs::File)> {
    let mut last = None;
    for _ in 0..16 {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(
            ".{name}.{}.{seq}.{nanos:x}.tmp",
            std::process::id()
        ));
        let mut o = std::fs::OpenOptions::new();
        o.write(true)
            .create_new(true)
            .mode(if secret { 0o600 } else { 0o644 })
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
        match o.open(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            // Someone else's file (or a planted link) under that name: take another.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free temporary name")))
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
        // Overflowing or absurd lifetimes are errors, never a wrapped or panicking sum.
        for huge in [
            "213503982334601d",
            "18446744073709551615d",
            "18446744073709551615s",
            "400000d",
        ] {
            assert!(
                matches!(parse_lifetime(huge), Err(LifetimeError::TooLong(_))),
                "{huge}"
            );
        }
        assert!(matches!(
            parse_lifetime("99999999999999999999999d"),
            Err(LifetimeError::Number(_))
        ));
    }

    #[test]
    fn expiries_are_checked() {
        let now = SystemTime::now();
        assert_eq!(
            expiry(now, Duration::from_secs(60)),
            Ok(now + Duration::from_secs(60))
        );
        assert!(expiry(now, parse_lifetime("366000d").unwrap()).is_ok());
        let past_9999 = Duration::from_secs(8_000 * 366 * 86_400);
        assert!(matches!(
            expiry(now, past_9999),
            Err(LifetimeError::TooLong(_))
        ));
        assert!(expiry(now, Duration::MAX).is_err());
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
        assert_eq!(std::fs::read_dir(d.path().join("sub")).unwrap().count(), 1);
    }

    #[test]
    fn planted_links_and_files_are_never_written_through() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let key = d.path().join("k.pem");
        // A link where the key goes, and one and a world-readable file where the old
        // implementation put its temporary file.
        std::os::unix::fs::symlink(&victim, &key).unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join("k.tmp")).unwrap();
        write_pem(&key, b"secret", true).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let meta = std::fs::symlink_metadata(&key).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&key).unwrap(), b"secret");
    }
}
