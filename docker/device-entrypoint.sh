#!/bin/sh
# The simulated device of docker-compose.yml: makes a device identity once (kept in its own
# volume), waits for the hub to publish its DID (state_dir/hub.did, written on every start of
# the hub), then sends signed DIDComm posts at a steady rate.
#
# A real device learns the hub DID out of band (`didhub identity` on the hub); reading it from
# the hub's state volume is a shortcut of this demo (that volume also holds the hub's secrets,
# so a real device must never see it).
set -eu
HUB_DID_FILE="${HUB_DID_FILE:-/var/lib/didhub/hub.did}"
IDENTITY="${DEVICE_IDENTITY:-/var/lib/didhub-device/identity.json}"
BROKER="${DEVICE_BROKER:-mqtt://mosquitto:1884}"
NAME="${DEVICE_NAME:-sim-1}"
TOPIC="${DEVICE_TOPIC:-devices/$NAME/telemetry}"
DEFAULT_PAYLOAD='{"temp":21.5,"humidity":40.2,"battery":{"voltage":3.71}}'
PAYLOAD="${DEVICE_PAYLOAD:-$DEFAULT_PAYLOAD}"
COUNT="${DEVICE_COUNT:-100000}"
RATE="${DEVICE_RATE:-2}"
WAIT="${HUB_DID_WAIT_SECONDS:-300}"

if [ ! -s "$IDENTITY" ]; then
  didhub keygen --out "$IDENTITY"
fi

waited=0
while [ ! -s "$HUB_DID_FILE" ]; do
  if [ "$waited" -ge "$WAIT" ]; then
    echo "device: no hub DID in $HUB_DID_FILE after ${WAIT}s; is the didhub service running?" >&2
    exit 1
  fi
  if [ "$waited" -eq 0 ]; then
    echo "device: waiting for the hub to write $HUB_DID_FILE" >&2
  fi
  sleep 1
  waited=$((waited + 1))
done
HUB_DID="$(head -n 1 "$HUB_DID_FILE")"

echo "device: sending $COUNT posts at $RATE/s to $HUB_DID on $BROKER topic $TOPIC" >&2
exec didhub send \
  --identity "$IDENTITY" \
  --to "$HUB_DID" \
  --broker "$BROKER" \
  --topic "$TOPIC" \
  --payload "$PAYLOAD" \
  --count "$COUNT" \
  --rate "$RATE" \
  --seq-field seq
