#!/usr/bin/env bash
# The main job on its embedded default: the example cluster (examples/cluster.yaml and
# examples/three-tier/) as network namespaces on this machine, the real policy server (file
# source, sled, mutual TLS) and a real enforcer on every node (eBPF where the kernel can run
# it, else nftables: --backend auto); prints the
# reachability matrix probed with real packets before and after the example policies, and
# every node's sync status. Needs root. Extra arguments go to `moatctl demo` (e.g. --hold).
#
#   ./scripts/run.sh --image            builds the image (scripts/image.sh) and runs the server
#                                       and enforcers as its containers, under the Helm
#                                       chart's security context (`moatctl demo --image`)
#   ./scripts/run.sh --image=REF        the same with an image already built
#   ./scripts/run.sh --image --seccomp podman   the chart's RuntimeDefault as podman's (and
#                                       CRI-O's) profile instead of containerd's; `chart`: the
#                                       enforcer under the chart's own profile
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run.sh needs root (network namespaces, BPF, nftables)" >&2; exit 1; }
image=
args=()
for a in "$@"; do
    case "$a" in
        --image) image=build ;;
        --image=*) image=${a#--image=} ;;
        *) args+=("$a") ;;
    esac
done
cargo build --release --locked -q -p moat-server -p moat-cli -p moat-enforcer -p moat-harness
if [ "$image" = build ]; then
    image=localhost/moat:dev
    ./scripts/image.sh --tag "$image"
fi
[ -n "$image" ] && args+=(--image "$image")
exec target/release/moatctl demo "${args[@]}"
