#!/usr/bin/env bash
# Installs everything Moat's build and tests need on a fresh machine. Idempotent: run it as
# often as you like; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=versions.env
. scripts/versions.env

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

# The toolchains and linker that build the binaries and the eBPF program (also what the
# image's build stage runs).
./scripts/toolchain.sh

if ! command -v cargo-nextest >/dev/null; then
    say "installing cargo-nextest"
    cargo install cargo-nextest --version "$NEXTEST_VERSION" --locked
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    say "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

# The container image path (scripts/image.sh): Debian's buildah and podman, mmdebstrap (a
# local base root filesystem where no registry is reachable), runc, uidmap.
need=()
for tool in buildah:buildah podman:podman mmdebstrap:mmdebstrap runc:runc newuidmap:uidmap; do
    command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing ${need[*]} (for the image) and no apt-get"
    [ "$(id -u)" = 0 ] || die "missing ${need[*]}: run setup as root (apt-get install ${need[*]})"
    say "installing ${need[*]} (the container image)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# runc, as crun refuses hybrid cgroup hierarchies (this kind of machine's); no default
# rlimits, which an unprivileged build may not raise; no default sysctls, which runc refuses
# in a namespace it did not create (the harness's nodes) and Kubernetes does not set for
# host-network pods.
if [ "$(id -u)" = 0 ]; then
    conf=/etc/containers/containers.conf.d/50-moat.conf
    want=$'# Written by Moat\'s scripts/setup.sh.\n[containers]\ndefault_ulimits = []\ndefault_sysctls = []\n\n[engine]\nruntime = "runc"'
    if [ "$(cat "$conf" 2>/dev/null)" != "$want" ]; then
        say "configuring containers ($conf)"
        mkdir -p "$(dirname "$conf")"
        printf '%s\n' "$want" > "$conf"
    fi
fi

# The Helm chart's checkers (helm, kubernetes-validate) into .tools/.
./scripts/chart-tools.sh

say "fetching crates"
cargo fetch --locked
say "ready"
