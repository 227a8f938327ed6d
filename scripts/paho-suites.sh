#!/usr/bin/env bash
# The Eclipse Paho interoperability suites against FerryMQ: client_test.py (MQTT 3.1.1) and
# client_test5.py (MQTT 5.0) from a checkout of eclipse/paho.mqtt.testing, which cannot be
# vendored. Builds the release binary, starts a fresh broker with docs/paho-interop.toml for
# each suite, runs it with the venv's Python (scripts/venv.sh) and prints one line per test
# and a summary. Not part of CI (the suites take about 4 minutes and need the checkout).
#
#   scripts/paho-suites.sh PATH/TO/paho.mqtt.testing [Test.test_name ...]
#
# Test names, if given, are passed to both suites (a name a suite lacks is an ERROR there).
# PAHO_SUITES="client_test5.py" runs only that suite. PAHO_PORT (default 21884) and
# PAHO_HTTP_PORT (28082) choose the broker's ports. Logs stay in the printed directory.
# Exits 1 when any test did not pass.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CHECKOUT=${1:?usage: scripts/paho-suites.sh PATH/TO/paho.mqtt.testing [Test.name ...]}
shift
SUITE_DIR=$(cd "$CHECKOUT/interoperability" 2>/dev/null && pwd) \
  || { echo "no interoperability/ directory in $CHECKOUT" >&2; exit 2; }
SUITES=${PAHO_SUITES:-client_test.py client_test5.py}
PORT=${PAHO_PORT:-21884}
HTTP=${PAHO_HTTP_PORT:-28082}
PY=$(bash scripts/venv.sh) || exit 2
cargo build --release -q -p ferrymq || exit 2
BIN=$ROOT/target/release/ferrymq
WORK=$(mktemp -d -t ferrymq-paho.XXXXXX)
echo "ferrymq $(git describe --always --dirty 2>/dev/null) with docs/paho-interop.toml;" \
  "suites from $CHECKOUT ($(git -C "$CHECKOUT" rev-parse --short HEAD 2>/dev/null || echo 'no git'));" \
  "logs in $WORK"

SERVER=""
stop() { [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null; SERVER=""; }
trap stop EXIT

PASSED=0; FAILED=0
for suite in $SUITES; do
  name=${suite%.py}
  rm -rf "$WORK/data-$name"
  "$BIN" serve --config docs/paho-interop.toml --mqtt 127.0.0.1:$PORT --http 127.0.0.1:$HTTP \
    --data-dir "$WORK/data-$name" >"$WORK/broker-$name.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 100); do
    "$PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$HTTP/health', timeout=1)" \
      2>/dev/null && break
    sleep 0.1
  done
  echo "== $suite"
  (cd "$SUITE_DIR" && timeout 900 "$PY" "$ROOT/scripts/paho_suite.py" "$suite" "$PORT" \
    "$WORK/results-$name.txt" "$@" >"$WORK/suite-$name.log" 2>&1)
  if [ ! -s "$WORK/results-$name.txt" ]; then
    echo "ERROR  $suite produced no results; see $WORK/suite-$name.log"
    FAILED=$((FAILED + 1))
  else
    while read -r outcome test; do
      printf '  %-5s %s\n' "$outcome" "$test"
      case $outcome in pass|skip) PASSED=$((PASSED + 1)) ;; *) FAILED=$((FAILED + 1)) ;; esac
    done <"$WORK/results-$name.txt"
  fi
  if ! kill -0 "$SERVER" 2>/dev/null; then
    echo "  broker exited during $suite; see $WORK/broker-$name.log"
    FAILED=$((FAILED + 1))
  fi
  stop
done
echo "paho suites: $PASSED passed, $FAILED failed (failure details in $WORK/suite-*.log)"
[ "$FAILED" -eq 0 ]
