#!/usr/bin/env bash
# Burst loss and broker peak memory for a FerryMQ binary at several high marks: the
# measurement behind docs/architecture.md "Back-pressure".
#
#   scripts/burst-alternatives.sh BROKER_BINARY "LABEL" MIB [MIB...]
#
# Runs `ferrymq bench throughput --burst -n 500000` and `fanin --burst -n 10000` three times
# each against a fresh in-memory broker per run, and prints delivered share, rate and the
# broker's peak RSS (VmHWM). The load generator is this tree's release build.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p ferrymq
BENCH=$PWD/target/release/ferrymq
BIN=$1; LABEL=$2; shift 2
PORT=21883
for mib in "$@"; do
  D=$(mktemp -d)
  printf '[limits]\nmax_outbound_bytes = %d\n[storage]\npersistence = false\n' $((mib * 1024 * 1024)) >"$D/c.toml"
  for scen in "throughput --burst -n 500000" "fanin --burst -n 10000"; do
    for _ in 1 2 3; do
      "$BIN" serve --config "$D/c.toml" --mqtt 127.0.0.1:$PORT --http 127.0.0.1:28080 --log-level warn >"$D/log" 2>&1 &
      BP=$!
      for _ in $(seq 1 50); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.1; done
      # shellcheck disable=SC2086
      out=$("$BENCH" bench $scen --port $PORT --timeout 60 --json 2>/dev/null || true)
      hwm=$(awk '/VmHWM/ {print $2}' /proc/$BP/status)
      kill $BP; wait $BP 2>/dev/null || true
      python3 -c 'import json,sys
r = json.loads(sys.argv[1])
share = 100 * r["received"] / max(r["expected"], 1)
rate = r["deliveries_per_sec"] / 1e6
print("%s %s MiB | %s | %.1f%% | %.2fM/s | peak RSS %d MiB" % (sys.argv[2], sys.argv[3], r["scenario"], share, rate, int(sys.argv[4]) // 1024))' "$out" "$LABEL" "$mib" "$hwm"
    done
  done
  rm -rf "$D"
done
