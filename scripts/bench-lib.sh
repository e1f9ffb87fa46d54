# Shared by the bench scripts (sourced): the didhub build, a temp dir, free ports, and servers
# that are stopped by PID when the script exits (also on failure or Ctrl-C).

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# DIDHUB_BIN=path: use that binary (e.g. to compare two builds) instead of building.
if [[ -n ${DIDHUB_BIN:-} ]]; then
    didhub=$DIDHUB_BIN
else
    cargo build --release --quiet --manifest-path "$root/Cargo.toml"
    didhub="${CARGO_TARGET_DIR:-$root/target}/release/didhub"
fi
vm=$(command -v victoria-metrics || command -v victoria-metrics-prod || echo /usr/bin/victoria-metrics)

# Write back what earlier work left dirty (a build, the last benchmark's store) first: the
# kernel's writeback of it delays the hub's fsyncs (1.5 GB left by `dd`: publish → committed p99
# 9.3-10.8 ms → 122 ms at 10k posts/s, commits of 440-873 posts taking 75-136 ms).
sync
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
