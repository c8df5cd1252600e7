#!/usr/bin/env bash
# The Helm chart, checked for real: `helm lint`, and `helm template` with the default, the
# multi-cluster and the remote-cluster values validated against the official schemas of
# the oldest and newest Kubernetes the chart supports. Run scripts/chart-tools.sh first
# (setup.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
helm=.tools/bin/helm
validate=.tools/bin/kubernetes-validate
[ -x "$helm" ] && [ -x "$validate" ] || { echo "chart tools missing: run ./scripts/setup.sh" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for values in "" charts/moat/ci/multi-cluster-values.yaml charts/moat/ci/remote-cluster-values.yaml charts/moat/ci/cnp-status-values.yaml; do
    name=${values:+$(basename "$values" .yaml)}
    name=${name:-default}
    args=()
    [ -n "$values" ] && args=(-f "$values")
    "$helm" lint --strict charts/moat "${args[@]}"
    "$helm" template moat charts/moat --namespace moat-system "${args[@]}" > "$out/$name.yaml"
    for k in 1.30.0 1.34.0; do
        "$validate" --strict --quiet -k "$k" "$out/$name.yaml"
    done
    echo "chart: $name values render $(grep -c '^kind:' "$out/$name.yaml") valid objects (Kubernetes 1.30 and 1.34 schemas)"
done
