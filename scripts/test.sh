#!/usr/bin/env bash
# Lints and tests didhub. The integration tests start their own mosquitto and VictoriaMetrics on
# free 127.0.0.1 ports; this script makes sure those programs are installed first.
#
#   bash scripts/test.sh            # from anywhere; exit code is that of the first failing step
set -euo pipefail

cd "$(dirname "$0")/.."

# mosquitto lives in /usr/sbin, which is not on every user's PATH.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

# program -> Debian package that provides it
declare -A PACKAGE_OF=(
  [mosquitto]=mosquitto
  [mosquitto_sub]=mosquitto-clients
  [mosquitto_pub]=mosquitto-clients
  [victoria-metrics]=victoria-metrics
  [stdbuf]=coreutils
  [systemd-analyze]=systemd
  [docker-compose]=docker-compose
  [openssl]=openssl
)

missing_packages() {
  local prog pkgs=()
  for prog in "${!PACKAGE_OF[@]}"; do
    command -v "$prog" >/dev/null 2>&1 || pkgs+=("${PACKAGE_OF[$prog]}")
  done
  if ((${#pkgs[@]})); then
    printf '%s\n' "${pkgs[@]}" | sort -u | paste -sd' ' -
  fi
}

# Stops a system service the package installation just started: the tests never use it (they
# run their own servers on free ports), it would only hold port 1883 or 8428.
stop_service_if_running() {
  local svc=$1
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    echo "==> stopping the $svc service started by its package (tests use their own instances)"
    systemctl stop "$svc" || true
  elif command -v service >/dev/null 2>&1 && service "$svc" status >/dev/null 2>&1; then
    echo "==> stopping the $svc service started by its package (tests use their own instances)"
    service "$svc" stop || true
  fi
}

need=$(missing_packages)
if [[ -n "$need" ]]; then
  if [[ "$(id -u)" -ne 0 ]]; then
    echo "error: the integration tests need these Debian packages: $need" >&2
    echo "install them with:  sudo apt-get install -y $need" >&2
    exit 1
  fi
  echo "==> installing $need"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  # shellcheck disable=SC2086 # word splitting of the package list is intended
  apt-get install -y --no-install-recommends $need
  for pkg in $need; do
    case "$pkg" in
      mosquitto) stop_service_if_running mosquitto ;;
      victoria-metrics) stop_service_if_running victoria-metrics ;;
    esac
  done
  need=$(missing_packages)
  if [[ -n "$need" ]]; then
    echo "error: still missing after apt-get install: $need" >&2
    exit 1
  fi
fi

# Debian's victoria-metrics prints an empty `-version`: ask dpkg where there is one.
if command -v dpkg-query >/dev/null 2>&1; then
  echo "==> $(dpkg-query -W -f='${Package} ${Version}  ' mosquitto mosquitto-clients victoria-metrics 2>/dev/null || true)"
else
  echo "==> $(mosquitto -h 2>/dev/null | head -n1 || true)"
fi

# rustfmt and clippy are rustup components a minimal toolchain may lack.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  if command -v rustup >/dev/null 2>&1; then
    rustup component add rustfmt clippy
  else
    echo "error: cargo fmt / cargo clippy not available and no rustup to add them" >&2
    exit 1
  fi
fi

export RUST_LIB_BACKTRACE="${RUST_LIB_BACKTRACE:-0}"

echo "==> cargo fmt --all -- --check"
cargo fmt --all -- --check
echo "==> cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
echo "==> cargo test --all-targets"
cargo test --all-targets

# The fuzz targets are a workspace of their own (fuzz/, built by `cargo fuzz`), which nothing
# above compiles: check that they still build against the library (once, an API change left
# them broken for a session). In a temporary target directory beside the main one (not /tmp,
# which may be a small tmpfs), removed afterwards (~700 MB). libfuzzer-sys compiles libFuzzer
# with a C++ compiler.
if command -v c++ >/dev/null 2>&1; then
  echo "==> cargo check --manifest-path fuzz/Cargo.toml --bins"
  main_target=${CARGO_TARGET_DIR:-target}
  mkdir -p "$main_target"
  fuzz_target=$(mktemp -d "$main_target/fuzz-check.XXXXXX")
  trap 'rm -rf "$fuzz_target"' EXIT
  CARGO_TARGET_DIR="$fuzz_target" cargo check --manifest-path fuzz/Cargo.toml --bins
else
  echo "==> not checking the fuzz targets: no C++ compiler (c++) for libFuzzer"
fi
