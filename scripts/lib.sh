# Shared by the scripts here (sourced, not run): retries, apt installs with one
# `apt-get update` per test run, free loopback ports, a scratch directory that goes away.

# Runs a command, and once more after 3 s if it fails (a registry or mirror hiccup).
retry() { "$@" || { sleep 3; "$@"; }; }

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# apt-get install with the given arguments (packages, --no-install-recommends), quietly.
# The package lists are updated once for the whole run: FERRYMQ_APT_UPDATED is exported,
# so scripts started from this one (scripts/test.sh → browser-test.sh) do not update again.
apt_install() {
  if [ -z "${FERRYMQ_APT_UPDATED:-}" ]; then
    retry $SUDO apt-get update -qq || return 1
    export FERRYMQ_APT_UPDATED=1
  fi
  retry $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# A free TCP port on loopback.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Makes WORK, a scratch directory removed at exit after the processes in PIDS are stopped.
scratch_dir() {
  WORK=$(mktemp -d)
  PIDS=()
  trap cleanup EXIT
}
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
