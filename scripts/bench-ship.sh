#!/usr/bin/env bash
# Ship benchmark: the hub's shipper alone → a VictoriaMetrics started here (issue 5, target 5).
#
#   scripts/bench-ship.sh [<didhub bench args>...]     e.g. -n 1000000 --ship-encoding identity
#
# Starts victoria-metrics (Debian package) on a free 127.0.0.1 port in a temporary directory
# with -dedup.minScrapeInterval=1ms (a re-sent point must not double) and
# -search.latencyOffset=0s, then runs the release build's
# `didhub bench --ship-to http://127.0.0.1:<port> --ship-store-pid <vm> "$@"`, and stops
# VictoriaMetrics by PID on exit (also on failure or Ctrl-C).
# DIDHUB_PERF=file: profile the bench process during the drain (perf record -g -p).
# DIDHUB_STORE_PPROF=file: VictoriaMetrics' own CPU profile of 4 s of the drain (its
# /debug/pprof/profile, with function names), summarised by scripts/pprof-top.py.
set -euo pipefail

# shellcheck source=scripts/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"

port=$(free_port)
"$vm" -httpListenAddr "127.0.0.1:$port" -storageDataPath "$dir/vm" \
    -dedup.minScrapeInterval 1ms -search.latencyOffset 0s -loggerLevel WARN \
    >"$dir/vm.log" 2>&1 &
vm_pid=$!
pids+=($vm_pid)
ready=
for _ in $(seq 1 100); do
    if curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; then ready=1; break; fi
    kill -0 "$vm_pid" 2>/dev/null || break
    sleep 0.1
done
[[ -n $ready ]] || { echo "victoria-metrics did not start:" >&2; cat "$dir/vm.log" >&2; exit 1; }

cmd=("$didhub" bench --ship-to "http://127.0.0.1:$port" --ship-store-pid "$vm_pid" "$@")

# Starts the bench in the background (PID in $bench) and returns once the outbox is filled and
# the drain begins ("shipping N points …"), so that a profile covers the drain only.
start_drain() {
    "${cmd[@]}" 2> >(tee "$dir/bench.err" >&2) &
    bench=$!
    pids+=($bench)
    until grep -q '^shipping ' "$dir/bench.err" 2>/dev/null; do
        kill -0 "$bench" 2>/dev/null || break
        sleep 0.05
    done
}

if [[ -n ${DIDHUB_STORE_PPROF:-} ]]; then
    start_drain
    curl -fsS -o "$DIDHUB_STORE_PPROF" "http://127.0.0.1:$port/debug/pprof/profile?seconds=4"
    status=0
    wait "$bench" || status=$?
    python3 "$(dirname "$0")/pprof-top.py" "$DIDHUB_STORE_PPROF" 15 25
    exit $status
fi
if [[ -z ${DIDHUB_PERF:-} ]]; then
    "${cmd[@]}"
    exit
fi
start_drain
perf record ${DIDHUB_PERF_ARGS:--g} -F 999 -o "$DIDHUB_PERF" -p "$bench" >"$dir/perf.log" 2>&1 &
perf_pid=$!
pids+=($perf_pid)
status=0
wait "$bench" || status=$?
kill -INT "$perf_pid" 2>/dev/null || true
wait "$perf_pid" 2>/dev/null || true
exit $status
