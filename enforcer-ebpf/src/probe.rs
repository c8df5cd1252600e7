//! Can this node run the eBPF dataplane? Checks what the datapath really uses, in the order
//! a failure is most likely, and stops at the first that fails, naming it.

use moat_dataplane::local::PodInterfaces;
use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::EbpfBackend;
use crate::sys;

/// Probe results: name → "ok" or why not. Reported to the server with the backend.
pub type Probes = BTreeMap<String, String>;

/// The first probe that failed, with everything probed up to it.
#[derive(Debug)]
pub struct Failed {
    pub probe: String,
    pub why: String,
    pub probes: Probes,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "probe {} failed: {}", self.probe, self.why)
    }
}

/// Kernel release as (major, minor): a hint only, never a gate on its own.
fn kernel_version() -> Option<(u32, u32)> {
    let r = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut it = r.trim().split(['.', '-']);
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Runs every probe; on success returns the backend, loaded (so the verifier accepted the
/// program) and ready to adopt.
pub fn open(bpffs: PathBuf, node: &str, mode: PodInterfaces) -> Result<EbpfBackend, Failed> {
    let mut probes = Probes::new();
    let fail = |probes: &mut Probes, probe: &str, why: String| {
        probes.insert(probe.to_string(), why.clone());
        Failed {
            probe: probe.to_string(),
            why,
            probes: probes.clone(),
        }
    };
    // A hint for operators reading the report: the checks below decide.
    let hint = match kernel_version() {
        Some((a, b)) if (a, b) >= (6, 6) => "ok".to_string(),
        Some((a, b)) => format!("{a}.{b}: TCX needs 6.6, expect a failure below"),
        None => "unknown".to_string(),
    };
    probes.insert("kernel_version".into(), hint);
    // The bpf() syscall itself: seccomp profiles and missing CAP_BPF refuse it here.
    if let Err(e) = sys::map_probe() {
        return Err(fail(&mut probes, "bpf_syscall", e.to_string()));
    }
    probes.insert("bpf_syscall".into(), "ok".into());
    for (name, r) in sys::map_type_probes() {
        match r {
            Ok(()) => {
                probes.insert(format!("map_{name}"), "ok".into());
            }
            Err(e) => return Err(fail(&mut probes, &format!("map_{name}"), e.to_string())),
        }
    }
    probes.insert(
        "btf".into(),
        if std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
            "ok".into()
        } else {
            "no /sys/kernel/btf/vmlinux (not needed: the program uses no CO-RE)".into()
        },
    );
    if let Err(e) = sys::ensure_bpffs(&bpffs) {
        return Err(fail(
            &mut probes,
            "bpffs",
            format!("{}: {e}", bpffs.display()),
        ));
    }
    probes.insert("bpffs".into(), "ok".into());
    // Loading runs the verifier over both programs and creates (or adopts) the maps.
    let mut backend = match EbpfBackend::open(bpffs, node, mode, Probes::new()) {
        Ok(b) => b,
        Err(e) => return Err(fail(&mut probes, "program_load", e.to_string())),
    };
    probes.insert("program_load".into(), "ok".into());
    // TCX attach, tried where it disturbs nothing: loopback (the node's own traffic always
    // passes the egress program), detached again at once.
    if let Err(e) = backend.dataplane().probe_attach("lo") {
        return Err(fail(&mut probes, "tcx_attach", e.to_string()));
    }
    probes.insert("tcx_attach".into(), "ok".into());
    backend.set_probes(probes);
    Ok(backend)
}
