//! Older layouts' committed datapath objects, loaded as a node running that layout's binary
//! would have them, and node directories swept after a test.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use moat_enforcer_ebpf::dataplane::Dataplane;

/// Loads the committed datapath object of an older `layout` for `node`. Only for a test
/// binary with one test: it points the loader at the object through the environment.
pub fn open_layout(bpffs: &Path, node: &str, layout: u32) -> Dataplane {
    let object = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/moat-datapath-layout{layout}.o"));
    // SAFETY: the binary's only test, on its only thread that reads the environment.
    unsafe {
        std::env::set_var("MOAT_EBPF_OBJECT", object);
        std::env::set_var("MOAT_EBPF_LAYOUT_FOR_TESTS", layout.to_string());
    }
    let dp = Dataplane::open(bpffs, node);
    // SAFETY: as above.
    unsafe {
        std::env::remove_var("MOAT_EBPF_OBJECT");
        std::env::remove_var("MOAT_EBPF_LAYOUT_FOR_TESTS");
    }
    dp.unwrap_or_else(|e| panic!("load layout {layout} (root and BPF needed): {e}"))
}

/// Removes a node's directory when dropped, also on failure.
pub struct Sweep<'a>(pub &'a Path);

impl Drop for Sweep<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0);
    }
}

/// The tests' bpffs.
pub const BPFFS: &str = "/run/moat-test/bpf";

/// Enters a network namespace of this thread's own (a migration attaches to every
/// interface; a new namespace has only loopback). For a test binary with one test.
pub fn own_netns() {
    // SAFETY: unshare touches only this thread's namespaces.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
}

/// A node name of this test process (ending in its pid, as the sweeps expect) and its
/// directory, with whatever an earlier run left there removed.
pub fn node(prefix: &str) -> (String, PathBuf) {
    let node = format!("{prefix}-{}", std::process::id());
    let root = Path::new(BPFFS).join("moat").join(&node);
    let _ = std::fs::remove_dir_all(&root);
    (node, root)
}
