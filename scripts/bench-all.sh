#!/usr/bin/env bash
# Every measurement behind BENCHMARKS.md, in order, each printed as the table `didhub bench`
# prints (and saved in $OUT, default ./bench-results/<UTC time>/).
#
#   scripts/bench-all.sh            # everything (about 10 minutes on 2 cores)
#   QUICK=1 scripts/bench-all.sh    # smaller N everywhere (a few minutes), for a smoke run
#
# Needs mosquitto and victoria-metrics (scripts/test.sh installs both). Run it on an otherwise
# idle machine: the load average is printed with every figure.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release --quiet
export DIDHUB_BIN="${CARGO_TARGET_DIR:-$root/target}/release/didhub"
B=$DIDHUB_BIN
OUT=${OUT:-bench-results/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"

q() { if [[ -n ${QUICK:-} ]]; then echo "$2"; else echo "$1"; fi; }

run() {
    local name=$1
    shift
    sync # what the run before left dirty must not be written back during this one
    echo "### $name: $*" | tee "$OUT/$name.txt"
    "$@" 2>/dev/null | tee -a "$OUT/$name.txt"
    echo
}

# Targets 1, 2 and 4: in process.
run inproc-signed-w2 "$B" bench --in-process --mode signed --workers 2 -n "$(q 100000 20000)" --bare-limit 20000
run inproc-signed-w1 "$B" bench --in-process --mode signed --workers 1 -n "$(q 100000 20000)" --bare-limit 20000
run inproc-signed-w1-one-core taskset -c 0 "$B" bench --in-process --mode signed --workers 1 -n "$(q 50000 10000)" --bare-limit 10000
run inproc-signed-w2-no-fast-path "$B" bench --in-process --mode signed --workers 2 --no-fast-path -n "$(q 50000 10000)" --bare-limit 10000
run inproc-authcrypt-w2 "$B" bench --in-process --mode authcrypt --workers 2 -n "$(q 50000 10000)" --bare-limit 20000
run inproc-authcrypt-w1 "$B" bench --in-process --mode authcrypt --workers 1 -n "$(q 50000 10000)" --bare-limit 20000
run inproc-plaintext-w2 "$B" bench --in-process --mode plaintext --workers 2 -n "$(q 200000 50000)" --bare-limit 50000
# The pipeline at a moderate rate, posts arriving at random (Poisson): ordered and random ids.
run inproc-signed-w2-5k "$B" bench --in-process --mode signed --workers 2 --rate 5000 -n "$(q 50000 10000)" --bare-limit 10000
run inproc-signed-w2-5k-random-ids "$B" bench --in-process --mode signed --workers 2 --rate 5000 -n "$(q 50000 10000)" --bare-limit 10000 --random-ids

# Targets 1, 3 and 6: end to end through mosquitto.
run e2e-signed-full scripts/bench-e2e.sh -- --mode signed -n "$(q 100000 20000)" --bare-limit 20000
# At 5k/s the ratio moves by ±0.1 between runs on this machine: three runs, and one with
# random (UUIDv4) message ids instead of ordered ones.
for i in 1 2 3; do
    run "e2e-signed-5k-$i" scripts/bench-e2e.sh -- --mode signed -n "$(q 50000 10000)" --rate 5000 --bare-limit 5000
done
run e2e-signed-5k-random-ids scripts/bench-e2e.sh -- --mode signed -n "$(q 50000 10000)" --rate 5000 --bare-limit 5000 --random-ids
run e2e-signed-10k-rss scripts/bench-e2e.sh -- --mode signed -n "$(q 200000 20000)" --rate 10000 --bare-limit 5000
run e2e-signed-15k-60s scripts/bench-e2e.sh -- --mode signed -n "$(q 900000 30000)" --rate 15000 --bare-limit 5000
run e2e-authcrypt-full scripts/bench-e2e.sh --require authenticated -- --mode authcrypt -n "$(q 40000 10000)" --bare-limit 20000
run e2e-signed-100k-dids scripts/bench-e2e.sh -- --mode signed --devices "$(q 100000 20000)" -n "$(q 300000 40000)" --bare-limit 2000

# Target 5: the shipper.
run ship-gzip scripts/bench-ship.sh -n "$(q 1000000 200000)" --ship-batch 5000 --ship-encoding gzip
run ship-identity scripts/bench-ship.sh -n "$(q 1000000 200000)" --ship-batch 5000 --ship-encoding identity
run ship-gzip-1 scripts/bench-ship.sh -n "$(q 1000000 200000)" --ship-batch 5000 --ship-encoding gzip --ship-in-flight 1

# Target 7: cost as N grows.
for n in $(q "10000 100000 1000000" "10000 50000"); do
    run "inproc-signed-w2-n$n" "$B" bench --in-process --mode signed --workers 2 -n "$n" --bare-limit 20000
done

echo "results in $OUT"
