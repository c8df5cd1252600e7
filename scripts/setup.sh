#!/usr/bin/env bash
# Installs everything Moat's build and tests need on a fresh machine. Idempotent: run it as
# often as you like; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1msetup:\033[0m %s\n' "$*"; }
die() { printf '\033[1;31msetup: %s\033[0m\n' "$*" >&2; exit 1; }

command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (https://rustup.rs) first"
command -v rustup >/dev/null || die "rustup not found: Moat pins toolchains through rustup"

# System tools the dataplane and the netns test bed drive: nft (the nftables backend's
# transactions), ip (namespaces, veths, routes), iperf3 and ethtool (datapath benchmarks).
need=()
command -v nft >/dev/null || need+=(nftables)
command -v ip >/dev/null || need+=(iproute2)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v ethtool >/dev/null || need+=(ethtool)
if [ ${#need[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing ${need[*]} and no apt-get: install them with your package manager"
    [ "$(id -u)" = 0 ] || die "missing ${need[*]}: run setup as root (apt-get install ${need[*]})"
    say "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The stable toolchain the workspace is built with (rust-version in Cargo.toml).
if ! rustup run 1.95 rustc --version >/dev/null 2>&1 && ! rustc --version | grep -q ' 1\.9[5-9]\.'; then
    say "installing Rust 1.95"
    rustup toolchain install 1.95 --profile minimal --component clippy,rustfmt
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt

# Nightly: cargo-fuzz (libFuzzer instrumentation) and the eBPF program's build need it.
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    say "installing the nightly toolchain (for fuzzing and the eBPF program)"
    rustup toolchain install nightly --profile minimal \
        || die "cannot install the nightly toolchain; fuzzing needs it (rustup toolchain install nightly)"
fi

# The eBPF datapath (enforcer-ebpf/program) is Rust built for bpfel-unknown-none with the
# nightly toolchain's core sources, linked by bpf-linker against Debian's LLVM 22.
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
    say "adding rust-src to the nightly toolchain (the eBPF program builds core from source)"
    rustup component add rust-src --toolchain nightly || die "cannot add rust-src to the nightly toolchain.
  The eBPF datapath (enforcer-ebpf/program) is built with 'cargo +nightly -Z build-std=core' and
  needs it. Fix rustup's access to its dist server, or port enforcer-ebpf/program to C for
  Debian's clang-22 (still loaded by aya) as docs/design/ebpf.md describes."
fi
need=()
for pkg in llvm-22-dev libzstd-dev zlib1g-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing ${need[*]} (for bpf-linker) and no apt-get"
    [ "$(id -u)" = 0 ] || die "missing ${need[*]}: run setup as root (apt-get install ${need[*]})"
    say "installing ${need[*]} (bpf-linker links against LLVM 22)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null \
        || die "cannot install ${need[*]} from Debian's packages"
fi
if ! bpf-linker --version 2>/dev/null | grep -q .; then
    say "installing bpf-linker (built against LLVM 22; takes a few minutes)"
    PATH="/usr/lib/llvm-22/bin:$PATH" cargo install bpf-linker --version 0.13.0 \
        --no-default-features --features llvm-22 \
        || die "cannot build bpf-linker against /usr/lib/llvm-22 (is llvm-22-dev installed?)"
fi

if ! command -v cargo-nextest >/dev/null; then
    say "installing cargo-nextest"
    cargo install cargo-nextest --version 0.9.143 --locked
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    say "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

# The Helm chart's checkers (helm, kubernetes-validate) into .tools/.
./scripts/chart-tools.sh

say "fetching crates"
cargo fetch --locked
say "ready"
