#!/usr/bin/env bash
# Checks docs/openapi.yaml against the OpenAPI 3.1 schema with openapi-spec-validator (from
# PyPI, into the test venv of scripts/venv.sh; about 5 s the first time). That the file
# matches what the server serves is the cargo test `every_documented_route_is_served`.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${FERRYMQ_PYTHON:-$(bash scripts/venv.sh)}
retry() { "$@" || { sleep 3; "$@"; }; }
if ! "$PY" -c "import openapi_spec_validator" 2>/dev/null; then
  retry "$PY" -m pip install -q --disable-pip-version-check "openapi-spec-validator>=0.7,<0.10" >&2
fi
"$PY" -m openapi_spec_validator docs/openapi.yaml
