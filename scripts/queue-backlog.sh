#!/usr/bin/env bash
# A work-queue backlog larger than memory (issue 11): N messages of 1 KiB queued with no
# consumer, then the broker killed (SIGKILL) and restarted on the same data directory, then
# the backlog drained by 4 consumers. Prints: fill rate, broker RSS at the end of the fill,
# the longest router step (a checkpoint writing the queue's index stalls routing), disk
# used, how long the restart took to accept connections, the drain rate, and RSS after.
#
#   scripts/queue-backlog.sh [MESSAGES] [DATA_DIR]
#
# MESSAGES defaults to 10,000,000 (about 11 GB on disk); DATA_DIR to a directory under
# target/. Needs a release build (built here).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000000}
DATA=${2:-$PWD/target/queue-backlog}
P=4
PER=$((N / P))
cargo build --release -q -p ferrymq
BIN=$PWD/target/release/ferrymq
rm -rf "$DATA"
mkdir -p "$DATA"
source scripts/lib.sh # free_port
MQTT=$(free_port)
HTTP=$(free_port)
cat > "$DATA/ferrymq.toml" <<EOF
[sys]
interval_secs = 0
[[queue]]
name = "backlog"
filter = "backlog/#"
EOF
PID=""
cleanup() { [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT
start() {
  "$BIN" serve --config "$DATA/ferrymq.toml" --mqtt "127.0.0.1:$MQTT" --http "127.0.0.1:$HTTP" \
    --data-dir "$DATA/data" --log-level info 2>>"$DATA/broker.log" &
  PID=$!
}
wait_accepting() {
  python3 - "$MQTT" <<'PY'
import socket, sys, time
t = time.monotonic()
while True:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
        break
    except OSError:
        time.sleep(0.01)
print(f"{time.monotonic() - t:.2f}")
PY
}
metric() { curl -s "127.0.0.1:$HTTP/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }

start
wait_accepting >/dev/null
echo "fill: $N messages of 1 KiB, $P publishers, no consumer"
"$BIN" bench --port "$MQTT" --protocol-version 5 --timeout 3600 --label fill queue \
  -P $P -n $PER --payload 1024 --queue backlog --topic backlog --fill-only
echo "  queue depth        $(metric 'ferrymq_queue_depth{queue="backlog"}')"
echo "  broker RSS         $(( $(metric ferrymq_process_resident_memory_bytes) / 1048576 )) MiB"
echo "  cached payloads    $(( $(metric 'ferrymq_queue_cached_bytes{queue="backlog"}') / 1048576 )) MiB"
echo "  longest step       $(python3 -c "print(round($(metric ferrymq_router_step_max_seconds) * 1000))") ms; steps over 10 ms: $(metric ferrymq_router_steps_over_10ms_total)"
echo "  disk               $(du -sh "$DATA/data" | cut -f1)"
kill -9 "$PID"
wait "$PID" 2>/dev/null || true
start
echo "restart after SIGKILL: accepting connections after $(wait_accepting) s"
echo "  queue depth        $(metric 'ferrymq_queue_depth{queue="backlog"}')"
echo "  broker RSS         $(( $(metric ferrymq_process_resident_memory_bytes) / 1048576 )) MiB"
echo "drain: 4 consumers, receive maximum 256"
"$BIN" bench --port "$MQTT" --protocol-version 5 --timeout 3600 --label drain queue \
  -P $P -n $PER -C 4 --payload 1024 --queue backlog --topic backlog --drain
echo "  queue depth        $(metric 'ferrymq_queue_depth{queue="backlog"}')"
echo "  broker RSS         $(( $(metric ferrymq_process_resident_memory_bytes) / 1048576 )) MiB"
echo "  longest step       $(python3 -c "print(round($(metric ferrymq_router_step_max_seconds) * 1000))") ms; steps over 10 ms: $(metric ferrymq_router_steps_over_10ms_total)"
echo "  unreadable         $(metric 'ferrymq_queue_unreadable_total{queue="backlog"}')"
