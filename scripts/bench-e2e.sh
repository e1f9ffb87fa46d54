#!/usr/bin/env bash
# End-to-end benchmark: mosquitto + the hub (release build) + `didhub bench`, all on this machine.
#
#   scripts/bench-e2e.sh [--require signed|authenticated|authcrypt|any] [--store embedded|influx] -- <didhub bench args>...
#
# Starts mosquitto and the hub on free 127.0.0.1 ports in a temporary directory, runs
# `didhub bench --broker … --hub-identity … --hub-pid … --hub-db …` with the given arguments
# (e.g. `--mode signed -n 100000`), then stops both by PID (also on failure or Ctrl-C).
# With `--store influx` the hub writes to a VictoriaMetrics it starts (needs victoria-metrics).
set -euo pipefail

require=signed
store=embedded
while [[ $# -gt 0 ]]; do
    case "$1" in
        --require) require=$2; shift 2 ;;
        --store) store=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "unknown option $1 (bench arguments go after --)" >&2; exit 64 ;;
    esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
# DIDHUB_BIN=path: use that binary (e.g. to compare two builds) instead of building.
if [[ -n ${DIDHUB_BIN:-} ]]; then
    didhub=$DIDHUB_BIN
else
    cargo build --release --quiet --manifest-path "$root/Cargo.toml"
    didhub="${CARGO_TARGET_DIR:-$root/target}/release/didhub"
fi
mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)

dir=$(mktemp -d /tmp/didhub-bench.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$dir"
}
trap cleanup EXIT INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

mq_port=$(free_port)
cat >"$dir/mosquitto.conf" <<EOF
listener $mq_port 127.0.0.1
allow_anonymous true
max_queued_messages 0
max_inflight_messages 0
EOF
"$mosquitto" -c "$dir/mosquitto.conf" >"$dir/mosquitto.log" 2>&1 &
pids+=($!)

store_toml='[store]
kind = "embedded"'
if [[ $store == influx ]]; then
    vm_port=$(free_port)
    vm=$(command -v victoria-metrics || command -v victoria-metrics-prod || echo /usr/bin/victoria-metrics)
    "$vm" -httpListenAddr "127.0.0.1:$vm_port" -storageDataPath "$dir/vm" -dedup.minScrapeInterval 1ms \
        >"$dir/vm.log" 2>&1 &
    pids+=($!)
    store_toml="[store]
kind = \"influxdb\"
[store.influxdb]
url = \"http://127.0.0.1:$vm_port\"
organization = \"bench\"
bucket = \"bench\"
token = \"unused\""
fi

http_port=$(free_port)
mkdir -p "$dir/state"
cat >"$dir/hub.toml" <<EOF
state_dir = "$dir/state"
stats_interval = "0s"
[mqtt]
url = "mqtt://127.0.0.1:$mq_port"
client_id = "didhub-bench-hub"
clean_session = false
inflight = 100
[broker]
embedded = false
[http]
listen = "127.0.0.1:$http_port"
[log]
level = "warn"
$store_toml
[[routes]]
name = "telemetry"
topics = ["devices/+/telemetry"]
qos = 1
require = "$require"
senders = "any-verified"
measurement = "telemetry"
EOF

# DIDHUB_HUB_BIN=path: run that hub binary (A/B comparisons), with this build as the generator.
"${DIDHUB_HUB_BIN:-$didhub}" --config "$dir/hub.toml" run >"$dir/hub.log" 2>&1 &
hub=$!
pids+=($hub)
for _ in $(seq 1 100); do
    [[ -s $dir/state/identity.json && -e $dir/state/didhub.db ]] && break
    sleep 0.1
done
sleep 0.5
kill -0 "$hub" 2>/dev/null || { echo "the hub did not start:" >&2; cat "$dir/hub.log" >&2; exit 1; }

# DIDHUB_PERF=file: profile the hub during the run (perf record -g -p <hub>).
if [[ -n ${DIDHUB_PERF:-} ]]; then
    perf record -g -F 999 -o "$DIDHUB_PERF" -p "$hub" >"$dir/perf.log" 2>&1 &
    perf_pid=$!
    sleep 0.5
fi

"$didhub" bench --broker "mqtt://127.0.0.1:$mq_port" --hub-identity "$dir/state/identity.json" \
    --hub-pid "$hub" --hub-db "$dir/state/didhub.db" --hub-metrics "http://127.0.0.1:$http_port/metrics" "$@"

if [[ -n ${DIDHUB_PERF:-} ]]; then
    kill -INT "$perf_pid" && wait "$perf_pid" || true
fi
