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

# Nightly: cargo-fuzz (libFuzzer instrumentation) needs it.
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    say "installing the nightly toolchain (for fuzzing)"
    rustup toolchain install nightly --profile minimal \
        || die "cannot install the nightly toolchain; fuzzing needs it (rustup toolchain install nightly)"
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
