#!/bin/sh
# One-shot `init` service of docker-compose.yml (runs in the eclipse-mosquitto:2 image, which
# has mosquitto_passwd). Idempotent: runs on every `docker compose up` and rewrites:
#   /secrets/mosquitto/passwd      the broker's password file (hashed), owner mosquitto (1883)
#   /secrets/didhub/mqtt-password  the hub's MQTT password, owner didhub (10001), mode 0400
#   /secrets/didhub/influx-token   the InfluxDB token the hub writes with, owner didhub, 0400
# from MQTT_HUB_PASSWORD and INFLUX_TOKEN (set them in .env next to docker-compose.yml).
#
# Without compose, the same password file comes from:
#   mosquitto_passwd -c /etc/mosquitto/passwd didhub     (asks for the password)
#   mosquitto_passwd -b /etc/mosquitto/passwd USER PASS  (adds or changes a user)
# mosquitto 2 started as root drops to user mosquitto before it reads the file: chown it.
set -eu
: "${MQTT_HUB_PASSWORD:?set MQTT_HUB_PASSWORD}"
: "${INFLUX_TOKEN:?set INFLUX_TOKEN}"
DIDHUB_UID="${DIDHUB_UID:-10001}"
MOSQUITTO_UID="${MOSQUITTO_UID:-1883}"

umask 077
mkdir -p /secrets/mosquitto /secrets/didhub

passwd=/secrets/mosquitto/passwd
rm -f "$passwd.new"
touch "$passwd.new"
mosquitto_passwd -b "$passwd.new" didhub "$MQTT_HUB_PASSWORD"
mv "$passwd.new" "$passwd"
chown -R "$MOSQUITTO_UID:$MOSQUITTO_UID" /secrets/mosquitto
chmod 0700 /secrets/mosquitto
chmod 0600 "$passwd"

printf '%s\n' "$MQTT_HUB_PASSWORD" > /secrets/didhub/mqtt-password
printf '%s\n' "$INFLUX_TOKEN" > /secrets/didhub/influx-token
chown -R "$DIDHUB_UID:$DIDHUB_UID" /secrets/didhub
chmod 0500 /secrets/didhub
chmod 0400 /secrets/didhub/mqtt-password /secrets/didhub/influx-token

echo "init-secrets: wrote $passwd (user didhub) and the hub's secrets"
