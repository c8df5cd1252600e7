//! Helpers for tests that run Moat's real binaries.

#![forbid(unsafe_code)]

use std::path::PathBuf;

/// Path of a workspace binary built alongside the tests (`cargo test --workspace` and
/// `cargo nextest run --workspace` build every binary before running tests).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run the tests with --workspace (the README's test command does)",
        path.display()
    );
    path
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub mod abuse;
pub mod bed;
pub mod kubeapi;
pub mod netns;
pub mod process;
pub mod proxy;
pub mod record;
pub mod replicas;
pub mod sled_fixture;
pub mod watch;
pub mod world;

/// Copies a directory tree (for tests that edit example manifests).
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        let dest = to.join(e.file_name());
        if e.path().is_dir() {
            std::fs::create_dir_all(&dest).expect("mkdir");
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).expect("copy");
        }
    }
}
