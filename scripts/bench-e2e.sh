#!/usr/bin/env bash
# End-to-end benchmark: mosquitto + the hub (release build) + `didhub bench`, all on this machine.
#
#   scripts/bench-e2e.sh [--require signed|authenticated|authcrypt|any] -- <didhub bench args>...
#
# Starts mosquitto and the hub on free 127.0.0.1 ports in a temporary directory, runs
# `didhub bench --broker … --hub-identity … --hub-pid … --hub-db …` with the given arguments
# (e.g. `--mode signed -n 100000`), then stops both by PID (also on failure or Ctrl-C).
# The hub uses its embedded store, which the exactly-once check reads; the InfluxDB shipper is
# measured on its own by scripts/bench-ship.sh.
set -euo pipefail

require=signed
while [[ $# -gt 0 ]]; do
    case "$1" in
        --require) require=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "unknown option $1 (bench arguments go after --)" >&2; exit 64 ;;
    esac
done

# shellcheck source=scripts/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"
mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)

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
# DIDHUB_HUB_TOML=text: appended to the hub's configuration (A/B of a setting), e.g.
# DIDHUB_HUB_TOML=$'[pipeline]\nverify_linger = "0s"'.
if [[ -n ${DIDHUB_HUB_TOML:-} ]]; then printf '%s\n' "$DIDHUB_HUB_TOML" >>"$dir/hub.toml"; fi

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
