#!/usr/bin/env bash
# Runs one integration test many times in a row, optionally beside busy loops, to show a
# timing-sensitive guarantee holds (or to catch a rare failure with its log). As root, like
# the privileged tests. Never run in CI.
#
#   ./scripts/soak.sh BINARY TEST [RUNS=200] [HOGS=1]
#   ./scripts/soak.sh enforcement nft::an_enforcer_killed_mid_apply_never_opens_or_breaks_anything
#
# The test and the binaries it runs are built once and copied aside first, so editing or
# rebuilding the tree meanwhile changes nothing under test. Each run's result goes to
# target/soak/<test>/summary (with its duration and the load average); a failing run's whole
# output is kept as fail-<n>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:?usage: soak.sh BINARY TEST [RUNS] [HOGS]}
test=${2:?usage: soak.sh BINARY TEST [RUNS] [HOGS]}
runs=${3:-200}
hogs=${4:-1}

export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo build -q --workspace --bins
exe=$(cargo test -q -p moat-integration --test "$bin" --no-run --message-format=json |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])')
out="target/soak/${test//::/-}"
rm -rf "$out"
mkdir -p "$out/frozen/deps"
# The harness finds the binaries beside the test's directory (integration/src/lib.rs, `binary`).
find target/debug -maxdepth 1 -type f -executable -exec cp {} "$out/frozen/" \;
cp "$exe" "$out/frozen/deps/$bin"
git describe --always --dirty --abbrev=7 > "$out/commit"

pids=()
for ((h = 0; h < hogs; h++)); do
    (while :; do :; done) &
    pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

pass=0
fail=0
for ((i = 1; i <= runs; i++)); do
    start=$(date +%s.%N)
    if "$out/frozen/deps/$bin" --exact "$test" --test-threads 1 --nocapture >"$out/run.log" 2>&1; then
        pass=$((pass + 1))
        r=ok
    else
        fail=$((fail + 1))
        r=FAIL
        cp "$out/run.log" "$out/fail-$i.log"
    fi
    took=$(python3 -c "import time; print(f'{time.time() - $start:.1f}')")
    # The test's own last line of figures, if it prints one (libtest puts it after "test
    # NAME ... " on the same line).
    said=$(grep -av '^running\|^$\|^test result' "$out/run.log" | tail -n 1 || true)
    echo "$i $r ${took}s load=$(cut -d' ' -f1 /proc/loadavg) $said" >>"$out/summary"
done
echo "commit $(cat "$out/commit"): $pass passed, $fail failed of $runs runs beside $hogs busy loop(s)" |
    tee -a "$out/summary"
[ "$fail" -eq 0 ]
