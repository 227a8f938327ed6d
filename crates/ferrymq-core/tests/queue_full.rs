//! `queue_full`: what a new QoS 1/2 message does for a session whose queue is full, on a
//! virtual clock. Backpressure holds the publisher's acknowledgement (and pauses its input)
//! until there is room or the timeout refuses the message; reject refuses at once;
//! drop_oldest makes room by dropping the oldest queued message.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use ferrymq_core::*;
use ferrymq_mqtt::*;

const V5: ProtocolVersion = ProtocolVersion::V5;
const V3: ProtocolVersion = ProtocolVersion::V311;
const TIMEOUT: u64 = 5_000;

struct H {
    b: Broker,
    now: Time,
    out: Outbox,
    log: Vec<Vec<u8>>,
}

fn config(policy: QueueFull, limit: usize) -> BrokerConfig {
    BrokerConfig {
        max_queued_messages: limit,
        queue_full: policy,
        queue_full_timeout_ms: TIMEOUT,
        ..Default::default()
    }
}

impl H {
    fn new(policy: QueueFull, limit: usize) -> H {
        let mut b = Broker::new(config(policy, limit));
        let mut out = Outbox::default();
        b.enable_journal(&mut out);
        H {
            b,
            now: Time(1_000),
            out,
            log: Vec::new(),
        }
    }

    /// A durable client with receive window `window`.
    fn connect(&mut self, conn: u64, id: &str, v: ProtocolVersion, window: u16) {
        let mut properties = Properties::default();
        if v == V5 {
            properties.session_expiry_interval = Some(3600);
            properties.receive_maximum = Some(window);
        }
        let c = Connect {
            version: v,
            client_id: id.into(),
            clean_start: false,
            keep_alive: 0,
            username: None,
            password: None,
            will: None,
            properties,
        };
        assert!(
            self.b
                .connect(ConnId(conn), c, self.now, &mut self.out)
                .accepted
        );
    }

    fn packet(&mut self, conn: u64, p: Packet) {
        self.b.packet(ConnId(conn), p, self.now, &mut self.out);
    }

    fn subscribe(&mut self, conn: u64, filter: &str) {
        let options = SubscriptionOptions {
            qos: QoS::ExactlyOnce,
            ..Default::default()
        };
        self.packet(
            conn,
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                filters: vec![(filter.into(), options)],
                properties: Properties::default(),
            }),
        );
    }

    fn publish(&mut self, conn: u64, topic: &str, qos: QoS, pid: u16) {
        let p = Publish {
            dup: false,
            qos,
            retain: false,
            topic: topic.into(),
            packet_id: Some(pid),
            properties: Properties::default(),
            payload: Bytes::from(format!("{pid}")),
        };
        self.packet(conn, Packet::Publish(p));
    }

    fn tick_to(&mut self, t: Time) {
        self.now = t;
        self.b.tick(t, &mut self.out);
    }

    /// Takes every action for `conn`, keeping the others.
    fn take(&mut self, conn: u64) -> Vec<Action> {
        let (mine, rest): (Vec<_>, Vec<_>) = self
            .out
            .actions
            .drain(..)
            .partition(|(c, _)| *c == ConnId(conn));
        self.out.actions = rest;
        mine.into_iter().map(|(_, a)| a).collect()
    }

    /// The PUBACKs/PUBRECs sent to `conn` since the last call: (packet id, reason).
    fn acks(&mut self, conn: u64) -> Vec<(u16, ReasonCode)> {
        assert_eq!(
            self.b.stats().held_acks as usize,
            self.b.held_acks(),
            "the held-acks gauge drifted"
        );
        self.take(conn)
            .into_iter()
            .filter_map(|a| match a {
                Action::Send(Packet::PubAck(r) | Packet::PubRec(r)) => {
                    Some((r.packet_id, r.reason))
                }
                _ => None,
            })
            .collect()
    }

    /// Payloads delivered to `conn` since the last call, with their packet ids.
    fn delivered(&mut self, conn: u64) -> Vec<(String, Option<u16>)> {
        self.take(conn)
            .into_iter()
            .filter_map(|a| match a {
                Action::Deliver(d) => Some((
                    String::from_utf8(d.message.payload.to_vec()).unwrap(),
                    d.packet_id,
                )),
                _ => None,
            })
            .collect()
    }

    fn flow(&mut self) -> Vec<(u64, Flow)> {
        self.out.flow.drain(..).map(|(c, f)| (c.0, f)).collect()
    }

    fn queued(&self, id: &str) -> usize {
        self.b.session_pending(id).unwrap().1
    }

    /// Crash and restart from the journal alone.
    fn restart(&mut self) -> RestoreReport {
        self.log
            .extend(self.out.journal.records().map(|r| r.to_vec()));
        let mut b = Broker::new(self.b.config().clone());
        let report = b
            .restore(self.log.iter().map(|r| r.as_slice()), self.now)
            .unwrap();
        let mut first = Outbox::default();
        b.enable_journal(&mut first);
        self.log.extend(first.journal.records().map(|r| r.to_vec()));
        self.b = b;
        self.out = Outbox::default();
        report
    }
}

fn ok(pids: &[u16]) -> Vec<(u16, ReasonCode)> {
    pids.iter().map(|p| (*p, ReasonCode::Success)).collect()
}

fn puback(pid: u16) -> Packet {
    Packet::PubAck(PubResp::new(pid, ReasonCode::Success))
}

/// Subscriber "s" on conn 1 (window 1) subscribed to `q/#`, publisher "p" on conn 2.
fn online_pair(policy: QueueFull, limit: usize, pv: ProtocolVersion) -> H {
    let mut h = H::new(policy, limit);
    h.connect(1, "s", V5, 1);
    h.subscribe(1, "q/#");
    h.connect(2, "p", pv, 10);
    h.take(1);
    h.take(2);
    h
}

#[test]
fn backpressure_holds_the_ack_until_the_queue_has_room_and_keeps_ack_order() {
    let mut h = online_pair(QueueFull::Backpressure, 2, V5);
    // m1 in flight, m2 and m3 queued (the limit), m4 and m5 past it.
    for pid in 1..=5 {
        h.publish(2, "q/a", QoS::AtLeastOnce, pid);
    }
    assert_eq!(h.acks(2), ok(&[1, 2, 3]));
    assert_eq!(h.flow(), vec![(2, Flow::Pause)]);
    assert_eq!(h.queued("s"), 4, "held messages are queued at once");
    // A publish with room anywhere still waits behind the held ones (MQTT-4.6.0-2).
    h.publish(2, "other", QoS::AtLeastOnce, 6);
    assert_eq!(h.acks(2), vec![]);
    assert_eq!(h.b.held_acks(), 3);

    // The subscriber acks m1: m2 goes in flight, m4 moves to place 1 of 2.
    assert_eq!(h.delivered(1), vec![("1".into(), Some(1))]);
    h.packet(1, puback(1));
    assert_eq!(h.acks(2), ok(&[4]));
    assert_eq!(h.flow(), vec![]);
    h.packet(1, puback(2));
    assert_eq!(h.acks(2), ok(&[5, 6]), "the rest follow, in order");
    assert_eq!(h.flow(), vec![(2, Flow::Resume)]);
    assert_eq!(h.b.held_acks(), 0);
    assert_eq!(h.b.stats().acks_held_total, 2);
    assert_eq!(h.b.stats().refused_queue_full, 0);
    // Nothing was lost: the subscriber gets every message, in order.
    let mut got = h.delivered(1);
    for pid in 3..=5u16 {
        let (_, p) = got.last().cloned().unwrap();
        h.packet(1, puback(p.unwrap()));
        got.extend(h.delivered(1));
        let _ = pid;
    }
    let payloads: Vec<String> = got.into_iter().map(|(m, _)| m).collect();
    assert_eq!(payloads, vec!["2", "3", "4", "5"]);
    // The timers of the released holds fire harmlessly.
    h.tick_to(h.now.plus_millis(TIMEOUT));
    assert_eq!(h.acks(2), vec![]);
}

#[test]
fn backpressure_timeout_refuses_with_0x97_and_removes_the_message_for_good() {
    let mut h = online_pair(QueueFull::Backpressure, 1, V5);
    h.publish(2, "q/a", QoS::AtLeastOnce, 1); // in flight
    h.publish(2, "q/a", QoS::AtLeastOnce, 2); // queued: the limit
    h.publish(2, "q/a", QoS::AtLeastOnce, 3); // held
    h.publish(2, "q/a", QoS::ExactlyOnce, 4); // held behind it
    assert_eq!(h.acks(2), ok(&[1, 2]));
    assert_eq!(h.queued("s"), 3);
    let start = h.now;
    assert_eq!(h.b.next_deadline(), Some(start.plus_millis(TIMEOUT)));
    h.tick_to(start.plus_millis(TIMEOUT - 1));
    assert_eq!(h.acks(2), vec![]);
    h.tick_to(start.plus_millis(TIMEOUT));
    let quota = ReasonCode::QuotaExceeded;
    assert_eq!(h.acks(2), vec![(3, quota), (4, quota)]);
    assert_eq!(h.flow(), vec![(2, Flow::Pause), (2, Flow::Resume)]);
    assert_eq!(h.queued("s"), 1, "the refused messages left the queue");
    assert_eq!(h.b.stats().refused_queue_full, 2);
    // The refused QoS 2 flow is over: the same packet id is a new publish.
    h.publish(2, "other", QoS::ExactlyOnce, 4);
    assert_eq!(h.acks(2), ok(&[4]));
    // And the journal agrees: a restart has the same queue.
    h.restart();
    assert_eq!(h.b.session_pending("s"), Some((1, 1)));
}

#[test]
fn a_message_to_several_full_sessions_is_acked_when_the_last_has_room() {
    let mut h = H::new(QueueFull::Backpressure, 1);
    for (conn, id) in [(1, "s1"), (3, "s2"), (4, "s3")] {
        h.connect(conn, id, V5, 1);
        h.subscribe(conn, "q/#");
    }
    h.connect(2, "p", V5, 10);
    h.publish(2, "q/a", QoS::AtLeastOnce, 1); // in flight everywhere
    h.publish(2, "q/a", QoS::AtLeastOnce, 2); // queued everywhere
                                              // s3 catches up, so only s1 and s2 are full for m3.
    h.packet(4, puback(1));
    h.take(4);
    h.acks(2);
    h.publish(2, "q/a", QoS::AtLeastOnce, 3);
    assert_eq!(h.acks(2), vec![]);
    assert_eq!(h.queued("s3"), 1, "a target with room takes it at once");
    h.packet(1, puback(1));
    assert_eq!(h.acks(2), vec![], "s2 is still full");
    h.packet(3, puback(1));
    assert_eq!(h.acks(2), ok(&[3]));
}

#[test]
fn backpressure_timeout_closes_a_3_1_1_publisher() {
    let mut h = online_pair(QueueFull::Backpressure, 1, V3);
    for pid in 1..=3 {
        h.publish(2, "q/a", QoS::AtLeastOnce, pid);
    }
    assert_eq!(h.acks(2), ok(&[1, 2]));
    h.tick_to(h.now.plus_millis(TIMEOUT));
    let actions = h.take(2);
    assert!(matches!(actions[..], [Action::Close]), "{actions:?}");
    assert_eq!(h.queued("s"), 1);
    assert_eq!(h.b.held_acks(), 0);
    assert_eq!(h.b.stats().refused_queue_full, 1);
}

#[test]
fn a_publisher_that_goes_away_while_held_takes_its_qos1_message_out_of_the_full_queue() {
    let mut h = online_pair(QueueFull::Backpressure, 1, V5);
    for pid in 1..=3 {
        h.publish(2, "q/a", QoS::AtLeastOnce, pid);
    }
    assert_eq!(h.acks(2), ok(&[1, 2]));
    h.b.closed(ConnId(2), h.now, &mut h.out);
    assert_eq!(h.flow(), vec![(2, Flow::Pause), (2, Flow::Resume)]);
    assert_eq!(h.b.held_acks(), 0);
    // Never acknowledged, so it leaves the queue it was past the limit of (its publisher
    // sends it again if its session lives on): a queue grows past its limit by no more than
    // the acknowledgements held now. Its timer finds nothing to refuse.
    assert_eq!(h.queued("s"), 1);
    h.tick_to(h.now.plus_millis(TIMEOUT));
    assert_eq!(h.b.stats().refused_queue_full, 0);
    h.packet(1, puback(1));
    h.packet(1, puback(2));
    let got: Vec<String> = h.delivered(1).into_iter().map(|(m, _)| m).collect();
    assert_eq!(got, vec!["1", "2"]);

    // A takeover drops the holds of the connection taken over the same way.
    // (4 goes in flight, 5 fills the queue, 6 is held.)
    h.connect(5, "p", V5, 10);
    for pid in 4..=6 {
        h.publish(5, "q/a", QoS::AtLeastOnce, pid);
    }
    assert_eq!(h.acks(5), ok(&[4, 5]));
    assert_eq!(h.b.held_acks(), 1);
    h.connect(6, "p", V5, 10);
    assert_eq!(h.b.held_acks(), 0);
    assert_eq!(h.queued("s"), 1);
}

#[test]
fn qos2_held_across_a_restart_is_routed_once() {
    let mut h = H::new(QueueFull::Backpressure, 1);
    h.connect(1, "s", V5, 1);
    h.subscribe(1, "q/#");
    h.b.closed(ConnId(1), h.now, &mut h.out);
    h.connect(2, "p", V5, 10);
    h.publish(2, "q/a", QoS::ExactlyOnce, 7); // queued: the limit
    h.publish(2, "q/a", QoS::ExactlyOnce, 8); // held
    assert_eq!(h.acks(2), ok(&[7]));
    assert_eq!(h.b.held_acks(), 1);

    // Crash while the PUBREC for 8 is held: both messages and both inbound ids are stored.
    let report = h.restart();
    assert_eq!(report.queued, 2);
    assert_eq!(report.inbound_qos2, 2);
    // The publisher comes back and sends 8 again: answered, not routed a second time.
    h.connect(3, "p", V5, 10);
    h.publish(3, "q/a", QoS::ExactlyOnce, 8);
    assert_eq!(h.acks(3), ok(&[8]));
    assert_eq!(h.queued("s"), 2);
    for pid in [7, 8] {
        h.packet(3, Packet::PubRel(PubResp::new(pid, ReasonCode::Success)));
    }
    // The subscriber gets each exactly once.
    h.connect(4, "s", V5, 10);
    let got: Vec<String> = h.delivered(4).into_iter().map(|(m, _)| m).collect();
    assert_eq!(got, vec!["7", "8"]);
}

#[test]
fn reject_answers_0x97_and_delivers_a_refused_message_to_no_one() {
    let mut h = H::new(QueueFull::Reject, 1);
    h.connect(1, "full", V5, 1);
    h.subscribe(1, "q/#");
    h.b.closed(ConnId(1), h.now, &mut h.out);
    h.connect(3, "free", V5, 10);
    h.subscribe(3, "q/#");
    h.connect(2, "p", V5, 10);
    h.publish(2, "q/a", QoS::AtLeastOnce, 1);
    h.publish(2, "q/a", QoS::AtLeastOnce, 2);
    h.publish(2, "q/a", QoS::ExactlyOnce, 3);
    let quota = ReasonCode::QuotaExceeded;
    assert_eq!(
        h.acks(2),
        vec![(1, ReasonCode::Success), (2, quota), (3, quota)]
    );
    assert_eq!(h.flow(), vec![], "reject never pauses anyone");
    assert_eq!(h.queued("full"), 1);
    let got: Vec<String> = h.delivered(3).into_iter().map(|(m, _)| m).collect();
    assert_eq!(
        got,
        vec!["1"],
        "all or nothing: the session with room does not get what was refused"
    );
    assert_eq!(h.b.stats().refused_queue_full, 2);
    // The refused PUBREC ended that QoS 2 flow: no inbound id is kept for it.
    h.packet(2, Packet::PubRel(PubResp::new(3, ReasonCode::Success)));
    let comp = h.take(2);
    assert!(
        matches!(&comp[..], [Action::Send(Packet::PubComp(r))] if r.reason == ReasonCode::PacketIdentifierNotFound),
        "{comp:?}"
    );
}

#[test]
fn reject_closes_a_3_1_1_publisher() {
    let mut h = H::new(QueueFull::Reject, 1);
    h.connect(1, "s", V5, 1);
    h.subscribe(1, "q/#");
    h.b.closed(ConnId(1), h.now, &mut h.out);
    h.connect(2, "p", V3, 10);
    h.take(2);
    h.publish(2, "q/a", QoS::AtLeastOnce, 1);
    h.publish(2, "q/a", QoS::AtLeastOnce, 2);
    let actions = h.take(2);
    assert!(
        matches!(
            &actions[..],
            [Action::Send(Packet::PubAck(_)), Action::Close]
        ),
        "{actions:?}"
    );
    assert_eq!(h.queued("s"), 1);
}

#[test]
fn drop_oldest_keeps_the_newest_and_counts_the_dropped() {
    let mut h = H::new(QueueFull::DropOldest, 3);
    h.connect(1, "s", V5, 10);
    h.subscribe(1, "q/#");
    h.b.closed(ConnId(1), h.now, &mut h.out);
    h.connect(2, "p", V5, 10);
    for pid in 1..=5 {
        h.publish(2, "q/a", QoS::AtLeastOnce, pid);
    }
    assert_eq!(h.acks(2), ok(&[1, 2, 3, 4, 5]));
    assert_eq!(h.b.stats().dropped_queue_full, 2);
    // The journal agrees.
    h.restart();
    h.connect(3, "s", V5, 10);
    let got: Vec<String> = h.delivered(3).into_iter().map(|(m, _)| m).collect();
    assert_eq!(got, vec!["3", "4", "5"]);
}

#[test]
fn wills_and_in_process_publishes_are_not_queued_past_the_limit() {
    let mut h = H::new(QueueFull::Backpressure, 1);
    h.connect(1, "s", V5, 1);
    h.subscribe(1, "q/#");
    h.b.closed(ConnId(1), h.now, &mut h.out);
    for i in 0..3 {
        let mut m = Message::new("q/x", Bytes::from(format!("{i}")), h.now);
        m.qos = QoS::AtLeastOnce;
        h.b.publish(m, h.now, &mut h.out);
    }
    assert_eq!(h.queued("s"), 1);
    assert_eq!(h.b.stats().dropped_queue_full, 2);
    assert!(h.out.flow.is_empty());
}

/// Each hold used to push a timer that stayed in the heap until its due time, released or
/// not: holds a second times the timeout (review finding). One timer per connection now.
#[test]
fn released_holds_leave_no_timers_behind() {
    let mut h = online_pair(QueueFull::Backpressure, 1, V5);
    let base = h.b.pending_timers();
    let mut pid = 1;
    for round in 0..500u16 {
        // In flight, queued (the limit), then one held.
        for _ in 0..3 {
            h.publish(2, "q/a", QoS::AtLeastOnce, pid);
            pid += 1;
        }
        assert_eq!(h.b.held_acks(), 1, "round {round}");
        // The subscriber acknowledges all three: the held one is released.
        for _ in 0..3 {
            for (_, id) in h.delivered(1) {
                h.packet(1, puback(id.expect("QoS 1")));
            }
        }
        assert_eq!(h.b.held_acks(), 0, "round {round}");
        h.take(2);
        h.now = h.now.plus_millis(1);
    }
    assert!(
        h.b.pending_timers() <= base + 1,
        "{} timers for one connection's holds",
        h.b.pending_timers() - base
    );
    // And the one left still refuses in time.
    for _ in 0..3 {
        h.publish(2, "q/a", QoS::AtLeastOnce, pid);
        pid += 1;
    }
    h.tick_to(h.now.plus_millis(TIMEOUT));
    let quota = h
        .acks(2)
        .into_iter()
        .filter(|(_, r)| *r == ReasonCode::QuotaExceeded)
        .count();
    assert_eq!(quota, 1);
}
