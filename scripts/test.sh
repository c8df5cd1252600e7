#!/usr/bin/env bash
# Every test: formatting, lints, unit/property/integration tests, conformance, fuzzing.
# Run ./scripts/setup.sh first on a fresh machine. Benchmarks are not run here (see
# docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
# A one-shot run gains nothing from incremental caches, which are the bulk of target/ on disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "format"
cargo fmt --all --check
cargo fmt --manifest-path fuzz/Cargo.toml --check

step "lints"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "Helm chart (helm lint, helm template | kubernetes-validate)"
./scripts/chart-check.sh

step "tests (unit, property, conformance, integration)"
cargo nextest run --workspace --locked

step "conformance in model mode (moatctl)"
cargo run -q --locked -p moat-cli -- conformance --cases conformance/upstream/netpol --mode model | tail -n 1
cargo run -q --locked -p moat-cli -- conformance --cases conformance/cases --mode model | tail -n 1
cargo run -q --locked -p moat-cli -- conformance --cases conformance/upstream/cnp --mode model | tail -n 1
cargo run -q --locked -p moat-cli -- conformance --cases conformance/cases/cnp --mode model | tail -n 1

step "fuzzing (${MOAT_FUZZ_SECONDS:-30} s per target)"
./scripts/fuzz.sh "${MOAT_FUZZ_SECONDS:-30}"

step "all tests passed"
