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
#   --queues   durable work queues instead (issue 11): FerryMQ with a [[queue]] under its
#              default fsync policy (`ferrymq bench queue`), nats-server JetStream as a work
#              queue and RabbitMQ with a quorum queue (both driven by bench/peers, a separate
#              cargo project); 1 and 4 consumers, plain and nack-once. Brokers: "ferrymq nats
#              rabbitmq"; rabbitmq-server is installed from Debian if missing, and left out
#              (with a warning) if it does not install. Ports are drawn at random in 20000-29999.
#   --edge     the network edge instead (issue 12): FerryMQ and mosquitto over TCP, TLS and
#              WebSocket, each broker with all three listeners and one certificate (a CA and
#              an EC P-256 server certificate made here with openssl): QoS 0 1→1 throughput,
#              the connection-setup rate (TCP + TLS/WebSocket handshakes + CONNECT/CONNACK,
#              64 at a time, full TLS handshakes: no session resumption) and, without --quick,
#              broker memory per idle connection with 10K connections held over each.
#              mosquitto 2.0's WebSocket listener (libwebsockets) starts only next to a plain
#              one and binds an interface, not an address: it gets `listener PORT lo`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${FERRYMQ_PYTHON:-$(bash scripts/venv.sh)}

QUICK=0; PIN=0; REPS=3; OUT=""; RATIOS=""; BROKERS=""; DURABLE=0; ONLY=""; QUEUES=0; EDGE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --durable) DURABLE=1 ;;
    --queues) QUEUES=1 ;;
    --edge) EDGE=1 ;;
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
  if [ "$QUEUES" = 1 ]; then
    BROKERS="ferrymq nats rabbitmq"
  elif [ "$EDGE" = 1 ]; then
    BROKERS="ferrymq mosquitto"
  elif [ "$DURABLE" = 1 ]; then
    BROKERS="ferrymq ferrymq-always ferrymq-interval ferrymq-os ferrymq-memory mosquitto-persist nats"
  else
    BROKERS="ferrymq mosquitto nats"
  fi
fi

retry() { "$@" || { sleep 3; "$@"; }; }
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
APT_UPDATED=0
apt_install() {
  if [ "$APT_UPDATED" = 0 ]; then
    retry $SUDO apt-get update -qq || return 1
    APT_UPDATED=1
  fi
  retry $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}
need_apt=()
command -v mosquitto >/dev/null || need_apt+=(mosquitto)
command -v nats-server >/dev/null || need_apt+=(nats-server)
if [ "$EDGE" = 1 ]; then command -v openssl >/dev/null || need_apt+=(openssl); fi
if [ ${#need_apt[@]} -gt 0 ]; then
  apt_install "${need_apt[@]}"
fi
# RabbitMQ's own start script (the /usr/sbin wrapper would switch to the rabbitmq user).
RABBIT=/usr/lib/rabbitmq/bin/rabbitmq-server
if [ "$QUEUES" = 1 ] && [[ " $BROKERS " == *" rabbitmq "* ]] && [ ! -x "$RABBIT" ]; then
  if ! apt_install rabbitmq-server || [ ! -x "$RABBIT" ]; then
    echo "rabbitmq-server did not install: running without it" >&2
    BROKERS=$(echo " $BROKERS " | sed 's/ rabbitmq / /')
  fi
fi
cargo build --release -q -p ferrymq
BIN=$PWD/target/release/ferrymq
PEER=$PWD/bench/peers/target/release/ferrymq-peer-bench
if [ "$QUEUES" = 1 ]; then
  cargo build --release -q --manifest-path bench/peers/Cargo.toml
fi
WORK=$(mktemp -d)
RESULTS=$WORK/results.jsonl
BROKER_PID=""
cleanup() {
  [ -n "$BROKER_PID" ] && kill "$BROKER_PID" 2>/dev/null
  wait 2>/dev/null
  # The epmd that RabbitMQ's Erlang VM started on our own port, if any.
  if [ -n "${EPMD_PORT:-}" ] && command -v epmd >/dev/null; then
    ERL_EPMD_PORT=$EPMD_PORT epmd -kill >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$EDGE" = 1 ] && [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 10500 ]; then
  echo "the open-files limit ($(ulimit -n)) is under 10500: the 10K idle rows will fail" >&2
fi

# Ports below the ephemeral range (32768+), which 10K client connections would otherwise
# occupy and make the next broker's bind fail.
PORT=11883
if [ "$QUEUES" = 1 ]; then
  # Drawn at random (20000-29999, below the ephemeral range) so that other tests on this
  # machine are unlikely to hold them.
  BASE=$((20000 + RANDOM % 1000 * 10))
  PORT=$BASE; HTTP_PORT=$((BASE + 1)); NATS_PORT=$((BASE + 2)); AMQP_PORT=$((BASE + 3))
  DIST_PORT=$((BASE + 4)); EPMD_PORT=$((BASE + 5))
fi
# --edge: TLS and WebSocket listeners next to the TCP one, and one certificate for both brokers.
TLS_PORT=$((PORT + 1)); WS_PORT=$((PORT + 2))
if [ "$EDGE" = 1 ]; then
  CERTS=$WORK/certs; mkdir -p "$CERTS"
  ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  openssl req -x509 "${ec[@]}" -days 2 -subj "/CN=compare-peers CA" \
    -keyout "$CERTS/ca.key" -out "$CERTS/ca.pem" 2>/dev/null
  openssl req "${ec[@]}" -subj "/CN=localhost" -keyout "$CERTS/server.key" \
    -out "$CERTS/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$CERTS/ext.cnf"
  openssl x509 -req -in "$CERTS/server.csr" -CA "$CERTS/ca.pem" -CAkey "$CERTS/ca.key" \
    -CAcreateserial -days 2 -extfile "$CERTS/ext.cnf" -out "$CERTS/server.pem" 2>/dev/null
fi
# `ferrymq bench` flags for each transport (--edge scenario names end with the transport).
transport_flags() {
  case "$1" in
    *" tls") echo "--port $TLS_PORT --tls-ca $CERTS/ca.pem" ;;
    *" ws") echo "--port $WS_PORT --ws" ;;
    *) echo "--port $PORT" ;;
  esac
}

# Each consumer's receive maximum (FerryMQ) or prefetch (JetStream pull batch, RabbitMQ
# basic.qos), and each publisher's window of unacknowledged publishes, in --queues mode.
QWIN=256
BROKER_CPU=(); LOAD_CPU=()
if [ "$PIN" = 1 ]; then BROKER_CPU=(taskset -c 0); LOAD_CPU=(taskset -c 1); fi

# --queues: one broker with what the work-queue scenario needs, fresh data each time.
start_queue_broker() {
  local wait_port=$PORT
  case "$1" in
    ferrymq)
      rm -rf "$WORK/ferrymq"
      printf '[[queue]]\nname = "bench"\nfilter = "bench/q/#"\nmax_attempts = 5\nbackoff = { kind = "none" }\n' >"$WORK/ferrymq-queues.toml"
      "${BROKER_CPU[@]}" "$BIN" serve --config "$WORK/ferrymq-queues.toml" --mqtt 127.0.0.1:$PORT \
        --http 127.0.0.1:$HTTP_PORT --data-dir "$WORK/ferrymq" --log-level warn >"$WORK/ferrymq.log" 2>&1 &
      ;;
    nats)
      rm -rf "$WORK/js"; mkdir -p "$WORK/js"
      printf 'server_name: qbench\nlisten: 127.0.0.1:%s\njetstream { store_dir: "%s/js" }\n' $NATS_PORT "$WORK" >"$WORK/nats.conf"
      "${BROKER_CPU[@]}" nats-server -c "$WORK/nats.conf" >"$WORK/nats.log" 2>&1 &
      wait_port=$NATS_PORT
      ;;
    rabbitmq)
      # Its own node name, ports, epmd, cookie (HOME) and data: nothing shared with a system
      # RabbitMQ, and nothing left behind.
      local r=$WORK/rabbit
      rm -rf "$r"; mkdir -p "$r/home" "$r/mnesia" "$r/log"
      printf 'listeners.tcp.1 = 127.0.0.1:%s\nloopback_users = none\n' $AMQP_PORT >"$r/rabbitmq.conf"
      echo '[].' >"$r/enabled_plugins"
      env HOME="$r/home" RABBITMQ_NODENAME="qbench$BASE@localhost" RABBITMQ_CONFIG_FILE="$r/rabbitmq.conf" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$r/enabled_plugins" RABBITMQ_MNESIA_BASE="$r/mnesia" \
        RABBITMQ_LOG_BASE="$r/log" RABBITMQ_DIST_PORT=$DIST_PORT ERL_EPMD_PORT=$EPMD_PORT \
        ERL_EPMD_ADDRESS=127.0.0.1 RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        "${BROKER_CPU[@]}" "$RABBIT" >"$WORK/rabbit.log" 2>&1 &
      wait_port=$AMQP_PORT
      ;;
  esac
  BROKER_PID=$!
  # RabbitMQ takes ~10 s to boot here.
  for _ in $(seq 1 600); do
    (exec 3<>/dev/tcp/127.0.0.1/$wait_port) 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$1 did not start" >&2; return 1
}

start_broker() {
  if [ "$QUEUES" = 1 ]; then start_queue_broker "$1"; return; fi
  local flags=()
  case "$1" in
    ferrymq-always) flags=(--fsync always) ;;
    ferrymq-interval) flags=(--fsync interval) ;;
    ferrymq-os) flags=(--fsync os) ;;
    ferrymq-memory) flags=(--in-memory) ;;
  esac
  case "$EDGE:$1" in
    1:ferrymq)
      printf '[listeners]\nmqtt = "127.0.0.1:%s"\nmqtts = "127.0.0.1:%s"\nws = "127.0.0.1:%s"\nwss = []\nhttp = "127.0.0.1:18080"\n[tls]\ncert = "%s"\nkey = "%s"\n' \
        $PORT $TLS_PORT $WS_PORT "$CERTS/server.pem" "$CERTS/server.key" >"$WORK/ferrymq-edge.toml"
      "${BROKER_CPU[@]}" "$BIN" serve --config "$WORK/ferrymq-edge.toml" --in-memory \
        --log-level warn >"$WORK/ferrymq.log" 2>&1 &
      ;;
    1:mosquitto)
      # As root, mosquitto switches to its own user, who cannot read the key in $WORK.
      printf 'user %s\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n' "$(id -un)" >"$WORK/mosquitto.conf"
      printf 'listener %s 127.0.0.1\nlistener %s 127.0.0.1\ncafile %s\ncertfile %s\nkeyfile %s\nlistener %s lo\nprotocol websockets\n' \
        $PORT $TLS_PORT "$CERTS/ca.pem" "$CERTS/server.pem" "$CERTS/server.key" $WS_PORT >>"$WORK/mosquitto.conf"
      "${BROKER_CPU[@]}" mosquitto -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
      ;;
    *:ferrymq*)
      rm -rf "$WORK/ferrymq"
      "${BROKER_CPU[@]}" "$BIN" serve --mqtt 127.0.0.1:$PORT --http 127.0.0.1:18080 \
        --data-dir "$WORK/ferrymq" --log-level warn "${flags[@]}" >"$WORK/ferrymq.log" 2>&1 &
      ;;
    *:mosquitto)
      printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n' $PORT >"$WORK/mosquitto.conf"
      "${BROKER_CPU[@]}" mosquitto -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
      ;;
    *:mosquitto-persist)
      # mosquitto's persistence writes a snapshot of its whole database every
      # autosave_interval (default 1800 s) and at exit; nothing is synced per message.
      rm -rf "$WORK/mosq"; mkdir -p "$WORK/mosq"
      printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location %s/mosq/\nmax_queued_messages 100000\n' $PORT "$WORK" >"$WORK/mosquitto.conf"
      "${BROKER_CPU[@]}" mosquitto -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
      ;;
    *:nats)
      rm -rf "$WORK/js"; mkdir -p "$WORK/js"
      printf 'server_name: bench\nlisten: 127.0.0.1:14222\njetstream { store_dir: "%s/js" }\nmqtt { listen: 127.0.0.1:%s }\n' "$WORK" $PORT >"$WORK/nats.conf"
      "${BROKER_CPU[@]}" nats-server -c "$WORK/nats.conf" >"$WORK/nats.log" 2>&1 &
      ;;
  esac
  BROKER_PID=$!
  local port
  for port in $PORT $([ "$EDGE" = 1 ] && echo "$TLS_PORT $WS_PORT"); do
    for _ in $(seq 1 100); do
      (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && continue 2
      sleep 0.1
    done
    echo "$1 did not start" >&2; return 1
  done
  return 0
  echo "$1 did not start" >&2; return 1
}

stop_broker() {
  kill "$BROKER_PID" 2>/dev/null || true
  wait "$BROKER_PID" 2>/dev/null || true
  BROKER_PID=""
  sleep 0.5
}

# name | bench arguments
if [ "$QUEUES" = 1 ]; then
  # The same arguments drive `ferrymq bench queue` and bench/peers (see QWIN).
  SCENARIOS=(
    "queue 1→1|-P 1 -C 1 -n 200000 --inflight $QWIN"
    "queue 4→4|-P 4 -C 4 -n 50000 --inflight $QWIN"
    "queue nack-once 1→1|-P 1 -C 1 -n 200000 --inflight $QWIN --nack-once"
    "queue nack-once 4→4|-P 4 -C 4 -n 50000 --inflight $QWIN --nack-once"
  )
elif [ "$EDGE" = 1 ]; then
  # The transport is the last word of each name (see transport_flags).
  N=1000000; C=5000
  [ "$QUICK" = 1 ] && { N=300000; C=2000; }
  SCENARIOS=()
  for t in tcp tls ws; do
    SCENARIOS+=("qos0 1→1 $t|throughput -n $N --inflight 5000")
  done
  for t in tcp tls ws; do
    SCENARIOS+=("setup rate $t|connections -c $C --hold 0 --concurrency 64")
  done
  if [ "$QUICK" = 0 ]; then
    for t in tcp tls ws; do
      SCENARIOS+=("idle 10K $t|connections -c 10000 --hold 3 --concurrency 64")
    done
  fi
elif [ "$DURABLE" = 1 ]; then
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
    case "$name" in connections*|idle*) reps=1 ;; esac
    for rep in $(seq 1 "$reps"); do
      # A fresh broker per run, so memory baselines are clean and one run cannot slow the next.
      if ! start_broker "$broker"; then
        echo "{\"name\":\"$name\",\"broker\":\"$broker\",\"rep\":$rep,\"result\":{\"failed\":true,\"error\":\"did not start\"}}" >>"$RESULTS"
        stop_broker
        continue
      fi
      extra=()
      case "$name" in connections*|idle*) extra=(--broker-pid "$BROKER_PID") ;; esac
      # shellcheck disable=SC2207
      [ "$EDGE" = 1 ] && extra+=($(transport_flags "$name"))
      # shellcheck disable=SC2086
      case "$QUEUES:$broker" in
        1:ferrymq) cmd=("$BIN" bench queue $args --receive-maximum $QWIN --port $PORT) ;;
        1:nats) cmd=("$PEER" nats --url 127.0.0.1:$NATS_PORT $args --prefetch $QWIN) ;;
        1:rabbitmq) cmd=("$PEER" rabbitmq --url "amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f" $args --prefetch $QWIN) ;;
        *) cmd=("$BIN" bench $args $([ "$EDGE" = 1 ] || echo "--port $PORT")) ;;
      esac
      if line=$("${LOAD_CPU[@]}" "${cmd[@]}" --timeout 120 --json --label "$broker" "${extra[@]}" 2>"$WORK/bench.err"); then :
      elif [ "$QUEUES" = 1 ] && [ "${line:0:1}" = "{" ]; then
        : # It reported and then failed (lost messages): the report shows the loss.
      else
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
