//! Simulation: random sequences of publishes, disconnects, reconnects, takeovers, partial acks
//! and clock jumps, run through the engine with a virtual clock. Invariants checked:
//! - no acknowledged QoS 1/2 message is lost for a persistent session (each is delivered at
//!   least once once the subscriber finally stays and acks everything);
//! - no QoS 2 message reaches a subscriber twice as a new delivery (exactly once);
//! - both hold across crashes: journaling is on, and at random steps the broker is replaced by
//!   one rebuilt from the journal alone (every connection lost), sometimes after a checkpoint
//!   with the log before it thrown away;
//! - and with queues too small for the load under `queue_full = backpressure`: the publisher's
//!   acknowledgements are held (or refused with 0x97 after the timeout), and what it was told
//!   is stored is still never lost; held QoS 2 publishes resent after a crash are routed once.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use ferrymq_core::*;
use ferrymq_mqtt::*;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Sub {
    id: String,
    conn: Option<u64>,
    /// Deliveries received and not yet acknowledged: packet id -> (message id, QoS). The QoS
    /// is the delivery's, which is lower than the subscription's for QoS 1 publishes.
    unacked: BTreeMap<u16, (u64, QoS)>,
    /// QoS 2: packet ids received and not yet released by PUBREL.
    awaiting_rel: BTreeSet<u16>,
    /// Message ids delivered to the application.
    got: BTreeSet<u64>,
    duplicates_qos2: u64,
}

struct Sim {
    broker: Broker,
    now: Time,
    out: Outbox,
    next_conn: u64,
    subs: Vec<Sub>,
    publisher: u64,
    accepted: BTreeSet<u64>,
    next_msg: u64,
    /// Every journal record so far, as the driver's log would hold them.
    log: Vec<Vec<u8>>,
    crashes: u64,
    /// QoS 2 publishes the publisher has a PUBREC for and has not released yet: on a new
    /// connection it resends them (DUP), and the broker must not route them again.
    unreleased: Vec<(u16, u64)>,
    /// Publishes not answered yet (their acknowledgement is held for a full queue): packet
    /// id -> (message, QoS). Resent on a new connection.
    unanswered: BTreeMap<u16, (u64, QoS)>,
    /// Acknowledgements held, over every engine of the run.
    held: u64,
    /// The subscribers' receive maximum: small keeps their windows full, so messages move
    /// from queue to flight on almost every acknowledgement.
    receive_maximum: u16,
}

fn connect_packet(id: &str, clean: bool, receive_maximum: u16) -> Connect {
    Connect {
        version: ProtocolVersion::V5,
        client_id: id.into(),
        clean_start: clean,
        keep_alive: 0,
        username: None,
        password: None,
        will: None,
        properties: PropertyValues {
            session_expiry_interval: Some(3600),
            receive_maximum: Some(receive_maximum),
            ..Default::default()
        }
        .into(),
    }
}

impl Sim {
    fn new(receive_maximum: u16, config: BrokerConfig) -> Sim {
        let mut broker = Broker::new(config);
        broker.enable_journal(&mut Outbox::default());
        let mut sim = Sim {
            broker,
            log: Vec::new(),
            crashes: 0,
            unreleased: Vec::new(),
            unanswered: BTreeMap::new(),
            held: 0,
            receive_maximum,
            now: Time(0),
            out: Outbox::default(),
            next_conn: 1,
            subs: Vec::new(),
            publisher: 0,
            accepted: BTreeSet::new(),
            next_msg: 0,
        };
        sim.publisher = sim.open("publisher", true);
        for (i, qos) in [
            QoS::AtLeastOnce,
            QoS::ExactlyOnce,
            QoS::AtLeastOnce,
            QoS::ExactlyOnce,
        ]
        .into_iter()
        .enumerate()
        {
            sim.subs.push(Sub {
                id: format!("sub-{i}"),
                conn: None,
                unacked: BTreeMap::new(),
                awaiting_rel: BTreeSet::new(),
                got: BTreeSet::new(),
                duplicates_qos2: 0,
            });
            sim.reconnect(i, true);
            let conn = sim.subs[i].conn.unwrap();
            let options = SubscriptionOptions {
                qos,
                ..Default::default()
            };
            sim.broker.packet(
                ConnId(conn),
                Packet::Subscribe(Subscribe {
                    packet_id: 1,
                    filters: vec![("t/#".into(), options)],
                    properties: Properties::default(),
                }),
                sim.now,
                &mut sim.out,
            );
        }
        sim.pump();
        sim
    }

    fn open(&mut self, id: &str, clean: bool) -> u64 {
        let conn = self.next_conn;
        self.next_conn += 1;
        let outcome = self.broker.connect(
            ConnId(conn),
            connect_packet(id, clean, self.receive_maximum),
            self.now,
            &mut self.out,
        );
        assert!(outcome.accepted);
        conn
    }

    fn reconnect(&mut self, i: usize, clean: bool) {
        // A new connection takes the session over; the subscriber forgets the old one's
        // unacknowledged deliveries, the broker will resend them.
        let id = self.subs[i].id.clone();
        let conn = self.open(&id, clean);
        let s = &mut self.subs[i];
        s.conn = Some(conn);
        s.unacked.clear();
        self.pump();
    }

    /// The process dies: only the journal survives. A new engine is rebuilt from it, every
    /// client reconnects (subscribers keep their QoS 2 receive state, as a client library
    /// does, and forget unacknowledged deliveries, which the broker resends).
    fn crash(&mut self) {
        self.pump();
        let mut broker = Broker::new(self.broker.config().clone());
        let report = broker
            .restore(self.log.iter().map(|b| b.as_ref()), self.now)
            .expect("the journal replays");
        assert_eq!(report.skipped, 0, "replay named unknown state: {report:?}");
        self.out = Outbox::default();
        self.held += self.broker.stats().acks_held_total;
        // What restore concluded (the crash disconnected connected sessions) is journaled
        // before anything else, as the server does.
        broker.enable_journal(&mut self.out);
        self.broker = broker;
        self.drain_journal();
        self.crashes += 1;
        for s in &mut self.subs {
            s.conn = None;
            s.unacked.clear();
        }
        self.publisher = self.open("publisher", false);
        // Unanswered publishes are sent again: a held QoS 2 one must be answered without
        // being routed a second time (its inbound id was stored with the message).
        for (pid, (msg, qos)) in self.unanswered.clone() {
            let again = self.publish_packet(qos, pid, msg, true);
            self.broker
                .packet(ConnId(self.publisher), again, self.now, &mut self.out);
        }
        self.pump();
        for (pid, msg) in std::mem::take(&mut self.unreleased) {
            let again = self.publish_packet(QoS::ExactlyOnce, pid, msg, true);
            self.broker
                .packet(ConnId(self.publisher), again, self.now, &mut self.out);
        }
        self.release_all();
    }

    fn publish_packet(&self, qos: QoS, pid: u16, msg: u64, dup: bool) -> Packet {
        Packet::Publish(Publish {
            dup,
            qos,
            retain: false,
            topic: format!("t/{}", msg % 7),
            packet_id: Some(pid),
            properties: Properties::default(),
            payload: Bytes::copy_from_slice(&msg.to_be_bytes()),
        })
    }

    fn release_all(&mut self) {
        for (pid, _) in std::mem::take(&mut self.unreleased) {
            let rel = Packet::PubRel(PubResp::new(pid, ReasonCode::Success));
            self.broker
                .packet(ConnId(self.publisher), rel, self.now, &mut self.out);
        }
        self.pump();
    }

    /// A checkpoint. The log before it may be reclaimed, or kept (replay starts afresh at the
    /// checkpoint either way).
    fn checkpoint(&mut self, reclaim: bool) {
        self.pump();
        let begin = self.broker.checkpoint(&mut self.out).unwrap();
        if reclaim {
            self.log.clear();
        }
        let skip = if reclaim { begin as usize } else { 0 };
        self.log
            .extend(self.out.journal.records().skip(skip).map(|r| r.to_vec()));
        self.out.journal.clear();
    }

    fn drain_journal(&mut self) {
        self.log
            .extend(self.out.journal.records().map(|r| r.to_vec()));
        self.out.journal.clear();
    }

    /// Hands every queued action to its client.
    fn pump(&mut self) {
        self.drain_journal();
        while !self.out.actions.is_empty() {
            let actions = std::mem::take(&mut self.out.actions);
            for (conn, action) in actions {
                self.client_receives(conn.0, action);
            }
            self.drain_journal();
        }
    }

    fn client_receives(&mut self, conn: u64, action: Action) {
        if conn == self.publisher {
            if let Action::Send(Packet::PubAck(r) | Packet::PubRec(r)) = action {
                self.publisher_answered(r);
            }
            return;
        }
        let Some(i) = self.subs.iter().position(|s| s.conn == Some(conn)) else {
            return;
        };
        let s = &mut self.subs[i];
        match action {
            Action::Deliver(d) => {
                let msg = u64::from_be_bytes(d.message.payload[..8].try_into().unwrap());
                let pid = d.packet_id.unwrap();
                match d.qos {
                    QoS::ExactlyOnce => {
                        // The receiver keeps the packet id from first receipt until PUBREL, and
                        // delivers to the application only on first receipt (MQTT-4.3.3).
                        if s.awaiting_rel.insert(pid) && !s.got.insert(msg) {
                            s.duplicates_qos2 += 1;
                        }
                    }
                    _ => {
                        s.got.insert(msg);
                    }
                }
                s.unacked.insert(pid, (msg, d.qos));
            }
            Action::Send(Packet::PubRel(r)) => {
                s.awaiting_rel.remove(&r.packet_id);
                let ack = Packet::PubComp(PubResp::new(r.packet_id, ReasonCode::Success));
                self.broker
                    .packet(ConnId(conn), ack, self.now, &mut self.out);
            }
            Action::Close => s.conn = None,
            _ => {}
        }
    }

    fn publish(&mut self, qos: QoS, defer_release: bool) {
        let msg = self.next_msg;
        self.next_msg += 1;
        let pid = (msg % 60_000) as u16 + 1;
        let p = self.publish_packet(qos, pid, msg, false);
        self.unanswered.insert(pid, (msg, qos));
        self.broker
            .packet(ConnId(self.publisher), p, self.now, &mut self.out);
        self.pump();
        if !defer_release {
            self.release_all();
        }
    }

    /// The publisher's PUBACK/PUBREC, now or after being held: a success means stored.
    fn publisher_answered(&mut self, r: PubResp) {
        let Some((msg, qos)) = self.unanswered.remove(&r.packet_id) else {
            return; // the answer to a resend already answered
        };
        if r.reason.is_error() {
            return; // refused (0x97): the publisher knows it was not stored
        }
        self.accepted.insert(msg);
        if qos == QoS::ExactlyOnce {
            self.unreleased.push((r.packet_id, msg));
        }
    }

    /// The subscriber acknowledges some of what it holds.
    fn ack_some(&mut self, i: usize, rng: &mut Rng, all: bool) {
        let Some(conn) = self.subs[i].conn else {
            return;
        };
        let pids: Vec<u16> = self.subs[i].unacked.keys().copied().collect();
        for pid in pids {
            if !all && rng.below(2) == 0 {
                continue;
            }
            let Some((_, qos)) = self.subs[i].unacked.remove(&pid) else {
                continue;
            };
            let packet = match qos {
                QoS::ExactlyOnce => Packet::PubRec(PubResp::new(pid, ReasonCode::Success)),
                _ => Packet::PubAck(PubResp::new(pid, ReasonCode::Success)),
            };
            self.broker
                .packet(ConnId(conn), packet, self.now, &mut self.out);
            self.pump();
            if self.subs[i].conn.is_none() {
                return;
            }
        }
    }
}

/// How a run is shaped.
struct Shape {
    receive_maximum: u16,
    /// `max_queued_messages`, under `queue_full = backpressure`.
    max_queued: usize,
    /// Fewest publishes that must be acknowledged for the run to prove anything (full
    /// queues refuse many once the clock jumps past the timeout).
    min_accepted: usize,
    /// One step in this many crashes (and one checkpoints).
    crash_every: u64,
    /// Out of 100: how many steps publish; acknowledgements take the next 25.
    publish_share: u64,
}

const MIXED: Shape = Shape {
    receive_maximum: 8,
    max_queued: 1_000_000,
    min_accepted: 150,
    crash_every: 50,
    publish_share: 45,
};

/// Returns how many acknowledgements were held.
fn run(seed: u64, steps: usize, shape: &Shape) -> u64 {
    let mut rng = Rng(seed | 1);
    let config = BrokerConfig {
        max_queued_messages: shape.max_queued,
        queue_full: QueueFull::Backpressure,
        ..Default::default()
    };
    let mut sim = Sim::new(shape.receive_maximum, config);
    for _ in 0..steps {
        let i = rng.below(sim.subs.len() as u64) as usize;
        match rng.below(shape.crash_every) {
            0 => sim.crash(),
            1 => sim.checkpoint(rng.below(2) == 0),
            _ => {}
        }
        // Publishing takes `publish_share` of the steps; the other actions share the rest in
        // the proportions of the mixed run (25 ack, 10 drop, 13 reconnect, 7 clock).
        let (p, roll) = (shape.publish_share, rng.below(100));
        let bucket = if roll < p {
            0
        } else {
            45 + (roll - p) * 55 / (100 - p)
        };
        match bucket {
            0..=44 => {
                let qos = if rng.below(2) == 0 {
                    QoS::AtLeastOnce
                } else {
                    QoS::ExactlyOnce
                };
                sim.publish(qos, rng.below(2) == 0)
            }
            45..=69 => sim.ack_some(i, &mut rng, false),
            70..=79 => {
                if let Some(conn) = sim.subs[i].conn.take() {
                    sim.broker.closed(ConnId(conn), sim.now, &mut sim.out);
                    sim.pump();
                }
            }
            80..=92 => sim.reconnect(i, false), // resume, or take over a live connection
            _ => {
                sim.now = sim.now.plus_secs(rng.below(30) as u32);
                sim.broker.tick(sim.now, &mut sim.out);
                sim.pump();
            }
        }
    }
    // Settle: every subscriber comes back and acknowledges until nothing is left.
    for i in 0..sim.subs.len() {
        sim.reconnect(i, false);
        for _ in 0..10_000 {
            if sim.subs[i].unacked.is_empty() {
                break;
            }
            sim.ack_some(i, &mut rng, true);
        }
    }
    assert_eq!(
        sim.broker.stats().dropped_queue_full,
        0,
        "seed {seed}: limits too small for the test"
    );
    for s in &sim.subs {
        let missing: Vec<&u64> = sim.accepted.iter().filter(|m| !s.got.contains(m)).collect();
        assert!(
            missing.is_empty(),
            "seed {seed}: {} lost {} acknowledged messages, e.g. {:?}",
            s.id,
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        assert_eq!(
            s.duplicates_qos2, 0,
            "seed {seed}: {} got QoS 2 messages twice",
            s.id
        );
        // Everything was acknowledged, so nothing may be left in flight or queued.
        assert_eq!(
            sim.broker.session_pending(&s.id),
            Some((0, 0)),
            "seed {seed}: {} has messages stuck",
            s.id
        );
    }
    assert!(sim.crashes > 0, "seed {seed}: no crash happened");
    assert!(
        sim.accepted.len() >= shape.min_accepted,
        "seed {seed}: the run published too little to prove anything: {} accepted",
        sim.accepted.len()
    );
    assert!(
        sim.unanswered.is_empty(),
        "seed {seed}: acknowledgements still held once every queue drained: {:?}",
        sim.unanswered
    );
    sim.held + sim.broker.stats().acks_held_total
}

#[test]
fn random_sessions_lose_nothing_acknowledged_and_never_duplicate_qos2() {
    for seed in 1..=40u64 {
        run(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15), 600, &MIXED);
    }
}

/// Slow subscribers (a window of 1 or 2, always full, a long queue behind it) and a crash
/// every few steps: most crashes land while messages move from the queue into flight.
#[test]
fn crashes_while_full_windows_move_messages_from_queue_to_flight() {
    for seed in 1..=40u64 {
        let shape = Shape {
            receive_maximum: 1 + (seed % 2) as u16,
            max_queued: 1_000_000,
            min_accepted: 150,
            crash_every: 12,
            publish_share: 60,
        };
        run(seed.wrapping_mul(0xD1B5_4A32_D192_ED03), 600, &shape);
    }
}

/// Queues of 3 behind windows of 2, so most publishes find a full queue: acknowledgements
/// are held, released as subscribers ack, refused when the clock jumps past the timeout, and
/// cut off by crashes (the publisher then sends them again).
#[test]
fn full_queues_under_backpressure_lose_nothing_acknowledged() {
    let mut held = 0;
    for seed in 1..=40u64 {
        let shape = Shape {
            receive_maximum: 2,
            max_queued: 3,
            min_accepted: 20,
            crash_every: 25,
            publish_share: 50,
        };
        held += run(seed.wrapping_mul(0xA076_1D64_78BD_642F), 600, &shape);
    }
    assert!(held > 100, "only {held} acknowledgements were held");
}
