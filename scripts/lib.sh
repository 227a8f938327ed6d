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

# A free TCP port on loopback, from below the kernel's ephemeral range: a port the kernel
# hands out for ":0" may become the source port of any client socket before the broker binds
# it (crates/ferrymq/tests/common/mod.rs has the same rule).
free_port() {
  python3 - <<'PY'
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
for port in random.sample(range(10000, low), min(2000, low - 10000)) if low > 11000 else [0]:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    print(s.getsockname()[1])
    break
PY
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
