"""QoS 2 across SIGKILL with paho-mqtt 2.x clients, as a user would run them.

A paho publisher (QoS 2, ~2,000 msg/s, session expiry 3600, clean start only the first time)
and a slow paho subscriber (QoS 2, ~1 ms per message, so its window stays full) run while
`ferrymq serve` is killed with SIGKILL N times and restarted on the same data directory. At
the end it reports messages the publisher had acknowledged but the subscriber never got
(lost) and messages the subscriber's application got twice (duplicates), with the packet ids
of each delivery.

paho-mqtt 2.x (2.2.0 checked) re-publishes a QoS 2 message it has already released
(PUBREL sent) as a new message when a reconnect attempt fails: `reconnect()` resets message
states before connecting, and a second reset turns `resend_pubrel` into `publish` (DUP 0,
same packet id). The broker must route such a PUBLISH: its packet id was released
(MQTT-4.3.3). `--fix-paho` keeps `resend_pubrel` across repeated resets, so the run measures
the broker alone. See docs/crash-testing.md.

    python3 scripts/paho_crash.py target/release/ferrymq [--kills 20] [--fsync always]
        [--seed 1] [--port 18830] [--fix-paho]
"""
import argparse, collections, os, random, signal, socket, subprocess, sys, tempfile, threading, time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def fix_paho():
    from paho.mqtt import client as c
    original = c.Client._messages_reconnect_reset_out

    def reset_keeping_pubrel(self):
        with self._out_message_mutex:
            keep = [m for m in self._out_messages.values() if m.state == c.mqtt_ms_resend_pubrel]
        original(self)
        with self._out_message_mutex:
            for m in keep:
                m.state = c.mqtt_ms_resend_pubrel

    c.Client._messages_reconnect_reset_out = reset_keeping_pubrel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--fsync", default="always", choices=["always", "interval", "os"])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--port", type=int, default=18830)
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--slow-ms", type=float, default=1.0)
    ap.add_argument("--fix-paho", action="store_true")
    a = ap.parse_args()
    if a.fix_paho:
        fix_paho()
    data = tempfile.mkdtemp(prefix="ferrymq-paho-crash-")

    def start():
        return subprocess.Popen(
            [a.binary, "serve", "--mqtt", f"127.0.0.1:{a.port}", "--http", "127.0.0.1:0",
             "--data-dir", data, "--fsync", a.fsync, "--log-level", "error"],
            stdout=subprocess.DEVNULL)

    def wait_up():
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", a.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.01)
        sys.exit("broker did not start")

    def props():
        p = Properties(PacketTypes.CONNECT)
        p.SessionExpiryInterval = 3600
        return p

    lock = threading.Lock()
    got = collections.Counter()
    seen = collections.defaultdict(list)
    acked, mid_to_seq = set(), {}

    def on_message(c, u, m):
        i = int(m.payload.decode())
        with lock:
            got[i] += 1
            seen[i].append((m.mid, m.dup))
        if a.slow_ms:
            time.sleep(a.slow_ms / 1000)

    def on_connect_sub(c, u, flags, rc, p):
        if not flags.session_present:
            c.subscribe("paho-crash/t", qos=2)

    def on_publish(c, u, mid, rc, p):
        with lock:
            acked.add(mid_to_seq.pop(mid, None))

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-crash-sub",
                      protocol=mqtt.MQTTv5)
    sub.on_message, sub.on_connect = on_message, on_connect_sub
    sub.reconnect_delay_set(0.05, 0.2)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-crash-pub",
                      protocol=mqtt.MQTTv5)
    pub.on_publish = on_publish
    pub.reconnect_delay_set(0.05, 0.2)
    pub.max_queued_messages_set(0)

    broker = start()
    wait_up()
    sub.connect("127.0.0.1", a.port, clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                properties=props())
    sub.loop_start()
    pub.connect("127.0.0.1", a.port, clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                properties=props())
    pub.loop_start()
    time.sleep(0.5)

    stop, sent = threading.Event(), [0]

    def publisher():
        i = 0
        while not stop.is_set():
            info = pub.publish("paho-crash/t", str(i).encode(), qos=2)
            with lock:
                mid_to_seq[info.mid] = i
            i += 1
            sent[0] = i
            time.sleep(1.0 / a.rate)

    t = threading.Thread(target=publisher, daemon=True)
    t.start()
    rng = random.Random(a.seed)
    for k in range(a.kills):
        time.sleep(rng.uniform(0.3, 2.0))
        broker.send_signal(signal.SIGKILL)
        broker.wait()
        broker = start()
        wait_up()
        print(f"kill {k + 1}/{a.kills}: published {sent[0]}, received {len(got)}", flush=True)
    stop.set()
    t.join()
    deadline = time.time() + 120
    while time.time() < deadline:
        with lock:
            if not pub._out_messages and all(s in got for s in acked if s is not None):
                break
        time.sleep(0.2)
    with lock:
        dups = {k: v for k, v in got.items() if v > 1}
        lost = sorted(s for s in acked if s is not None and s not in got)
    print(f"published {sent[0]}, acknowledged {len(acked)}, received {len(got)}, "
          f"lost {len(lost)}, duplicates {len(dups)}")
    for k in sorted(dups)[:20]:
        print(f"  message {k}: delivered as (packet id, dup) {seen[k]}")
    if lost:
        print("  lost:", lost[:20])
    broker.send_signal(signal.SIGTERM)
    broker.wait()
    sub.loop_stop()
    pub.loop_stop()
    sys.exit(1 if lost or dups else 0)


if __name__ == "__main__":
    main()
