#!/usr/bin/env python3
"""Interop checks with paho-mqtt (3.1.1 and 5.0) against a running ferrymq.

Usage: interop_paho.py HOST PORT, with the python of the venv in target/venv (scripts/venv.sh
creates it and prints its path; scripts/interop.sh runs this so). Prints one line per check
and exits non-zero on failure. With INTEROP_WS set (the port of the broker's `ws` listener,
path /mqtt), the WebSocket checks run too (paho's transport="websockets").
"""
import os
import sys
import threading
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

HOST, PORT = sys.argv[1], int(sys.argv[2])
WS_PORT = int(os.environ["INTEROP_WS"]) if os.environ.get("INTEROP_WS") else None
TIMEOUT = 10
RESULTS = []


class Client:
    """A paho client whose received messages land in a list."""

    def __init__(self, version, client_id=None, clean=True, will=None, props=None, ws=False):
        cid = client_id or f"paho-{uuid.uuid4().hex[:8]}"
        kwargs = {"callback_api_version": mqtt.CallbackAPIVersion.VERSION2, "client_id": cid, "protocol": version}
        if version != mqtt.MQTTv5:
            kwargs["clean_session"] = clean
        if ws:
            kwargs["transport"] = "websockets"
        self.c = mqtt.Client(**kwargs)
        port = PORT
        if ws:
            self.c.ws_set_options(path="/mqtt")
            port = WS_PORT
        self.messages = []
        self.lock = threading.Condition()
        self.c.on_message = self._on_message
        self.connected = threading.Event()
        self.c.on_connect = lambda c, u, f, rc, p=None: self.connected.set()
        if will:
            self.c.will_set(*will)
        if version == mqtt.MQTTv5:
            self.c.connect(HOST, port, keepalive=30, clean_start=clean, properties=props)
        else:
            self.c.connect(HOST, port, keepalive=30)
        self.c.loop_start()
        assert self.connected.wait(TIMEOUT), "no CONNACK"

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.messages.append(msg)
            self.lock.notify_all()

    def wait(self, n):
        deadline = time.time() + TIMEOUT
        with self.lock:
            while len(self.messages) < n and time.time() < deadline:
                self.lock.wait(0.1)
            return list(self.messages)

    def subscribe(self, *args, **kwargs):
        done = threading.Event()
        self.c.on_subscribe = lambda *a: done.set()
        self.c.subscribe(*args, **kwargs)
        assert done.wait(TIMEOUT), "no SUBACK"

    def publish(self, topic, payload, qos=0, retain=False, properties=None):
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published(), "publish not acknowledged"

    def stop(self, clean=True):
        if clean:
            self.c.disconnect()
        else:
            self.c.socket().close()
        self.c.loop_stop()


def check(name):
    def wrap(fn):
        try:
            fn()
            RESULTS.append((name, True, ""))
            print(f"ok   {name}")
        except Exception as e:  # noqa: BLE001 - report any failure
            RESULTS.append((name, False, repr(e)))
            print(f"FAIL {name}: {e!r}")
        return fn
    return wrap


for version, tag in [(mqtt.MQTTv311, "3.1.1"), (mqtt.MQTTv5, "5.0")]:

    @check(f"paho {tag}: QoS 0/1/2 round trip with emoji topic")
    def _():
        sub = Client(version)
        sub.subscribe("interop/😀/#", qos=2)
        pub = Client(version)
        for q in (0, 1, 2):
            pub.publish(f"interop/😀/{q}", f"payload {q} 🚀".encode(), qos=q)
        got = sub.wait(3)
        assert sorted((m.topic, m.qos) for m in got) == [(f"interop/😀/{q}", q) for q in (0, 1, 2)], got
        assert all(m.payload.decode().endswith("🚀") for m in got)
        pub.stop()
        sub.stop()

    @check(f"paho {tag}: retained message set and cleared")
    def _():
        topic = f"interop/retained/{uuid.uuid4().hex[:6]}"
        pub = Client(version)
        pub.publish(topic, b"last value", qos=1, retain=True)
        sub = Client(version)
        sub.subscribe(topic, qos=1)
        got = sub.wait(1)
        assert len(got) == 1 and got[0].retain and got[0].payload == b"last value", got
        pub.publish(topic, b"", qos=1, retain=True)
        late = Client(version)
        late.subscribe(topic, qos=1)
        time.sleep(0.5)
        assert late.messages == [], late.messages
        for c in (pub, sub, late):
            c.stop()

    @check(f"paho {tag}: will published on abrupt close")
    def _():
        topic = f"interop/will/{uuid.uuid4().hex[:6]}"
        watch = Client(version)
        watch.subscribe(topic, qos=1)
        dying = Client(version, will=(topic, b"gone", 1, False))
        dying.stop(clean=False)
        got = watch.wait(1)
        assert len(got) == 1 and got[0].payload == b"gone", got
        watch.stop()

    @check(f"paho {tag}: persistent session gets offline QoS 1 messages")
    def _():
        cid = f"paho-persist-{uuid.uuid4().hex[:6]}"
        props = None
        if version == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 300
        sub = Client(version, client_id=cid, clean=False, props=props)
        sub.subscribe("interop/offline", qos=1)
        sub.stop()
        pub = Client(version)
        for i in range(5):
            pub.publish("interop/offline", str(i).encode(), qos=1)
        pub.stop()
        back = Client(version, client_id=cid, clean=False, props=props)
        got = back.wait(5)
        assert [m.payload for m in got] == [str(i).encode() for i in range(5)], got
        back.stop()

    @check(f"paho {tag}: shared subscription splits messages")
    def _():
        a, b = Client(version), Client(version)
        a.subscribe("$share/g/interop/jobs", qos=1)
        b.subscribe("$share/g/interop/jobs", qos=1)
        pub = Client(version)
        for i in range(10):
            pub.publish("interop/jobs", str(i).encode(), qos=1)
        time.sleep(1)
        assert len(a.messages) + len(b.messages) == 10, (a.messages, b.messages)
        assert len(a.messages) == 5, (len(a.messages), len(b.messages))
        for c in (a, b, pub):
            c.stop()


for version, tag in [(mqtt.MQTTv311, "3.1.1"), (mqtt.MQTTv5, "5.0")]:
    if WS_PORT is None:
        break

    @check(f"paho {tag} over WebSocket: QoS 0/1/2 round trip, and to a TCP subscriber")
    def _():
        sub = Client(version, ws=True)
        sub.subscribe("interop/ws/😀/#", qos=2)
        tcp = Client(version)
        tcp.subscribe("interop/ws/😀/#", qos=1)
        pub = Client(version, ws=True)
        big = b"x" * (200 * 1024)
        for q in (0, 1, 2):
            pub.publish(f"interop/ws/😀/{q}", f"payload {q} 🚀".encode(), qos=q)
        pub.publish("interop/ws/😀/big", big, qos=1)
        got = {m.topic: m for m in sub.wait(4)}
        for q in (0, 1, 2):
            m = got[f"interop/ws/😀/{q}"]
            assert (m.qos, m.payload) == (q, f"payload {q} 🚀".encode()), m
        assert got["interop/ws/😀/big"].payload == big
        assert len(tcp.wait(4)) == 4, tcp.messages
        for c in (pub, sub, tcp):
            c.stop()


@check("paho 5.0: user properties, content type, response topic, correlation data")
def _():
    sub = Client(mqtt.MQTTv5)
    sub.subscribe("interop/props", qos=1)
    pub = Client(mqtt.MQTTv5)
    p = Properties(PacketTypes.PUBLISH)
    p.UserProperty = [("b", "2"), ("a", "1"), ("b", "3")]
    p.ContentType = "application/json"
    p.ResponseTopic = "interop/reply"
    p.CorrelationData = b"\x01\x02"
    p.PayloadFormatIndicator = 1
    p.MessageExpiryInterval = 60
    pub.publish("interop/props", b'{"ok":true}', qos=1, properties=p)
    got = sub.wait(1)
    assert len(got) == 1, got
    gp = got[0].properties
    assert gp.UserProperty == [("b", "2"), ("a", "1"), ("b", "3")], gp.UserProperty
    assert gp.ContentType == "application/json" and gp.ResponseTopic == "interop/reply"
    assert gp.CorrelationData == b"\x01\x02" and gp.PayloadFormatIndicator == 1
    assert 0 < gp.MessageExpiryInterval <= 60, gp.MessageExpiryInterval
    sub.stop()
    pub.stop()


@check("paho 5.0: no local and subscription identifiers")
def _():
    from paho.mqtt.subscribeoptions import SubscribeOptions
    me = Client(mqtt.MQTTv5)
    sp = Properties(PacketTypes.SUBSCRIBE)
    sp.SubscriptionIdentifier = 42
    me.subscribe("interop/nl", options=SubscribeOptions(qos=1, noLocal=True), properties=sp)
    me.publish("interop/nl", b"mine", qos=1)
    other = Client(mqtt.MQTTv5)
    other.publish("interop/nl", b"theirs", qos=1)
    got = me.wait(1)
    time.sleep(0.3)
    assert [m.payload for m in me.messages] == [b"theirs"], me.messages
    assert got[0].properties.SubscriptionIdentifier == [42], got[0].properties
    me.stop()
    other.stop()


def create_queue(definition):
    """POST /api/v1/queues on the admin listener (INTEROP_HTTP)."""
    import json
    import os
    import urllib.request
    http = os.environ["INTEROP_HTTP"]
    req = urllib.request.Request(
        f"http://{HOST}:{http}/api/v1/queues",
        data=json.dumps(definition).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        assert r.status in (200, 201), r.status


@check("paho 3.1.1 + 5.0: a work queue hands each message to one consumer, with x-attempt")
def _():
    name = f"paho-{uuid.uuid4().hex[:6]}"
    create_queue({"name": name, "filter": f"{name}/#"})
    v5 = Client(mqtt.MQTTv5)
    v3 = Client(mqtt.MQTTv311)
    for c in (v5, v3):
        c.subscribe(f"$queue/{name}", qos=1)
    pub = Client(mqtt.MQTTv5)
    for i in range(20):
        pub.publish(f"{name}/jobs", f"job {i}".encode(), qos=1)
    deadline = time.time() + TIMEOUT
    while len(v5.messages) + len(v3.messages) < 20 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    got = sorted(m.payload.decode() for m in v5.messages + v3.messages)
    assert got == sorted(f"job {i}" for i in range(20)), got
    assert v5.messages and v3.messages, (len(v5.messages), len(v3.messages))
    attempts = {dict(m.properties.UserProperty).get("x-attempt") for m in v5.messages}
    assert attempts == {"1"}, attempts
    for c in (v5, v3, pub):
        c.stop()


@check("paho 3.1.1: a queue consumer that never acks gets the message again after the ack timeout")
def _():
    name = f"paho-{uuid.uuid4().hex[:6]}"
    create_queue({"name": name, "filter": f"{name}/#", "ack_timeout_ms": 500})
    lazy = Client(mqtt.MQTTv311)
    lazy.c.manual_ack_set(True)
    lazy.subscribe(f"$queue/{name}", qos=1)
    pub = Client(mqtt.MQTTv311)
    started = time.time()
    pub.publish(f"{name}/x", b"work", qos=1)
    got = lazy.wait(2)
    assert [m.payload for m in got] == [b"work", b"work"], got
    assert time.time() - started >= 0.45, time.time() - started
    lazy.stop()
    pub.stop()


passed = sum(1 for _, ok, _ in RESULTS if ok)
failed = len(RESULTS) - passed
print(f"paho: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
