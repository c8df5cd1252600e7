//! Builds the datapath program (`enforcer-ebpf/program`) for the BPF target with the nightly
//! toolchain and bpf-linker (installed by scripts/setup.sh), into OUT_DIR.

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let meta = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let program = meta
        .packages
        .iter()
        .find(|p| p.name.as_str() == "moat-ebpf-program")
        .context("package moat-ebpf-program not in the workspace")?;
    let root = program
        .manifest_path
        .parent()
        .context("program manifest has no directory")?;
    // aya-build watches the program's directory only; the types it shares with this crate
    // are compiled into it too.
    println!("cargo:rerun-if-changed=common");
    // The toolchain `rustup run` builds it with: `nightly`, or a dated one whose LLVM is
    // bpf-linker's (scripts/toolchain.sh; the image's build stage sets it).
    println!("cargo:rerun-if-env-changed=MOAT_EBPF_TOOLCHAIN");
    let custom = std::env::var("MOAT_EBPF_TOOLCHAIN").unwrap_or_default();
    let toolchain = match custom.as_str() {
        "" => aya_build::Toolchain::default(),
        t => aya_build::Toolchain::Custom(t),
    };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: program.name.as_str(),
            root_dir: root.as_str(),
            ..Default::default()
        }],
        toolchain,
    )
}
