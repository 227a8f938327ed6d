#!/usr/bin/env bash
# Performance regression check: reruns the quick scenario set against FerryMQ and mosquitto
# and compares each FerryMQ/mosquitto ratio with the stored one in bench/baseline.json.
# A ratio more than 10% below its baseline is a regression (exit 1). Ratios, not absolute
# rates, because these shared machines drift; mosquitto is the yardstick measured in the same
# run. `--update` stores this run as the new baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
UPDATE=0; [ "${1:-}" = "--update" ] && UPDATE=1
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
bash scripts/compare-peers.sh --quick --reps 3 --brokers "ferrymq mosquitto" --ratios-json "$OUT"
if [ "$UPDATE" = 1 ]; then
  python3 - "$OUT" <<'PY'
import json, sys, datetime
run = json.load(open(sys.argv[1]))
base = {"created": datetime.date.today().isoformat(),
        "command": "scripts/bench-check.sh --update",
        "yardstick": "mosquitto", "tolerance": 0.10,
        "ratios": run["ratios"]["mosquitto"], "medians": run["medians"]}
json.dump(base, open("bench/baseline.json", "w"), indent=2, ensure_ascii=False)
print("bench/baseline.json updated")
PY
  exit 0
fi
python3 - "$OUT" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))["ratios"]["mosquitto"]
base = json.load(open("bench/baseline.json"))
tol = base.get("tolerance", 0.10)
bad = 0
for name, ref in base["ratios"].items():
    now = run.get(name)
    if now is None:
        print(f"MISSING  {name}: no measurement this run"); bad += 1; continue
    verdict = "ok" if now >= ref * (1 - tol) else "REGRESSION"
    bad += verdict != "ok"
    print(f"{verdict:10} {name}: ferrymq/mosquitto {now:.2f}× (baseline {ref:.2f}×, floor {ref*(1-tol):.2f}×)")
print(f"bench-check: {len(base['ratios']) - bad} passed, {bad} failed")
sys.exit(1 if bad else 0)
PY
