//! A sled database opened by a test while Moat's processes are stopped.

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{FlockOperation, flock};

/// Opens the sled database in `dir` for a test to read or plant state in. Dropping it
/// flushes and then waits until sled has really let go of the directory: its writer
/// threads can hold the lock for a moment after the last handle is gone (seen in CI under
/// load), and a Moat process started then would refuse the directory.
pub struct SledFixture {
    db: Option<sled::Db>,
    dir: PathBuf,
}

impl SledFixture {
    pub fn open(dir: &Path) -> SledFixture {
        let db = sled::open(dir)
            .unwrap_or_else(|e| panic!("sled at {} (is its process stopped?): {e}", dir.display()));
        SledFixture {
            db: Some(db),
            dir: dir.to_path_buf(),
        }
    }
}

impl Deref for SledFixture {
    type Target = sled::Db;
    fn deref(&self) -> &sled::Db {
        self.db.as_ref().expect("open until dropped")
    }
}

impl Drop for SledFixture {
    fn drop(&mut self) {
        let Some(db) = self.db.take() else { return };
        let flushed = db.flush();
        drop(db);
        if std::thread::panicking() {
            return;
        }
        flushed.expect("flush the fixture");
        released(&self.dir);
    }
}

/// Waits (at most 10 s) until no handle holds the sled lock of `dir`.
pub fn released(dir: &Path) {
    let file = std::fs::File::open(dir.join("db")).expect("sled's db file");
    let deadline = Instant::now() + Duration::from_secs(10);
    while flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
        assert!(
            Instant::now() < deadline,
            "sled still holds {} 10 s after its last handle was dropped",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
