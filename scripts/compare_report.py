#!/usr/bin/env python3
"""Turns compare-peers.sh measurements (JSON lines) into a Markdown table with medians and
FerryMQ/peer ratios. For latency and memory, lower is better, so the ratio is peer/FerryMQ:
in every column a ratio above 1 means FerryMQ leads."""
import json
import statistics
import sys
from collections import OrderedDict, defaultdict

import argparse

ap = argparse.ArgumentParser()
ap.add_argument("results")
ap.add_argument("--ratios-json", help="also write medians and FerryMQ/peer ratios here")
args = ap.parse_args()
rows = [json.loads(l) for l in open(args.results) if l.strip()]
values = defaultdict(list)  # (name, broker, metric) -> [values]
names, brokers = OrderedDict(), OrderedDict()
for r in rows:
    names[r["name"]] = True
    brokers[r["broker"]] = True
    res = r["result"]
    if res.get("failed") or res.get("protocol_errors"):
        values[(r["name"], r["broker"], "failed")].append(1)
        continue
    if res.get("connections"):
        c = res["connections"]
        if c.get("kb_per_connection") is not None:
            values[(r["name"], r["broker"], "kb")].append(c["kb_per_connection"])
        values[(r["name"], r["broker"], "held")].append(c["held"])
        if c.get("connections_per_sec"):
            values[(r["name"], r["broker"], "cps")].append(c["connections_per_sec"])
    elif res.get("latency_us") and not res.get("queue"):
        for q in ("p50", "p99", "p999"):
            values[(r["name"], r["broker"], q)].append(res["latency_us"][q])
    else:
        # A run that lost messages is no result: its rate counts what it dropped as speed.
        # Its loss is reported next to the rate instead.
        expected = res.get("expected") or 0
        if res.get("lost"):
            values[(r["name"], r["broker"], "lossy")].append(res["lost"] / expected if expected else 1.0)
        else:
            values[(r["name"], r["broker"], "rate")].append(res["deliveries_per_sec"])
            # Work queues (rate rows): publish-to-ack latency under full load, shown beside.
            if res.get("queue") and res.get("latency_us"):
                values[(r["name"], r["broker"], "qp99")].append(res["latency_us"]["p99"])
        values[(r["name"], r["broker"], "runs")].append(1)


def med(name, broker, metric):
    v = values.get((name, broker, metric))
    return statistics.median(v) if v else None


def fmt_rate(x):
    return "—" if x is None else (f"{x/1e6:.2f}M" if x >= 1e6 else f"{x/1e3:.0f}K")


peers = [b for b in brokers if b != "ferrymq"]
summary = {"ratios": {}, "medians": {}}
header = ["scenario"] + list(brokers) + [f"ferrymq/{p}" for p in peers]
print("| " + " | ".join(header) + " |")
print("|" + "---|" * len(header))
for name in names:
    cells, ratios = [name], []
    if name.startswith("setup"):
        # Connection-setup rate (connections/s, higher is better).
        for b in brokers:
            v = med(name, b, "cps")
            cells.append("failed" if v is None and med(name, b, "failed") else
                         ("—" if v is None else f"{v:,.0f} conn/s"))
        f = med(name, "ferrymq", "cps")
        for p in peers:
            pv = med(name, p, "cps")
            ratios.append(f"{f/pv:.2f}×" if f and pv else "—")
            if f and pv:
                summary["ratios"].setdefault(p, {})[name] = round(f / pv, 3)
        summary["medians"][name] = {b: med(name, b, "cps") for b in brokers}
    elif any(med(name, b, "rate") is not None for b in brokers):
        for b in brokers:
            v = med(name, b, "rate")
            lossy = values.get((name, b, "lossy"), [])
            runs = len(values.get((name, b, "runs"), []))
            cell = "failed" if med(name, b, "failed") and not runs else fmt_rate(v)
            qp99 = med(name, b, "qp99")
            if qp99 is not None:
                cell += f" (p99 {qp99 / 1000:.0f} ms)"
            if lossy:
                cell += f" ({len(lossy)}/{runs} runs lost, median {100 * statistics.median(lossy):.1f}% lost)"
            cells.append(cell)
        f = med(name, "ferrymq", "rate")
        for p in peers:
            pv = med(name, p, "rate")
            ratios.append(f"{f/pv:.2f}×" if f and pv else "—")
            if f and pv:
                summary["ratios"].setdefault(p, {})[name] = round(f / pv, 3)
        summary["medians"][name] = {b: med(name, b, "rate") for b in brokers}
    elif any(med(name, b, "p99") is not None for b in brokers):
        for b in brokers:
            p50, p99, p999 = (med(name, b, q) for q in ("p50", "p99", "p999"))
            cells.append("—" if p50 is None else f"{p50:.0f} / {p99:.0f} / {p999:.0f} µs")
        f = med(name, "ferrymq", "p99")
        for p in peers:
            pv = med(name, p, "p99")
            ratios.append(f"{pv/f:.2f}× (p99)" if f and pv else "—")
            if f and pv:
                summary["ratios"].setdefault(p, {})[name] = round(pv / f, 3)
        summary["medians"][name] = {b: {q: med(name, b, q) for q in ("p50", "p99", "p999")} for b in brokers}
    else:
        for b in brokers:
            kb, held = med(name, b, "kb"), med(name, b, "held")
            if kb is None and med(name, b, "failed"):
                cells.append("failed")
            else:
                cells.append("—" if kb is None else f"{kb:.2f} KB/conn ({int(held)} held)")
        f = med(name, "ferrymq", "kb")
        for p in peers:
            pv = med(name, p, "kb")
            ratios.append(f"{pv/f:.2f}×" if f and pv else "—")
            if f and pv:
                summary["ratios"].setdefault(p, {})[name] = round(pv / f, 3)
        summary["medians"][name] = {b: med(name, b, "kb") for b in brokers}
    print("| " + " | ".join(cells + ratios) + " |")
print()
if args.ratios_json:
    with open(args.ratios_json, "w") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
if any(k[2] == "qp99" for k in values):
    print("Work queues: messages acked per second (distinct, publish to ack); in brackets the p99 "
          "publish-to-ack latency at that load.")
if any(k[2] == "cps" for k in values) and any(n.startswith("setup") for n in names):
    print("Setup rate: connections per second, each a new TCP connection, its TLS handshake (full, no "
          "resumption) or WebSocket upgrade, and CONNECT/CONNACK, 64 at a time (median of the runs); "
          "a run in which any connection failed is marked failed.")
print("Rates are deliveries per second (medians of the runs that lost nothing: a run with loss is no result, "
      "and its loss is shown instead); latency p50 / p99 / p99.9; ratios above 1× mean FerryMQ leads.")
