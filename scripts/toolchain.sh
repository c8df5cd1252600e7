#!/usr/bin/env bash
# The toolchains that build Moat's binaries and eBPF program: Rust (stable, and nightly with
# rust-src for the program), Debian's LLVM and bpf-linker, at the versions of versions.env.
# Run by setup.sh on a machine and by the image's build stage, so both build alike.
# Idempotent: installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=versions.env
. scripts/versions.env

say() { printf '\033[1mtoolchain:\033[0m %s\n' "$*"; }
die() { printf '\033[1;31mtoolchain: %s\033[0m\n' "$*" >&2; exit 1; }

command -v rustup >/dev/null || die "rustup not found: install it (https://rustup.rs) first"

# The stable toolchain the workspace is built with (rust-version in Cargo.toml).
if ! rustup run "$RUST_VERSION" rustc --version >/dev/null 2>&1 && ! rustc --version | grep -q ' 1\.9[5-9]\.'; then
    say "installing Rust $RUST_VERSION"
    rustup toolchain install "$RUST_VERSION" --profile minimal --component clippy,rustfmt
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt

# The eBPF program's toolchain: `nightly` on a machine (which cargo-fuzz uses too), or
# MOAT_EBPF_TOOLCHAIN (enforcer-ebpf/build.rs reads it as well): the image's build stage sets
# it to versions.env's RUST_NIGHTLY and installs only that.
ebpf=${MOAT_EBPF_TOOLCHAIN:-nightly}
if ! rustup run "$ebpf" rustc --version >/dev/null 2>&1; then
    say "installing the $ebpf toolchain (for fuzzing and the eBPF program)"
    rustup toolchain install "$ebpf" --profile minimal \
        || die "cannot install the $ebpf toolchain; fuzzing needs it (rustup toolchain install $ebpf)"
fi
llvm=$(rustup run "$ebpf" rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[ "$llvm" = "$LLVM_MAJOR" ] || die "the $ebpf toolchain has LLVM $llvm; bpf-linker links LLVM $LLVM_MAJOR and
  cannot read its bitcode. Build the eBPF program with $RUST_NIGHTLY: export
  MOAT_EBPF_TOOLCHAIN=$RUST_NIGHTLY and run setup again."

# The eBPF datapath (enforcer-ebpf/program) is Rust built for bpfel-unknown-none with the
# nightly toolchain's core sources, linked by bpf-linker against Debian's LLVM 22.
if ! rustup component list --toolchain "$ebpf" --installed 2>/dev/null | grep -q '^rust-src'; then
    say "adding rust-src to the $ebpf toolchain (the eBPF program builds core from source)"
    rustup component add rust-src --toolchain "$ebpf" || die "cannot add rust-src to the $ebpf toolchain.
  The eBPF datapath (enforcer-ebpf/program) is built with 'cargo +nightly -Z build-std=core' and
  needs it. Fix rustup's access to its dist server, or port enforcer-ebpf/program to C for
  Debian's clang-22 (still loaded by aya) as docs/design/ebpf.md describes."
fi
need=()
for pkg in "llvm-$LLVM_MAJOR-dev" libzstd-dev zlib1g-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing ${need[*]} (for bpf-linker) and no apt-get"
    [ "$(id -u)" = 0 ] || die "missing ${need[*]}: run setup as root (apt-get install ${need[*]})"
    say "installing ${need[*]} (bpf-linker links against LLVM $LLVM_MAJOR)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null \
        || die "cannot install ${need[*]} from Debian's packages"
fi
if ! bpf-linker --version 2>/dev/null | grep -q .; then
    say "installing bpf-linker (built against LLVM $LLVM_MAJOR; takes a few minutes)"
    PATH="/usr/lib/llvm-$LLVM_MAJOR/bin:$PATH" cargo install bpf-linker --version "$BPF_LINKER_VERSION" \
        --no-default-features --features "llvm-$LLVM_MAJOR" \
        || die "cannot build bpf-linker against /usr/lib/llvm-$LLVM_MAJOR (is llvm-$LLVM_MAJOR-dev installed?)"
fi
