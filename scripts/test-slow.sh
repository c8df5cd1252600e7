#!/usr/bin/env bash
# The slow tests CI leaves out (as root, after ./scripts/setup.sh): the tests marked
# `#[ignore = "slow: …"]`, today the ClusterNetworkPolicy conformance cases on packets with
# each dataplane alone (CI runs them on the cluster mixing both). See
# /work/helper-cnp-README.md for what each covers and how long it takes.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

cargo nextest run --locked -p moat-integration --test conformance_cnp_packets --run-ignored only "$@"
