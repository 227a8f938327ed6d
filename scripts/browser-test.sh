#!/usr/bin/env bash
# Browser tests: Debian's chromium driven by playwright-core (tests/browser/*.test.mjs).
#
#   scripts/browser-test.sh                    # against ferrymq (target/release or target/debug)
#   BROKER=mosquitto scripts/browser-test.sh   # against mosquitto's websockets listener
#   scripts/browser-test.sh tests/browser/mqtt-ws.test.mjs   # some tests only
#
# Installs what it needs, each only when missing: chromium, an emoji font (and node/npm,
# mosquitto) from Debian with one `apt-get update`, and tests/browser/node_modules from the
# committed package-lock.json (`npm ci`). Starts the broker on free loopback ports, runs the tests with
# node's test runner, stops the broker. Screenshots go to target/screenshots/.
# Env: BROKER=ferrymq|mosquitto (default ferrymq), FERRYMQ_BIN (default: the newer of
# target/release/ferrymq and target/debug/ferrymq; built if neither exists), CHROMIUM.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
BROKER=${BROKER:-ferrymq}
DIR=tests/browser

# retry, apt_install (scripts/test.sh may have updated the package lists already), free_port,
# scratch_dir.
source scripts/lib.sh

[ -x "${CHROMIUM:-/usr/bin/chromium}" ] || apt_install chromium
# Emoji in screenshots (the tests themselves read text, not pixels).
[ -e /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || apt_install fonts-noto-color-emoji
{ command -v node && command -v npm; } >/dev/null || apt_install nodejs npm
if [ "$BROKER" = mosquitto ] && ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
  apt_install mosquitto
fi

# node_modules matches the lock: npm ci (clean) when the lock changed since the last install.
if ! cmp -s "$DIR/package-lock.json" "$DIR/node_modules/.ferrymq-lock" 2>/dev/null; then
  (cd "$DIR" && retry npm ci --no-audit --no-fund --loglevel=error)
  cp "$DIR/package-lock.json" "$DIR/node_modules/.ferrymq-lock"
fi

scratch_dir

WS_PORT=$(free_port)
case "$BROKER" in
  mosquitto)
    MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
    # mosquitto 2.0.11 (Debian 12) exits with "Unable to start any listening sockets" when
    # its only listener is a websockets one: it gets a TCP listener too.
    cat >"$WORK/mosquitto.conf" <<EOF
listener $WS_PORT 127.0.0.1
protocol websockets
listener $(free_port) 127.0.0.1
allow_anonymous true
EOF
    "$MOSQUITTO" -c "$WORK/mosquitto.conf" >"$WORK/broker.log" 2>&1 &
    PID=$!
    PIDS+=("$PID")
    ;;
  ferrymq)
    BIN=${FERRYMQ_BIN:-}
    if [ -z "$BIN" ]; then
      for b in target/release/ferrymq target/debug/ferrymq; do
        if [ -x "$b" ] && { [ -z "$BIN" ] || [ "$b" -nt "$BIN" ]; }; then BIN=$b; fi
      done
    fi
    if [ -z "$BIN" ]; then
      cargo build -q -p ferrymq
      BIN=target/debug/ferrymq
    fi
    MQTT_PORT=$(free_port)
    HTTP_PORT=$(free_port)
    TOKEN=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
    export FERRYMQ_HTTP_URL="http://127.0.0.1:$HTTP_PORT" FERRYMQ_MQTT_URL="mqtt://127.0.0.1:$MQTT_PORT"
    export FERRYMQ_ADMIN_TOKEN="$TOKEN"
    # listeners.ws is MQTT over WebSocket (path /mqtt by default; issue 12).
    cat >"$WORK/ferrymq.toml" <<EOF
[listeners]
mqtt = "127.0.0.1:$MQTT_PORT"
http = "127.0.0.1:$HTTP_PORT"
ws = "127.0.0.1:$WS_PORT"

[admin]
token = "$TOKEN"

[storage]
persistence = false

[sys]
interval_secs = 0
EOF
    "$BIN" serve --config "$WORK/ferrymq.toml" --data-dir "$WORK/data" >"$WORK/broker.log" 2>&1 &
    PID=$!
    PIDS+=("$PID")
    ;;
  *)
    echo "BROKER must be ferrymq or mosquitto, not $BROKER" >&2
    exit 2
    ;;
esac

# Up when its WebSocket port accepts connections (at most 30 s).
for _ in $(seq 300); do
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "$BROKER exited at start:" >&2
    cat "$WORK/broker.log" >&2
    exit 1
  fi
  if (exec 3<>"/dev/tcp/127.0.0.1/$WS_PORT") 2>/dev/null; then break; fi
  sleep 0.1
done

TESTS=("$@")
[ ${#TESTS[@]} -gt 0 ] || TESTS=("$DIR"/*.test.mjs)
export MQTT_WS_URL="ws://127.0.0.1:$WS_PORT/mqtt" BROKER
export SCREENSHOTS="$ROOT/target/screenshots"
echo "browser tests against $BROKER at $MQTT_WS_URL"
if ! node --test --test-concurrency=1 "${TESTS[@]}"; then
  echo "--- $BROKER log" >&2
  tail -n 50 "$WORK/broker.log" >&2
  exit 1
fi
