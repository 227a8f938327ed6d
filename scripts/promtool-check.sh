#!/usr/bin/env bash
# Lints a live broker's /metrics with `promtool check metrics` (Debian's `prometheus`
# package, installed without its recommends when missing), after traffic that makes every
# kind of metric carry samples: deliveries (the latency histogram), a work queue with two
# dead letters (per-queue and per-cause series), durable storage with fsync = always (the
# append, fsync and checkpoint histograms), an ACL denial.
#
#   scripts/promtool-check.sh        # FERRYMQ_BIN, default target/debug/ferrymq (built if missing);
#                                    # METRICS_OUT=file keeps the output checked
#
# Quick (a few seconds); bounded: every wait gives up after 20 s.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/lib.sh
command -v promtool >/dev/null || apt_install --no-install-recommends prometheus

BIN=${FERRYMQ_BIN:-target/debug/ferrymq}
if [ ! -x "$BIN" ]; then
  cargo build -q -p ferrymq
fi

scratch_dir

MQTT=$(free_port)
HTTP=$(free_port)
cat >"$WORK/ferrymq.toml" <<TOML
[listeners]
mqtt = "127.0.0.1:$MQTT"
http = "127.0.0.1:$HTTP"
ws = []

[storage]
fsync = "always"


[acl]
[[acl.rule]]
permission = "deny"
action = "publish"
topic = "forbidden/#"

[[queue]]
name = "jobs"
filter = "jobs/#"
max_messages = 1
overflow = "dead_letter"
TOML
"$BIN" serve --config "$WORK/ferrymq.toml" --data-dir "$WORK/data" >"$WORK/broker.log" 2>&1 &
PID=$!
PIDS+=("$PID")

fail() {
  echo "promtool-check: $*" >&2
  echo "--- broker log" >&2
  tail -n 30 "$WORK/broker.log" >&2
  exit 1
}

up=
for _ in $(seq 200); do
  kill -0 "$PID" 2>/dev/null || fail "the broker exited at start"
  if (exec 3<>"/dev/tcp/127.0.0.1/$HTTP") 2>/dev/null; then up=1; break; fi
  sleep 0.1
done
[ -n "$up" ] || fail "the admin listener did not come up"

# A subscriber that exits after one message; publish until it has one (its SUBACK is not
# visible from here, so each publish is a new attempt, at most 20 s of them).
"$BIN" sub -p "$MQTT" -t 'news/#' -C 1 >/dev/null &
SUB=$!
for _ in $(seq 100); do
  kill -0 "$SUB" 2>/dev/null || break
  "$BIN" pub -p "$MQTT" -t news/a -m hello -q 1
  sleep 0.2
done
if kill -0 "$SUB" 2>/dev/null; then
  kill "$SUB"
  fail "the subscriber got nothing"
fi
# max_messages = 1 and overflow = dead_letter: the first two of three become dead letters.
TRACEPARENT=00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01
"$BIN" pub -p "$MQTT" -t jobs/1 -m job -q 1 --repeat 3 --user-property "traceparent=$TRACEPARENT"
# Refused (PUBACK 0x87), which the CLI reports as an error.
"$BIN" pub -p "$MQTT" -t forbidden/x -m no -q 1 >/dev/null 2>&1 || true

curl -sf "http://127.0.0.1:$HTTP/metrics" >"$WORK/metrics.txt" || fail "GET /metrics failed"
# To look at what was checked: METRICS_OUT=path.
[ -z "${METRICS_OUT:-}" ] || cp "$WORK/metrics.txt" "$METRICS_OUT"
grep -q '^ferrymq_queue_dead_letters{queue="jobs"} 2$' "$WORK/metrics.txt" \
  || fail "no two dead letters in jobs: $(grep queue_dead_letters "$WORK/metrics.txt")"
grep -q '^ferrymq_delivery_latency_seconds_count [1-9]' "$WORK/metrics.txt" \
  || fail "no delivery in the latency histogram"
grep -q '^ferrymq_storage_fsync_duration_seconds_count [1-9]' "$WORK/metrics.txt" \
  || fail "no fsync in the storage histogram"
if ! promtool check metrics <"$WORK/metrics.txt"; then
  fail "promtool check metrics found problems (above)"
fi
echo "promtool check metrics: $(grep -c '^# TYPE' "$WORK/metrics.txt") metrics, $(grep -vc '^#' "$WORK/metrics.txt") samples, no problems"
