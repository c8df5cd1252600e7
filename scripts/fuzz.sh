#!/usr/bin/env bash
# Runs every fuzz target for N seconds (default 30), starting from the committed seeds.
# A crash fails the run and leaves the input under fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-30}"
mkdir -p logs
for target in manifest_loader compiler_events; do
    mkdir -p "corpus/$target"
    echo "fuzz: $target for ${seconds}s"
    if ! cargo +nightly fuzz run "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"logs/$target.log" 2>&1; then
        tail -n 60 "logs/$target.log"
        echo "fuzz: $target FAILED (input saved under fuzz/artifacts/$target/)" >&2
        exit 1
    fi
    grep -E '^(Done|stat::number_of_executed_units|stat::new_units_added)' "logs/$target.log" || true
done
