#!/usr/bin/env bash
# Coverage-guided fuzzing on the stable toolchain (libFuzzer via libfuzzer-sys, with the
# sanitizer-coverage passes cargo-fuzz would add). Usage:
#   scripts/fuzz.sh [SECONDS] [TARGET]     (default 60 s, target decode)
# Targets (fuzz/fuzz_targets/): decode (the MQTT decoder), password_file (the [auth]
# password-file parser), jwt (JWT verification and its claims), websocket (MQTT over
# WebSocket framing), when present.
# Crashes land in fuzz/artifacts/; the corpus grows in fuzz/corpus/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-60}
NAME=${2:-decode}
TARGET=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR=fuzz/target/cov
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing" \
  cargo build --release --target "$TARGET" --manifest-path fuzz/Cargo.toml --bin "$NAME"
CORPUS=fuzz/corpus/$NAME
mkdir -p "$CORPUS" fuzz/artifacts
case "$NAME" in
  decode)
    # A 5.0 CONNECT, a 5.0 PUBLISH with properties, a 3.1.1 SUBSCRIBE.
    printf '\x10\x10\x00\x04MQTT\x05\x02\x00\x3c\x03\x21\x00\x0a\x00\x01a' > "$CORPUS/connect5"
    printf '\x30\x0e\x00\x01a\x0a\x02\x00\x00\x00\x01\x26\x00\x01k\x00\x01v' > "$CORPUS/publish5"
    printf '\x82\x06\x00\x01\x00\x01a\x01' > "$CORPUS/subscribe3"
    ;;
  password_file)
    printf 'alice:$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA\n# a comment\n\nbob:$argon2id$v=19$m=8,t=1,p=1$AAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA\n' > "$CORPUS/two-users"
    ;;
  jwt)
    printf '{"sub":"alice","exp":4102444800,"acl":{"publish":["a/#"],"subscribe":["b/+"]}}' > "$CORPUS/claims"
    printf 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.AAAA' > "$CORPUS/token"
    ;;
esac
"$CARGO_TARGET_DIR/$TARGET/release/$NAME" -max_total_time="$SECS" -artifact_prefix=fuzz/artifacts/ "$CORPUS"
