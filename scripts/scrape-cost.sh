#!/usr/bin/env bash
# What a Prometheus scrape costs a loaded broker (issue 14): a release broker in memory with
# 1,000 work queues and 10,000 idle connections (`ferrymq bench connections`). It times
# /metrics scrapes (p50 and max over SCRAPES, target under 50 ms), then runs a paced latency
# bench (`ferrymq bench latency`) ROUNDS times for each arm, in turn: no scrapes, then a
# scrape every 100 ms of each of ARMS, and prints each run's p99 and each arm's median p99.
# The arms that are not /metrics are controls for what any scraper costs on two cores:
#   /api/v1/alarms  a tiny page that does not ask the router (the scraper waking up)
#   static          one /metrics body served by another process (the scraper reading 1 MB)
# Bounded: about 2 + ROUNDS * (1 + arms) * DURATION seconds after the connections are up;
# every wait gives up.
#
#   scripts/scrape-cost.sh                        # builds target/release/ferrymq if missing
#   CONNECTIONS=10000 QUEUES=1000 SCRAPES=50 ROUNDS=4 DURATION=10 RATE=5000 scripts/scrape-cost.sh
#   ARMS=/metrics scripts/scrape-cost.sh          # only /metrics against no scrapes
set -euo pipefail
cd "$(dirname "$0")/.."

CONNECTIONS=${CONNECTIONS:-10000}
QUEUES=${QUEUES:-1000}
SCRAPES=${SCRAPES:-50}
ROUNDS=${ROUNDS:-4}
DURATION=${DURATION:-10}
RATE=${RATE:-5000}
ARMS=${ARMS:-/api/v1/alarms static /metrics}
BIN=${FERRYMQ_BIN:-target/release/ferrymq}
[ -x "$BIN" ] || cargo build -q --release -p ferrymq

# The broker and the connection bench each hold CONNECTIONS sockets.
need=$((CONNECTIONS + 1000))
if [ "$(ulimit -n)" -lt "$need" ]; then
  ulimit -n "$need" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
fi
[ "$(ulimit -n)" -ge "$need" ] || {
  echo "scrape-cost: open files limited to $(ulimit -n), need $need" >&2
  exit 1
}

source scripts/lib.sh
scratch_dir

MQTT=$(free_port)
HTTP=$(free_port)
{
  cat <<TOML
[listeners]
mqtt = "127.0.0.1:$MQTT"
http = "127.0.0.1:$HTTP"
ws = []

[storage]
persistence = false

[sys]
interval_secs = 0
TOML
  for i in $(seq "$QUEUES"); do
    printf '\n[[queue]]\nname = "q%d"\nfilter = "jobs/%d"\n' "$i" "$i"
  done
} >"$WORK/ferrymq.toml"
"$BIN" serve --config "$WORK/ferrymq.toml" --log-level warn >"$WORK/broker.log" 2>&1 &
BROKER=$!
PIDS+=("$BROKER")

metric() { curl -sf "http://127.0.0.1:$HTTP/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }
wait_for() { # what, seconds, command...
  local what=$1 limit=$2
  shift 2
  for _ in $(seq $((limit * 10))); do
    if "$@"; then return 0; fi
    kill -0 "$BROKER" 2>/dev/null || { echo "scrape-cost: the broker exited" >&2; tail "$WORK/broker.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "scrape-cost: no $what within $limit s" >&2
  exit 1
}
wait_for "admin listener" 30 curl -sf -o /dev/null "http://127.0.0.1:$HTTP/health"
queues=$(curl -sf "http://127.0.0.1:$HTTP/metrics" | grep -c '^ferrymq_queue_depth{')
[ "$queues" -eq "$QUEUES" ] || { echo "scrape-cost: $queues queues, not $QUEUES" >&2; exit 1; }

# Idle connections, held until this script ends.
"$BIN" bench --port "$MQTT" --timeout 300 connections -c "$CONNECTIONS" --hold 3600 \
  >"$WORK/connections.log" 2>&1 &
PIDS+=("$!")
connected() { [ "$(metric ferrymq_connections)" -ge "$CONNECTIONS" ] 2>/dev/null; }
wait_for "$CONNECTIONS connections" 120 connected

# Scrape times as curl sees them (request sent to the last byte read, loopback).
for _ in $(seq "$SCRAPES"); do
  curl -sf -o /dev/null -w '%{time_total}\n' "http://127.0.0.1:$HTTP/metrics"
done >"$WORK/scrapes.txt"
bytes=$(curl -sf "http://127.0.0.1:$HTTP/metrics" | wc -c)
python3 - "$WORK/scrapes.txt" "$bytes" "$CONNECTIONS" "$QUEUES" <<'PY'
import sys
t = sorted(float(x) * 1000 for x in open(sys.argv[1]))
print(f"scrape ({sys.argv[3]} connections, {sys.argv[4]} queues, {int(sys.argv[2]) // 1024} KiB): "
      f"p50 {t[len(t) // 2]:.1f} ms, max {t[-1]:.1f} ms over {len(t)} scrapes")
PY

# One p99 per arm and round in $WORK/p99.txt ("arm p99"), and a line per run on stdout.
latency() { # arm
  "$BIN" bench --port "$MQTT" --json latency --rate "$RATE" --duration "$DURATION" \
    | python3 -c "import json, sys; d = json.loads(sys.stdin.read().strip().splitlines()[-1]); l = d['latency_us']; print(f\"$1 {l['p99']}\", file=open('$WORK/p99.txt', 'a')); print(f\"round $round, $1: p50 {l['p50']} us, p99 {l['p99']} us, max {l['max']} us, lost {d['lost']}\")"
}
# A copy of one /metrics body served by another process, for the `static` arm.
mkdir -p "$WORK/static"
curl -sf "http://127.0.0.1:$HTTP/metrics" >"$WORK/static/metrics"
STATIC_PORT=$(free_port)
python3 -m http.server --protocol HTTP/1.1 --bind 127.0.0.1 --directory "$WORK/static" \
  "$STATIC_PORT" >/dev/null 2>&1 &
PIDS+=("$!")
wait_for "static server" 10 curl -sf -o /dev/null "http://127.0.0.1:$STATIC_PORT/metrics"

# Every round runs each arm once, in turn, so that the machine's drift reaches them alike.
for round in $(seq "$ROUNDS"); do
  latency "none"
  for arm in $ARMS; do
    port=$HTTP path=$arm
    [ "$arm" = static ] && port=$STATIC_PORT path=/metrics
    # One long-lived scraper on one kept-alive connection, as Prometheus scrapes (a shell
    # loop forking curl and sleep every 100 ms moved the p99 as much for a trivial page).
    python3 - "$port" "$path" <<'PY' &
import http.client, sys, time
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=10)
while True:
    started = time.monotonic()
    conn.request("GET", sys.argv[2])
    conn.getresponse().read()
    time.sleep(max(0.0, 0.1 - (time.monotonic() - started)))
PY
    SCRAPER=$!
    PIDS+=("$SCRAPER")
    latency "$arm"
    kill "$SCRAPER"
    wait "$SCRAPER" 2>/dev/null || true
  done
done
python3 - "$WORK/p99.txt" <<'PY'
import statistics, sys
by_arm = {}
for line in open(sys.argv[1]):
    arm, p99 = line.split()
    by_arm.setdefault(arm, []).append(int(p99))
base = statistics.median(by_arm["none"])
for arm, values in by_arm.items():
    m = statistics.median(values)
    print(f"median p99 over {len(values)} rounds, {arm}: {m:.0f} us ({m - base:+.0f} us)")
PY
