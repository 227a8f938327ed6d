#!/usr/bin/env bash
# Side-by-side benchmark: FerryMQ, mosquitto and nats-server (MQTT listener, JetStream on),
# each started on loopback, loaded one at a time with the same `ferrymq bench` scenarios,
# then stopped. Prints a Markdown table with medians and FerryMQ/peer ratios.
#
#   scripts/compare-peers.sh [--quick] [--pin] [--reps N] [--out FILE.json]
#
#   --quick  smaller message counts and no connections scenario (about 2 minutes)
#   --pin    broker on CPU 0, load generator on CPU 1 (taskset)
#   --reps N repetitions per scenario, median reported (default 3)
#   --out F  also write every measurement as JSON lines
#   --ratios-json F  write medians and FerryMQ/peer ratios as JSON
#   --brokers "ferrymq mosquitto"  which brokers to run (default: all three)
#   --only TEXT  only the scenarios whose name contains TEXT (e.g. "latency")
#   --durable  durable QoS 1 instead: subscribers with persistent sessions, FerryMQ under its
#              default fsync policy (the reference column) and under always / interval / os /
#              in memory, mosquitto with persistence on, nats-server (JetStream stores MQTT
#              QoS 1 messages)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${FERRYMQ_PYTHON:-$(bash scripts/venv.sh)}

QUICK=0; PIN=0; REPS=3; OUT=""; RATIOS=""; BROKERS=""; DURABLE=0; ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --durable) DURABLE=1 ;;
    --quick) QUICK=1 ;;
    --pin) PIN=1 ;;
    --reps) REPS=$2; shift ;;
    --out) OUT=$2; shift ;;
    --brokers) BROKERS=$2; shift ;;
    --only) ONLY=$2; shift ;;
    --ratios-json) RATIOS=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$BROKERS" ]; then
  if [ "$DURABLE" = 1 ]; then
    BROKERS="ferrymq ferrymq-always ferrymq-interval ferrymq-os ferrymq-memory mosquitto-persist nats"
  else
    BROKERS="ferrymq mosquitto nats"
  fi
fi

retry() { "$@" || { sleep 3; "$@"; }; }
need_apt=()
command -v mosquitto >/dev/null || need_apt+=(mosquitto)
command -v nats-server >/dev/null || need_apt+=(nats-server)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  retry $SUDO apt-get update -qq
  retry $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
cargo build --release -q -p ferrymq
BIN=$PWD/target/release/ferrymq
WORK=$(mktemp -d)
RESULTS=$WORK/results.jsonl
BROKER_PID=""
cleanup() { [ -n "$BROKER_PID" ] && kill "$BROKER_PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# Ports below the ephemeral range (32768+), which 10K client connections would otherwise
# occupy and make the next broker's bind fail.
PORT=11883
BROKER_CPU=(); LOAD_CPU=()
if [ "$PIN" = 1 ]; then BROKER_CPU=(taskset -c 0); LOAD_CPU=(taskset -c 1); fi

start_broker() {
  local flags=()
  case "$1" in
    ferrymq-always) flags=(--fsync always) ;;
    ferrymq-interval) flags=(--fsync interval) ;;
    ferrymq-os) flags=(--fsync os) ;;
    ferrymq-memory) flags=(--in-memory) ;;
  esac
  case "$1" in
    ferrymq*)
      rm -rf "$WORK/ferrymq"
      "${BROKER_CPU[@]}" "$BIN" serve --mqtt 127.0.0.1:$PORT --http 127.0.0.1:18080 \
        --data-dir "$WORK/ferrymq" --log-level warn "${flags[@]}" >"$WORK/ferrymq.log" 2>&1 &
      ;;
    mosquitto)
      printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n' $PORT >"$WORK/mosquitto.conf"
      "${BROKER_CPU[@]}" mosquitto -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
      ;;
    mosquitto-persist)
      # mosquitto's persistence writes a snapshot of its whole database every
      # autosave_interval (default 1800 s) and at exit; nothing is synced per message.
      rm -rf "$WORK/mosq"; mkdir -p "$WORK/mosq"
      printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location %s/mosq/\nmax_queued_messages 100000\n' $PORT "$WORK" >"$WORK/mosquitto.conf"
      "${BROKER_CPU[@]}" mosquitto -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
      ;;
    nats)
      rm -rf "$WORK/js"; mkdir -p "$WORK/js"
      printf 'server_name: bench\nlisten: 127.0.0.1:14222\njetstream { store_dir: "%s/js" }\nmqtt { listen: 127.0.0.1:%s }\n' "$WORK" $PORT >"$WORK/nats.conf"
      "${BROKER_CPU[@]}" nats-server -c "$WORK/nats.conf" >"$WORK/nats.log" 2>&1 &
      ;;
  esac
  BROKER_PID=$!
  for _ in $(seq 1 100); do
    (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$1 did not start" >&2; return 1
}

stop_broker() {
  kill "$BROKER_PID" 2>/dev/null || true
  wait "$BROKER_PID" 2>/dev/null || true
  BROKER_PID=""
  sleep 0.5
}

# name | bench arguments
if [ "$DURABLE" = 1 ]; then
  SCENARIOS=(
    "durable qos1 1→1 (256 in flight)|--persistent throughput -q 1 -n 200000 --inflight 256"
    "durable qos1 50→1 (64 in flight each)|--persistent fanin -q 1 -n 1500 --inflight 64"
    "durable qos1 latency 5K/s|--persistent latency -q 1 --rate 5000 --duration 5"
  )
elif [ "$QUICK" = 1 ]; then
  SCENARIOS=(
    "qos0 1→1|throughput -n 500000 --inflight 5000"
    "qos0 burst 1→1|throughput --burst -n 500000"
    "qos1 1→1 (256 in flight)|throughput -q 1 -n 200000 --inflight 256"
    "fanout 1→100|fanout -n 10000 --inflight 2000"
    "fanin 50→1|fanin -n 6000 --inflight 5000"
    "fanin burst 50→1|fanin --burst -n 10000"
    "latency 10K/s|latency --rate 10000 --duration 3"
  )
else
  SCENARIOS=(
    "qos0 1→1|throughput -n 1000000 --inflight 5000"
    "qos0 burst 1→1|throughput --burst -n 500000"
    "qos1 1→1 (256 in flight)|throughput -q 1 -n 300000 --inflight 256"
    "fanout 1→100|fanout -n 20000 --inflight 2000"
    "fanout 1→1000|fanout -S 1000 -n 2000 --inflight 500"
    "fanin 50→1|fanin -n 10000 --inflight 5000"
    "fanin burst 50→1|fanin --burst -n 10000"
    "latency 10K/s|latency --rate 10000 --duration 10"
    "connections 10K|connections -c 10000 --hold 3"
  )
fi

for broker in $BROKERS; do
  for entry in "${SCENARIOS[@]}"; do
    name=${entry%%|*}; args=${entry#*|}
    case "$name" in *"$ONLY"*) ;; *) continue ;; esac
    reps=$REPS
    case "$name" in connections*) reps=1 ;; esac
    for rep in $(seq 1 "$reps"); do
      # A fresh broker per run, so memory baselines are clean and one run cannot slow the next.
      if ! start_broker "$broker"; then
        echo "{\"name\":\"$name\",\"broker\":\"$broker\",\"rep\":$rep,\"result\":{\"failed\":true,\"error\":\"did not start\"}}" >>"$RESULTS"
        stop_broker
        continue
      fi
      extra=()
      case "$name" in connections*) extra=(--broker-pid "$BROKER_PID") ;; esac
      # shellcheck disable=SC2086
      if line=$("${LOAD_CPU[@]}" "$BIN" bench $args --port $PORT --timeout 120 --json --label "$broker" "${extra[@]}" 2>"$WORK/bench.err"); then :; else
        line=$(printf '{"label":"%s","failed":true,"error":%s}' "$broker" "$("$PY" -c 'import json,sys; print(json.dumps(sys.stdin.read()[-300:]))' <"$WORK/bench.err")")
      fi
      echo "{\"name\":\"$name\",\"broker\":\"$broker\",\"rep\":$rep,\"result\":$line}" >>"$RESULTS"
      echo "  $broker / $name / run $rep done" >&2
      stop_broker
    done
  done
done

[ -n "$OUT" ] && cp "$RESULTS" "$OUT"
"$PY" scripts/compare_report.py "$RESULTS" ${RATIOS:+--ratios-json "$RATIOS"}
