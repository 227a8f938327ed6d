#!/usr/bin/env bash
# The whole test suite: unit, property and integration tests (cargo test), then interop with
# mosquitto-clients and paho-mqtt against a freshly started broker, then the browser tests
# (scripts/browser-test.sh: chromium driven by playwright-core). Installs the interop tools
# when they are missing (Debian's mosquitto-clients and prometheus for promtool; paho-mqtt
# from PyPI into the virtual environment target/venv, see scripts/venv.sh); safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."

# retry and apt_install (one `apt-get update` for this script and the ones it starts).
source scripts/lib.sh

if ! command -v mosquitto_pub >/dev/null || ! command -v mosquitto_sub >/dev/null; then
  apt_install mosquitto-clients
fi
# promtool (Debian's prometheus, without its recommends) lints /metrics: scripts/promtool-check.sh.
command -v promtool >/dev/null || apt_install --no-install-recommends prometheus
FERRYMQ_PYTHON=$(bash scripts/venv.sh)
export FERRYMQ_PYTHON

cargo test --workspace
cargo build -p ferrymq
# A live broker's /metrics after traffic (a queue, dead letters) through `promtool check metrics`.
bash scripts/promtool-check.sh
bash scripts/interop.sh
# MQTT.js over WebSocket and the web dashboard in Debian's chromium (installed when missing).
bash scripts/browser-test.sh
