#!/usr/bin/env bash
# The whole test suite: unit, property and integration tests (cargo test), then interop with
# mosquitto-clients and paho-mqtt against a freshly started broker. Installs the interop tools
# when they are missing (Debian's mosquitto-clients; paho-mqtt from PyPI into the virtual
# environment target/venv, see scripts/venv.sh); safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."

retry() { "$@" || { sleep 3; "$@"; }; }

if ! command -v mosquitto_pub >/dev/null || ! command -v mosquitto_sub >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  retry $SUDO apt-get update -qq
  retry $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto-clients
fi
FERRYMQ_PYTHON=$(bash scripts/venv.sh)
export FERRYMQ_PYTHON

cargo test --workspace
cargo build -p ferrymq
bash scripts/interop.sh
