#!/usr/bin/env bash
# Crash test: kills a real `ferrymq serve` with SIGKILL at random moments while QoS 1 and
# QoS 2 publishers and a persistent-session subscriber run, and checks that nothing
# acknowledged is lost and no QoS 2 message arrives twice. CI runs 20 cycles as part of
# `cargo test`; this runs more (100 by default).
#
#   scripts/crash-test.sh [CYCLES]        FERRYMQ_CRASH_SEED=N replays a run
set -euo pipefail
cd "$(dirname "$0")/.."
cycles="${1:-100}"
FERRYMQ_CRASH_CYCLES="$cycles" exec cargo test -p ferrymq --test crash -- --nocapture
