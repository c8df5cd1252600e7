#!/usr/bin/env bash
# The policy server alone, on the embedded default: the file source on
# examples/, its state (sled) in .moat/server, mutual TLS with quick-start certificates in
# .moat/certs (created on first run). Extra arguments go to moat-server.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q -p moat-server -p moat-cli
bin=target/release
if [ ! -f .moat/certs/ca.pem ]; then
    "$bin/moatctl" certs init --dir .moat/certs
    "$bin/moatctl" certs issue-admin --dir .moat/certs --name admin
    for node in node-1 node-2 node-3; do
        "$bin/moatctl" certs issue-node --dir .moat/certs --node "$node"
    done
fi
echo "moat-server: sync+admin on https://127.0.0.1:7443 (mTLS), health 127.0.0.1:7444, metrics http://127.0.0.1:7445/metrics"
echo "try, in another shell:  $bin/moatctl status"
exec "$bin/moat-server" --source dir:examples "$@"
