#!/usr/bin/env bash
# Interop: mosquitto_pub/mosquitto_sub (3.1.1 and 5) and paho-mqtt (3.1.1 and 5, over TCP and
# WebSocket) against a freshly started `ferrymq serve`. Needs mosquitto-clients
# (scripts/test.sh installs them) and runs Python from the venv in target/venv
# (FERRYMQ_PYTHON, else made by scripts/venv.sh).
# Prints one line per check and "N passed, N failed"; exits 1 on failure.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${FERRYMQ_PYTHON:-$(bash scripts/venv.sh)} || { echo "FAIL no Python venv (scripts/venv.sh)"; exit 1; }

BIN=${FERRYMQ_BIN:-target/debug/ferrymq}
PORT=${INTEROP_PORT:-21883}
HTTP=${INTEROP_HTTP_PORT:-28080}
WS=${INTEROP_WS_PORT:-28083}
DATA=$(mktemp -d)
LOG=$DATA/ferrymq.log
[ -x "$BIN" ] || cargo build -q -p ferrymq

"$BIN" serve --mqtt 127.0.0.1:$PORT --ws 127.0.0.1:$WS --http 127.0.0.1:$HTTP --data-dir "$DATA" >"$LOG" 2>&1 &
SERVER=$!
cleanup() { kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null; rm -rf "$DATA"; }
trap cleanup EXIT

for _ in $(seq 1 100); do
  "$PY" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$HTTP/health', timeout=1)" 2>/dev/null && break
  sleep 0.1
done

PASSED=0
FAILED=0
pass() { echo "ok   $1"; PASSED=$((PASSED + 1)); }
fail() { echo "FAIL $1: $2"; FAILED=$((FAILED + 1)); }

# expect NAME EXPECTED ACTUAL
expect() {
  if [ "$2" == "$3" ]; then pass "$1"; else fail "$1" "expected [$2] got [$3]"; fi
}

subscriptions() { # the broker's subscription count, from /metrics
  "$PY" -c "import urllib.request
body = urllib.request.urlopen('http://127.0.0.1:$HTTP/metrics', timeout=2).read().decode()
print(next(l.split()[1] for l in body.splitlines() if l.startswith('ferrymq_subscriptions ')))"
}

subscribed() { # subscribed BEFORE: wait (up to 10 s) until the broker holds more than BEFORE
  for _ in $(seq 1 100); do
    [ "$(subscriptions)" -gt "$1" ] && return
    sleep 0.1
  done
  echo "no new subscription within 10 s" >&2
}

sub_bg() { # sub_bg OUTFILE ARGS... : start mosquitto_sub, wait until it is subscribed
  local out=$1; shift
  local before; before=$(subscriptions)
  timeout 10 mosquitto_sub -h 127.0.0.1 -p $PORT "$@" >"$out" 2>&1 &
  SUB_PID=$!
  subscribed "$before"
}

for V in mqttv311 mqttv5; do
  OUT=$DATA/sub-$V.txt
  sub_bg "$OUT" -V $V -t "interop/$V/#" -q 2 -C 3 -v
  for Q in 0 1 2; do
    mosquitto_pub -h 127.0.0.1 -p $PORT -V $V -q $Q -t "interop/$V/😀/$Q" -m "héllo $Q 🌍"
  done
  wait "$SUB_PID" 2>/dev/null || true
  expect "mosquitto $V QoS 0/1/2 pub/sub with emoji" \
    "$(printf 'interop/%s/😀/0 héllo 0 🌍\ninterop/%s/😀/1 héllo 1 🌍\ninterop/%s/😀/2 héllo 2 🌍' $V $V $V)" \
    "$(sort "$OUT")"

  mosquitto_pub -h 127.0.0.1 -p $PORT -V $V -q 1 -r -t "interop/$V/retained" -m "kept"
  GOT=$(timeout 10 mosquitto_sub -h 127.0.0.1 -p $PORT -V $V -t "interop/$V/retained" -C 1 -F '%r %p' 2>&1)
  expect "mosquitto $V retained message replayed with RETAIN" "1 kept" "$GOT"
  mosquitto_pub -h 127.0.0.1 -p $PORT -V $V -q 1 -r -n -t "interop/$V/retained"
  GOT=$(timeout 2 mosquitto_sub -h 127.0.0.1 -p $PORT -V $V -t "interop/$V/retained" -W 1 2>/dev/null)
  expect "mosquitto $V empty retained payload clears it" "" "$GOT"
done

OUT=$DATA/sub-props.txt
sub_bg "$OUT" -V mqttv5 -t interop/props -C 1 -F '%t|%p|%P'
mosquitto_pub -h 127.0.0.1 -p $PORT -V mqttv5 -t interop/props -m body \
  -D publish user-property team ferry -D publish user-property team mq
wait "$SUB_PID" 2>/dev/null || true
expect "mosquitto mqttv5 user properties pass through in order" "interop/props|body|team:ferry team:mq" "$(cat "$OUT")"

OUT=$DATA/sub-cli.txt
sub_bg "$OUT" -V mqttv5 -t interop/cli -C 1 -v
"$BIN" pub -p $PORT -V 5 -q 1 -t interop/cli -m "from ferrymq pub"
wait "$SUB_PID" 2>/dev/null || true
expect "ferrymq pub -> mosquitto_sub" "interop/cli from ferrymq pub" "$(cat "$OUT")"

OUT=$DATA/sub-cli2.txt
BEFORE=$(subscriptions)
timeout 10 "$BIN" sub -p $PORT -V 3 -q 1 -t interop/cli2 -C 1 -v >"$OUT" 2>&1 &
SUB_PID=$!
subscribed "$BEFORE"
mosquitto_pub -h 127.0.0.1 -p $PORT -V mqttv311 -q 1 -t interop/cli2 -m "from mosquitto_pub"
wait "$SUB_PID" 2>/dev/null || true
expect "mosquitto_pub -> ferrymq sub" "interop/cli2 from mosquitto_pub" "$(cat "$OUT")"

if INTEROP_HTTP=$HTTP INTEROP_WS=$WS "$PY" scripts/interop_paho.py 127.0.0.1 $PORT; then pass "paho-mqtt 3.1.1 and 5.0 checks (TCP and WebSocket)"; else fail "paho-mqtt 3.1.1 and 5.0 checks" "see above"; fi

if kill -0 "$SERVER" 2>/dev/null; then pass "broker still running"; else fail "broker still running" "it exited; log: $(tail -5 "$LOG")"; fi
echo "interop: $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
