#!/usr/bin/env bash
# The main job on its embedded default: the example cluster (examples/cluster.yaml and
# examples/three-tier/) as network namespaces on this machine, the real policy server (file
# source, sled, mutual TLS) and a real enforcer on every node (eBPF where the kernel can run
# it, else nftables: --backend auto); prints the
# reachability matrix probed with real packets before and after the example policies, and
# every node's sync status. Needs root. Extra arguments go to `moatctl demo` (e.g. --hold).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run.sh needs root (network namespaces, BPF, nftables)" >&2; exit 1; }
cargo build --release --locked -q -p moat-server -p moat-cli -p moat-enforcer -p moat-harness
exec target/release/moatctl demo "$@"
