#!/usr/bin/env bash
# The Python the test tools run with: a virtual environment in target/venv holding paho-mqtt.
# Current Debian and Ubuntu refuse `pip install` into the system Python (PEP 668), so nothing
# goes there. Idempotent: a working venv is reused as it is. Creates it when missing (installing
# Debian's python3-venv first if `python3 -m venv` lacks ensurepip), retries a failed pip
# download once, and prints the venv's python on stdout (everything else goes to stderr).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${FERRYMQ_VENV:-target/venv}
PY=$VENV/bin/python
retry() { "$@" || { sleep 3; "$@"; }; }

if ! "$PY" -m pip --version >/dev/null 2>&1; then
  rm -rf "$VENV"  # a half-made one (venv fails after creating the directory)
  if ! python3 -m venv "$VENV" >&2; then
    rm -rf "$VENV"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    retry $SUDO apt-get update -qq >&2
    retry $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
    python3 -m venv "$VENV" >&2
  fi
fi
if ! "$PY" -c "import paho.mqtt" 2>/dev/null; then
  retry "$PY" -m pip install -q --disable-pip-version-check "paho-mqtt>=2,<3" >&2
fi
case $PY in /*) echo "$PY" ;; *) echo "$PWD/$PY" ;; esac
