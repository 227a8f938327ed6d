#!/usr/bin/env bash
# Coverage-guided fuzzing of the MQTT decoder on the stable toolchain (libFuzzer via
# libfuzzer-sys, with the sanitizer-coverage passes cargo-fuzz would add). Usage:
#   scripts/fuzz.sh [SECONDS]        (default 60)
# Crashes land in fuzz/artifacts/; the corpus grows in fuzz/corpus/decode/.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-60}
TARGET=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR=fuzz/target/cov
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing" \
  cargo build --release --target "$TARGET" --manifest-path fuzz/Cargo.toml
mkdir -p fuzz/corpus/decode fuzz/artifacts
# Seeds: a 5.0 CONNECT, a 5.0 PUBLISH with properties, a 3.1.1 SUBSCRIBE.
printf '\x10\x10\x00\x04MQTT\x05\x02\x00\x3c\x03\x21\x00\x0a\x00\x01a' > fuzz/corpus/decode/connect5
printf '\x30\x0e\x00\x01a\x0a\x02\x00\x00\x00\x01\x26\x00\x01k\x00\x01v' > fuzz/corpus/decode/publish5
printf '\x82\x06\x00\x01\x00\x01a\x01' > fuzz/corpus/decode/subscribe3
"$CARGO_TARGET_DIR/$TARGET/release/decode" -max_total_time="$SECS" -artifact_prefix=fuzz/artifacts/ fuzz/corpus/decode
