#!/usr/bin/env python3
"""Cross-connection reordering probe, against any MQTT 3.1.1 broker.

Two raw connections on one thread. Each try: B sends SUBSCRIBE to a fresh topic and,
without waiting for the SUBACK, A publishes on that topic at once. B's bytes reach the
broker first, so B should get the message; MQTT promises no order across connections, so
missing it is allowed, but it should be rare. After B's SUBACK, A publishes a marker on the
same topic (one connection's packets keep their order), so "B missed it" is decided without
any timeout. Prints how many tries of --tries B missed.

Paho's 5.0 test_request_response does the same and fails when B misses.

    python3 scripts/reorder_probe.py --port 1883 --tries 200
"""
import argparse
import socket
import struct


def remaining_length(n):
    out = b""
    while True:
        d, n = n % 128, n // 128
        out += bytes([d | (128 if n else 0)])
        if not n:
            return out


def string(x):
    x = x.encode()
    return struct.pack(">H", len(x)) + x


def packet(first_byte, body):
    return bytes([first_byte]) + remaining_length(len(body)) + body


class Conn:
    def __init__(self, host, port, client_id):
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        body = string("MQTT") + bytes([4, 2]) + struct.pack(">H", 60) + string(client_id)
        self.sock.sendall(packet(0x10, body))
        kind, _ = self.read()
        assert kind == 2, "no CONNACK"

    def read(self):
        """The next packet: (type, body)."""
        while True:
            n, mult, i = 0, 1, 1
            while i < len(self.buf):
                b = self.buf[i]
                n += (b & 127) * mult
                mult *= 128
                i += 1
                if not b & 128:
                    if len(self.buf) >= i + n:
                        kind, body = self.buf[0] >> 4, self.buf[i : i + n]
                        self.buf = self.buf[i + n :]
                        return kind, body
                    break
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("broker closed the connection")
            self.buf += data


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--tries", type=int, default=200)
    args = ap.parse_args()
    a = Conn(args.host, args.port, "reorder-probe-a")
    b = Conn(args.host, args.port, "reorder-probe-b")
    missed = 0
    for i in range(args.tries):
        topic = "reorder-probe/%d" % i
        b.sock.sendall(packet(0x82, struct.pack(">H", 1) + string(topic) + b"\x00"))
        a.sock.sendall(packet(0x30, string(topic) + b"first"))
        got = []
        while True:
            kind, body = b.read()
            if kind == 3:
                got.append(body)
            elif kind == 9:
                break
        a.sock.sendall(packet(0x30, string(topic) + b"marker"))
        while True:
            kind, body = b.read()
            if kind == 3:
                got.append(body)
                if body.endswith(b"marker"):
                    break
        if not any(g.endswith(b"first") for g in got):
            missed += 1
    print("missed %d of %d (%.1f%%)" % (missed, args.tries, 100.0 * missed / args.tries))


if __name__ == "__main__":
    main()
