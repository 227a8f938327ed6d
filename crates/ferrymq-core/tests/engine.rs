//! Deterministic engine tests with a virtual clock: no sockets, no sleeping.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use ferrymq_core::*;
use ferrymq_mqtt::*;

const V5: ProtocolVersion = ProtocolVersion::V5;
const V3: ProtocolVersion = ProtocolVersion::V311;

struct Harness {
    broker: Broker,
    now: Time,
    out: Outbox,
}

fn connect_packet(id: &str, v: ProtocolVersion, clean: bool) -> Connect {
    Connect {
        version: v,
        client_id: id.into(),
        clean_start: clean,
        keep_alive: 30,
        username: None,
        password: None,
        will: None,
        properties: Properties::default(),
    }
}

fn publish(topic: &str, payload: &str, qos: QoS, pid: u16) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id: (qos != QoS::AtMostOnce).then_some(pid),
        properties: Properties::default(),
        payload: Bytes::from(payload.to_string()),
    }
}

fn sub(filter: &str, qos: QoS) -> (String, SubscriptionOptions) {
    (
        filter.into(),
        SubscriptionOptions {
            qos,
            ..Default::default()
        },
    )
}

impl Harness {
    fn new() -> Self {
        Self::with(BrokerConfig::default())
    }

    fn with(config: BrokerConfig) -> Self {
        Harness {
            broker: Broker::new(config),
            now: Time(1_000),
            out: Outbox::default(),
        }
    }

    fn connect(&mut self, conn: u64, c: Connect) -> ConnAck {
        self.broker
            .connect(ConnId(conn), c, self.now, &mut self.out);
        let mut actions = self.take(conn);
        let first = actions.remove(0);
        // Keep what follows the CONNACK (redeliveries) for the test to read.
        self.out
            .actions
            .extend(actions.into_iter().map(|a| (ConnId(conn), a)));
        match first {
            Action::Send(Packet::ConnAck(a)) => a,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    fn connect_simple(&mut self, conn: u64, id: &str, v: ProtocolVersion) {
        let ack = self.connect(conn, connect_packet(id, v, true));
        assert_eq!(ack.reason, ReasonCode::Success);
    }

    fn packet(&mut self, conn: u64, p: Packet) {
        self.broker.packet(ConnId(conn), p, self.now, &mut self.out);
    }

    fn subscribe(
        &mut self,
        conn: u64,
        filters: Vec<(String, SubscriptionOptions)>,
    ) -> Vec<ReasonCode> {
        self.subscribe_with(conn, filters, Properties::default())
    }

    fn subscribe_with(
        &mut self,
        conn: u64,
        filters: Vec<(String, SubscriptionOptions)>,
        properties: Properties,
    ) -> Vec<ReasonCode> {
        self.packet(
            conn,
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                filters,
                properties,
            }),
        );
        let acts = self.take(conn);
        match acts.first() {
            Some(Action::Send(Packet::SubAck(a))) => a.reasons.clone(),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// Takes every action queued for `conn`, keeping the others.
    fn take(&mut self, conn: u64) -> Vec<Action> {
        let (mine, rest): (Vec<_>, Vec<_>) = self
            .out
            .actions
            .drain(..)
            .partition(|(c, _)| *c == ConnId(conn));
        self.out.actions = rest;
        mine.into_iter().map(|(_, a)| a).collect()
    }

    fn deliveries(&mut self, conn: u64) -> Vec<Delivery> {
        self.take(conn)
            .into_iter()
            .filter_map(|a| {
                if let Action::Deliver(d) = a {
                    Some(d)
                } else {
                    None
                }
            })
            .collect()
    }

    fn payloads(&mut self, conn: u64) -> Vec<String> {
        self.deliveries(conn)
            .iter()
            .map(|d| String::from_utf8(d.message.payload.to_vec()).unwrap())
            .collect()
    }

    fn advance(&mut self, secs: u64) {
        self.now = Time(self.now.0 + secs * 1000);
        self.broker.tick(self.now, &mut self.out);
    }
}

#[test]
fn qos0_routes_by_wildcard_and_hides_dollar_topics() {
    let mut h = Harness::new();
    h.connect_simple(1, "sub", V5);
    h.connect_simple(2, "pub", V3);
    h.subscribe(
        1,
        vec![sub("a/+/c", QoS::AtMostOnce), sub("#", QoS::AtMostOnce)],
    );
    h.packet(
        2,
        Packet::Publish(publish("a/b/c", "x", QoS::AtMostOnce, 0)),
    );
    h.packet(
        2,
        Packet::Publish(publish("$SYS/foo", "hidden", QoS::AtMostOnce, 0)),
    );
    h.packet(2, Packet::Publish(publish("q", "y", QoS::AtMostOnce, 0)));
    // Overlapping subscriptions deliver once (MQTT-3.3.5-1); `#` does not match `$SYS`.
    assert_eq!(h.payloads(1), vec!["x", "y"]);
}

#[test]
fn qos1_flow_and_receive_maximum_window() {
    let mut h = Harness::new();
    let mut c = connect_packet("sub", V5, true);
    c.properties.receive_maximum = Some(2);
    h.connect(1, c);
    h.connect_simple(2, "pub", V5);
    h.subscribe(1, vec![sub("t", QoS::AtLeastOnce)]);
    for i in 1..=5 {
        h.packet(
            2,
            Packet::Publish(publish("t", &i.to_string(), QoS::AtLeastOnce, i)),
        );
    }
    let acks = h.take(2);
    assert_eq!(acks.len(), 5, "every publish is acknowledged");
    let first = h.deliveries(1);
    assert_eq!(first.len(), 2, "window of 2");
    assert!(first
        .iter()
        .all(|d| d.qos == QoS::AtLeastOnce && d.packet_id.is_some()));
    h.packet(
        1,
        Packet::PubAck(PubResp::new(
            first[0].packet_id.unwrap(),
            ReasonCode::Success,
        )),
    );
    assert_eq!(h.payloads(1), vec!["3"]);
    assert_eq!(h.broker.session_pending("sub"), Some((2, 2)));
}

#[test]
fn qos2_inbound_is_exactly_once() {
    let mut h = Harness::new();
    h.connect_simple(1, "sub", V5);
    h.connect_simple(2, "pub", V5);
    h.subscribe(1, vec![sub("t", QoS::ExactlyOnce)]);
    h.packet(
        2,
        Packet::Publish(publish("t", "once", QoS::ExactlyOnce, 9)),
    );
    let mut dup = publish("t", "once", QoS::ExactlyOnce, 9);
    dup.dup = true;
    h.packet(2, Packet::Publish(dup));
    let acks = h.take(2);
    assert_eq!(acks.len(), 2);
    assert!(acks
        .iter()
        .all(|a| matches!(a, Action::Send(Packet::PubRec(r)) if r.packet_id == 9)));
    let d = h.deliveries(1);
    assert_eq!(d.len(), 1, "resent PUBLISH is not routed again");
    h.packet(2, Packet::PubRel(PubResp::new(9, ReasonCode::Success)));
    assert!(
        matches!(&h.take(2)[..], [Action::Send(Packet::PubComp(r))] if r.reason == ReasonCode::Success)
    );
    // Outbound QoS 2: PUBREC -> PUBREL -> PUBCOMP.
    let pid = d[0].packet_id.unwrap();
    h.packet(1, Packet::PubRec(PubResp::new(pid, ReasonCode::Success)));
    assert!(matches!(&h.take(1)[..], [Action::Send(Packet::PubRel(r))] if r.packet_id == pid));
    h.packet(1, Packet::PubComp(PubResp::new(pid, ReasonCode::Success)));
    assert_eq!(h.broker.session_pending("sub"), Some((0, 0)));
}

#[test]
fn inbound_receive_maximum_exceeded_disconnects_with_0x93() {
    let mut h = Harness::with(BrokerConfig {
        receive_maximum: 2,
        ..Default::default()
    });
    h.connect_simple(1, "pub", V5);
    for pid in 1..=3 {
        h.packet(1, Packet::Publish(publish("t", "x", QoS::ExactlyOnce, pid)));
    }
    let acts = h.take(1);
    assert!(acts.iter().any(|a| matches!(a, Action::Send(Packet::Disconnect(d)) if d.reason == ReasonCode::ReceiveMaximumExceeded)));
    assert!(matches!(acts.last(), Some(Action::Close)));
}

#[test]
fn persistent_session_queues_offline_and_redelivers_with_dup() {
    let mut h = Harness::new();
    let mut c = connect_packet("dev", V5, true);
    c.properties.session_expiry_interval = Some(3600);
    h.connect(1, c.clone());
    h.connect_simple(2, "pub", V5);
    h.subscribe(1, vec![sub("t", QoS::AtLeastOnce)]);
    h.packet(2, Packet::Publish(publish("t", "a", QoS::AtLeastOnce, 1)));
    assert_eq!(h.payloads(1), vec!["a"]); // not acked
    h.broker.closed(ConnId(1), h.now, &mut h.out);
    h.packet(2, Packet::Publish(publish("t", "b", QoS::AtLeastOnce, 2)));
    h.packet(2, Packet::Publish(publish("t", "c0", QoS::AtMostOnce, 0)));
    c.clean_start = false;
    let ack = h.connect(3, c);
    assert!(ack.session_present);
    let d = h.deliveries(3);
    let got: Vec<(String, bool)> = d
        .iter()
        .map(|d| {
            (
                String::from_utf8(d.message.payload.to_vec()).unwrap(),
                d.dup,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![("a".into(), true), ("b".into(), false)],
        "QoS 0 is not queued offline"
    );
}

#[test]
fn clean_start_discards_the_session() {
    let mut h = Harness::new();
    let mut c = connect_packet("dev", V3, false);
    h.connect(1, c.clone());
    h.subscribe(1, vec![sub("t", QoS::AtLeastOnce)]);
    h.broker.closed(ConnId(1), h.now, &mut h.out);
    c.clean_start = true;
    let ack = h.connect(2, c);
    assert!(!ack.session_present);
    assert_eq!(h.broker.subscription_count(), 0);
}

#[test]
fn takeover_disconnects_the_old_connection_with_0x8e() {
    let mut h = Harness::new();
    h.connect_simple(1, "same", V5);
    h.connect(2, connect_packet("same", V5, false));
    let old = h.take(1);
    assert!(
        matches!(&old[..], [Action::Send(Packet::Disconnect(d)), Action::Close] if d.reason == ReasonCode::SessionTakenOver)
    );
    assert_eq!(h.broker.connection_count(), 1);
    // The old connection is forgotten: its late close changes nothing.
    h.broker.closed(ConnId(1), h.now, &mut h.out);
    assert_eq!(h.broker.connection_count(), 1);
}

#[test]
fn retained_set_clear_and_retain_handling() {
    let mut h = Harness::new();
    h.connect_simple(1, "pub", V5);
    let mut p = publish("r/1", "v1", QoS::AtLeastOnce, 1);
    p.retain = true;
    h.packet(1, Packet::Publish(p.clone()));
    h.connect_simple(2, "s", V5);
    let opts = |rh| SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        retain_handling: rh,
        ..Default::default()
    };
    h.packet(
        2,
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![("r/+".into(), opts(RetainHandling::SendAtSubscribe))],
            properties: Properties::default(),
        }),
    );
    let acts = h.take(2);
    assert!(
        matches!(acts[0], Action::Send(Packet::SubAck(_))),
        "SUBACK precedes retained messages"
    );
    assert!(matches!(&acts[1], Action::Deliver(d) if d.retain && &*d.message.topic == "r/1"));
    // Retain handling 1: not sent again for an existing subscription.
    h.packet(
        2,
        Packet::Subscribe(Subscribe {
            packet_id: 2,
            filters: vec![("r/+".into(), opts(RetainHandling::SendIfNew))],
            properties: Properties::default(),
        }),
    );
    assert_eq!(h.deliveries(2).len(), 0);
    // Retain handling 2: never sent.
    h.packet(
        2,
        Packet::Subscribe(Subscribe {
            packet_id: 3,
            filters: vec![("r/#".into(), opts(RetainHandling::DoNotSend))],
            properties: Properties::default(),
        }),
    );
    assert_eq!(h.deliveries(2).len(), 0);
    // Live messages have RETAIN cleared unless retain-as-published.
    p.payload = Bytes::from_static(b"v2");
    h.packet(1, Packet::Publish(p.clone()));
    assert!(h.deliveries(2).iter().all(|d| !d.retain));
    // An empty retained payload clears it.
    p.payload = Bytes::new();
    h.packet(1, Packet::Publish(p));
    assert_eq!(h.broker.retained_count(), 0);
}

#[test]
fn retain_as_published_keeps_the_flag() {
    let mut h = Harness::new();
    h.connect_simple(1, "s", V5);
    let o = SubscriptionOptions {
        qos: QoS::AtMostOnce,
        retain_as_published: true,
        ..Default::default()
    };
    h.subscribe(1, vec![("t".into(), o)]);
    let mut p = publish("t", "x", QoS::AtMostOnce, 0);
    p.retain = true;
    h.packet(1, Packet::Publish(p));
    assert!(h.deliveries(1)[0].retain);
}

fn will_connect(id: &str, delay: Option<u32>, expiry: u32) -> Connect {
    let mut c = connect_packet(id, V5, true);
    c.properties.session_expiry_interval = Some(expiry);
    c.will = Some(Will {
        topic: "wills".into(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: PropertyValues {
            will_delay_interval: delay,
            ..Default::default()
        }
        .into(),
    });
    c
}

#[test]
fn will_is_published_on_abnormal_close_only() {
    let mut h = Harness::new();
    h.connect_simple(9, "watch", V5);
    h.subscribe(9, vec![sub("wills", QoS::AtLeastOnce)]);
    h.connect(1, will_connect("a", None, 0));
    h.packet(1, Packet::Disconnect(Disconnect::new(ReasonCode::Success)));
    assert!(
        h.payloads(9).is_empty(),
        "normal DISCONNECT discards the will"
    );
    h.connect(2, will_connect("b", None, 0));
    h.broker.closed(ConnId(2), h.now, &mut h.out);
    assert_eq!(h.payloads(9), vec!["gone"]);
    h.connect(3, will_connect("c", None, 0));
    h.packet(
        3,
        Packet::Disconnect(Disconnect::new(ReasonCode::DisconnectWithWill)),
    );
    assert_eq!(h.payloads(9), vec!["gone"], "0x04 sends the will");
}

#[test]
fn will_delay_is_cancelled_by_reconnect_and_capped_by_session_expiry() {
    let mut h = Harness::new();
    h.connect_simple(9, "watch", V5);
    h.subscribe(9, vec![sub("wills", QoS::AtLeastOnce)]);
    // Delay 10 s, session 100 s: reconnect at 5 s cancels.
    h.connect(1, will_connect("a", Some(10), 100));
    h.broker.closed(ConnId(1), h.now, &mut h.out);
    h.advance(5);
    let mut again = will_connect("a", Some(10), 100);
    again.clean_start = false;
    h.connect(2, again);
    h.advance(20);
    assert!(h.payloads(9).is_empty());
    // Delay 60 s, session 5 s: sent when the session ends at 5 s.
    h.connect(3, will_connect("b", Some(60), 5));
    h.broker.closed(ConnId(3), h.now, &mut h.out);
    h.advance(4);
    assert!(h.payloads(9).is_empty());
    h.advance(1);
    assert_eq!(h.payloads(9), vec!["gone"]);
    assert_eq!(h.broker.session_pending("b"), None, "session ended");
}

#[test]
fn session_expiry_removes_session_and_subscriptions() {
    let mut h = Harness::new();
    let mut c = connect_packet("dev", V5, true);
    c.properties.session_expiry_interval = Some(10);
    h.connect(1, c);
    h.subscribe(1, vec![sub("t", QoS::AtLeastOnce)]);
    h.broker.closed(ConnId(1), h.now, &mut h.out);
    h.advance(9);
    assert_eq!(h.broker.session_count(), 1);
    h.advance(1);
    assert_eq!(h.broker.session_count(), 0);
    assert_eq!(h.broker.subscription_count(), 0);
}

#[test]
fn shared_subscription_distributes_evenly_and_redistributes_on_leave() {
    let mut h = Harness::new();
    for (conn, id) in [(1, "w1"), (2, "w2"), (3, "w3")] {
        h.connect_simple(conn, id, V5);
        h.subscribe(conn, vec![sub("$share/g/jobs/#", QoS::AtLeastOnce)]);
    }
    h.connect_simple(9, "pub", V5);
    for i in 0..30 {
        h.packet(
            9,
            Packet::Publish(publish("jobs/x", &i.to_string(), QoS::AtLeastOnce, i + 1)),
        );
    }
    let counts: Vec<usize> = (1..=3).map(|c| h.deliveries(c).len()).collect();
    assert_eq!(counts, vec![10, 10, 10]);
    // w1 leaves with 10 unacknowledged: they move to w2 and w3.
    h.broker.closed(ConnId(1), h.now, &mut h.out);
    let moved = h.deliveries(2).len() + h.deliveries(3).len();
    assert_eq!(moved, 10);
}

/// A 5.0 connection whose session outlives it by an hour.
fn durable_connect(id: &str, clean: bool) -> Connect {
    let mut c = connect_packet(id, V5, clean);
    c.properties = PropertyValues {
        session_expiry_interval: Some(3600),
        ..Default::default()
    }
    .into();
    c
}

#[test]
fn mqtt_4_8_2_4_shared_qos2_in_flight_stays_with_its_member() {
    let mut h = Harness::new();
    for (conn, id) in [(1, "w1"), (2, "w2")] {
        h.connect(conn, durable_connect(id, true));
        h.subscribe(conn, vec![sub("$share/g/jobs/#", QoS::ExactlyOnce)]);
    }
    h.connect_simple(9, "pub", V5);
    for i in 0..2u16 {
        let p = publish("jobs/x", &i.to_string(), QoS::ExactlyOnce, i + 1);
        h.packet(9, Packet::Publish(p));
        h.packet(9, Packet::PubRel(PubResp::new(i + 1, ReasonCode::Success)));
    }
    let to_w1 = h.deliveries(1);
    assert_eq!(to_w1.len(), 1);
    assert_eq!(h.deliveries(2).len(), 1);
    // w1's connection breaks before it answers: its QoS 2 message was sent, so it may already
    // hold it. It must not go to w2 as well; w1 gets it again, same packet id, DUP.
    h.broker.closed(ConnId(1), h.now, &mut h.out);
    assert!(
        h.deliveries(2).is_empty(),
        "a sent QoS 2 message moved to w2"
    );
    h.connect(3, durable_connect("w1", false));
    let again = h.deliveries(3);
    assert_eq!(again.len(), 1);
    assert!(again[0].dup);
    assert_eq!(again[0].packet_id, to_w1[0].packet_id);
    assert_eq!(again[0].message.payload, to_w1[0].message.payload);
}

#[test]
fn shared_redelivery_follows_the_filter_the_message_came_through() {
    let mut h = Harness::new();
    // w1 is in group g on two filters; w2 only on b/+. A message w1 got through b/+ must go
    // to w2 when w1 leaves, whatever order w1's subscriptions are kept in.
    h.connect_simple(1, "w1", V5);
    h.subscribe(
        1,
        vec![
            sub("$share/g/a/+", QoS::AtLeastOnce),
            sub("$share/g/b/+", QoS::AtLeastOnce),
        ],
    );
    h.connect_simple(2, "w2", V5);
    h.subscribe(2, vec![sub("$share/g/b/+", QoS::AtLeastOnce)]);
    h.connect_simple(9, "pub", V5);
    for i in 0..2u16 {
        let p = publish("b/1", &i.to_string(), QoS::AtLeastOnce, i + 1);
        h.packet(9, Packet::Publish(p));
    }
    let (to_w1, to_w2) = (h.deliveries(1), h.deliveries(2));
    assert_eq!((to_w1.len(), to_w2.len()), (1, 1));
    h.broker.closed(ConnId(1), h.now, &mut h.out);
    let moved = h.deliveries(2);
    assert_eq!(
        moved.len(),
        1,
        "w1's b/+ message went to the other b/+ member"
    );
    assert_eq!(moved[0].message.payload, to_w1[0].message.payload);
}

#[test]
fn subscription_identifiers_and_highest_qos_on_overlap() {
    let mut h = Harness::new();
    h.connect_simple(1, "s", V5);
    h.subscribe_with(
        1,
        vec![sub("a/#", QoS::AtMostOnce)],
        PropertyValues {
            subscription_identifiers: vec![7],
            ..Default::default()
        }
        .into(),
    );
    h.subscribe_with(
        1,
        vec![sub("a/+", QoS::AtLeastOnce)],
        PropertyValues {
            subscription_identifiers: vec![9],
            ..Default::default()
        }
        .into(),
    );
    h.connect_simple(2, "p", V5);
    h.packet(2, Packet::Publish(publish("a/b", "x", QoS::ExactlyOnce, 1)));
    let d = h.deliveries(1);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].qos, QoS::AtLeastOnce);
    let mut ids = d[0].subscription_ids.clone();
    ids.sort();
    assert_eq!(ids, vec![7, 9]);
}

#[test]
fn no_local_skips_own_messages() {
    let mut h = Harness::new();
    h.connect_simple(1, "me", V5);
    let o = SubscriptionOptions {
        no_local: true,
        ..Default::default()
    };
    h.subscribe(1, vec![("t".into(), o)]);
    h.packet(1, Packet::Publish(publish("t", "mine", QoS::AtMostOnce, 0)));
    assert!(h.deliveries(1).is_empty());
    h.connect_simple(2, "other", V5);
    h.packet(
        2,
        Packet::Publish(publish("t", "theirs", QoS::AtMostOnce, 0)),
    );
    assert_eq!(h.payloads(1), vec!["theirs"]);
}

#[test]
fn message_expiry_is_decremented_and_expired_messages_dropped() {
    let mut h = Harness::new();
    let mut c = connect_packet("dev", V5, true);
    c.properties.session_expiry_interval = Some(3600);
    h.connect(1, c.clone());
    h.subscribe(1, vec![sub("t", QoS::AtLeastOnce)]);
    h.broker.closed(ConnId(1), h.now, &mut h.out);
    h.connect_simple(2, "p", V5);
    for (payload, secs) in [("short", 5), ("long", 60)] {
        let mut p = publish("t", payload, QoS::AtLeastOnce, 1);
        p.properties.message_expiry_interval = Some(secs);
        h.packet(2, Packet::Publish(p));
    }
    h.advance(10);
    c.clean_start = false;
    h.connect(3, c);
    let d = h.deliveries(3);
    assert_eq!(d.len(), 1);
    assert_eq!(&d[0].message.payload[..], b"long");
    assert_eq!(d[0].expiry_remaining, Some(50));
}

#[test]
fn inbound_topic_alias_is_resolved_and_bad_alias_refused() {
    let mut h = Harness::new();
    h.connect_simple(1, "s", V5);
    h.subscribe(1, vec![sub("long/topic/name", QoS::AtMostOnce)]);
    h.connect_simple(2, "p", V5);
    let mut p = publish("long/topic/name", "1", QoS::AtMostOnce, 0);
    p.properties.topic_alias = Some(3);
    h.packet(2, Packet::Publish(p.clone()));
    p.topic.clear();
    p.payload = Bytes::from_static(b"2");
    h.packet(2, Packet::Publish(p.clone()));
    assert_eq!(h.payloads(1), vec!["1", "2"]);
    p.properties.topic_alias = Some(500);
    h.packet(2, Packet::Publish(p));
    let acts = h.take(2);
    assert!(
        matches!(&acts[0], Action::Send(Packet::Disconnect(d)) if d.reason == ReasonCode::TopicAliasInvalid)
    );
}

#[test]
fn oversized_messages_are_not_sent_to_small_clients() {
    let mut h = Harness::new();
    let mut c = connect_packet("small", V5, true);
    c.properties.maximum_packet_size = Some(64);
    h.connect(1, c);
    h.subscribe(1, vec![sub("t", QoS::AtLeastOnce)]);
    h.connect_simple(2, "p", V5);
    h.packet(
        2,
        Packet::Publish(publish("t", &"x".repeat(100), QoS::AtLeastOnce, 1)),
    );
    h.packet(
        2,
        Packet::Publish(publish("t", "fits", QoS::AtLeastOnce, 2)),
    );
    assert_eq!(h.payloads(1), vec!["fits"]);
    assert_eq!(h.broker.stats().dropped_too_large, 1);
}

#[test]
fn deny_rule_refuses_covered_filters() {
    use ferrymq_core::acl::{AclAction, AclConfig, AclRule, Permission, Principal};
    let mut h = Harness::with(BrokerConfig {
        acl: AclConfig {
            rules: vec![AclRule {
                permission: Permission::Deny,
                action: AclAction::Subscribe,
                topic: "secret/#".into(),
                who: Principal::Anyone,
            }],
            ..AclConfig::default()
        },
        ..Default::default()
    });
    h.connect_simple(1, "v5", V5);
    let r = h.subscribe(
        1,
        vec![
            sub("secret/+/x", QoS::AtMostOnce),
            sub("open/#", QoS::AtLeastOnce),
        ],
    );
    assert_eq!(r, vec![ReasonCode::NotAuthorized, ReasonCode::GrantedQoS1]);
    h.connect_simple(2, "v3", V3);
    let r = h.subscribe(
        2,
        vec![
            sub("secret/#", QoS::AtMostOnce),
            sub("a/#/b", QoS::AtMostOnce),
        ],
    );
    // The codec writes any failure as 0x80 for 3.1.1.
    assert!(r.iter().all(|r| r.is_error()));
}

#[test]
fn invalid_payload_format_is_refused_with_0x99() {
    let mut h = Harness::new();
    h.connect_simple(1, "p", V5);
    let mut p = publish("t", "", QoS::AtLeastOnce, 4);
    p.payload = Bytes::from_static(&[0xFF, 0xFE]);
    p.properties.payload_format_indicator = Some(1);
    h.packet(1, Packet::Publish(p));
    assert!(
        matches!(&h.take(1)[..], [Action::Send(Packet::PubAck(a))] if a.reason == ReasonCode::PayloadFormatInvalid)
    );
}

#[test]
fn assigned_client_identifier_for_empty_id() {
    let mut h = Harness::new();
    let ack = h.connect(1, connect_packet("", V5, true));
    assert!(ack.properties.assigned_client_identifier.is_some());
    let ack = h.connect(2, connect_packet("", V3, false));
    assert_eq!(ack.reason, ReasonCode::ClientIdentifierNotValid);
}

#[test]
fn a_will_on_a_topic_the_client_may_not_publish_to_refuses_the_connect() {
    use ferrymq_core::acl::{AclAction, AclConfig, AclRule, Permission, Principal};
    let mut h = Harness::with(BrokerConfig {
        acl: AclConfig {
            rules: vec![AclRule {
                permission: Permission::Deny,
                action: AclAction::Publish,
                topic: "alarm/#".into(),
                who: Principal::Anyone,
            }],
            ..AclConfig::default()
        },
        ..Default::default()
    });
    let mut c = connect_packet("x", V5, true);
    c.will = Some(ferrymq_mqtt::Will {
        topic: "alarm/x".into(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Default::default(),
    });
    let ack = h.connect(1, c);
    assert_eq!(ack.reason, ReasonCode::NotAuthorized);
}

#[test]
fn server_keep_alive_caps_the_client() {
    let mut h = Harness::with(BrokerConfig {
        max_keep_alive: 20,
        ..Default::default()
    });
    let ack = h.connect(1, connect_packet("x", V5, true));
    assert_eq!(ack.properties.server_keep_alive, Some(20));
}

#[test]
fn shutdown_sends_0x8b_to_v5_clients() {
    let mut h = Harness::new();
    h.connect_simple(1, "a", V5);
    h.connect_simple(2, "b", V3);
    h.broker.shutdown(h.now, &mut h.out);
    assert!(
        matches!(&h.take(1)[..], [Action::Send(Packet::Disconnect(d)), Action::Close] if d.reason == ReasonCode::ServerShuttingDown)
    );
    assert!(matches!(&h.take(2)[..], [Action::Close]));
}

/// Replaces the harness's engine with one rebuilt from the journal records it emitted.
fn restart_from_journal(h: &mut Harness, log: &mut Vec<Vec<u8>>) -> RestoreReport {
    log.extend(h.out.journal.records().map(|r| r.to_vec()));
    h.out.journal.clear();
    let mut broker = Broker::new(BrokerConfig::default());
    let report = broker
        .restore(log.iter().map(|b| b.as_ref()), h.now)
        .unwrap();
    // What restore concluded (the crash disconnected connected sessions) is journaled first.
    let mut first = Outbox::default();
    broker.enable_journal(&mut first);
    log.extend(first.journal.records().map(|r| r.to_vec()));
    h.broker = broker;
    h.out = Outbox::default();
    report
}

#[test]
fn journal_restores_retained_subscriptions_wills_and_expiry_but_not_clean_sessions() {
    let mut h = Harness::new();
    h.broker.enable_journal(&mut Outbox::default());
    let mut log = Vec::new();
    // Durable subscriber with an identifier, No Local and a QoS 1 and a QoS 2 filter.
    let mut c = connect_packet("dev", V5, true);
    c.properties.session_expiry_interval = Some(600);
    h.connect(1, c);
    let props: Properties = PropertyValues {
        subscription_identifiers: vec![7],
        ..Default::default()
    }
    .into();
    let mut opts = sub("a/#", QoS::ExactlyOnce);
    opts.1.no_local = true;
    h.subscribe_with(1, vec![opts, sub("gone", QoS::AtLeastOnce)], props);
    h.packet(
        1,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 2,
            filters: vec!["gone".into()],
            properties: Properties::default(),
        }),
    );
    // A clean (expiry 0) subscriber: nothing of it survives.
    h.connect_simple(2, "clean", V5);
    h.subscribe(2, vec![sub("a/#", QoS::AtLeastOnce)]);
    // Retained: one set, one set then cleared; a QoS 1 message queued while offline.
    h.connect_simple(3, "pub", V5);
    let mut r = publish("a/r", "kept", QoS::AtLeastOnce, 1);
    r.retain = true;
    h.packet(3, Packet::Publish(r));
    let mut r2 = publish("b/r", "x", QoS::AtMostOnce, 0);
    r2.retain = true;
    h.packet(3, Packet::Publish(r2.clone()));
    r2.payload = Bytes::new();
    h.packet(3, Packet::Publish(r2));
    h.broker.closed(ConnId(1), h.now, &mut h.out);
    let mut q = publish("a/q", "queued", QoS::AtLeastOnce, 2);
    q.properties = PropertyValues {
        message_expiry_interval: Some(600),
        content_type: Some("text/plain".into()),
        user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
        ..Default::default()
    }
    .into();
    h.packet(3, Packet::Publish(q));
    // A will with a 30 s delay waiting when the process dies.
    h.connect(4, will_connect("w", Some(30), 600));
    h.broker.closed(ConnId(4), h.now, &mut h.out);
    h.out.actions.clear();

    h.advance(10);
    let report = restart_from_journal(&mut h, &mut log);
    assert_eq!(
        report.sessions, 2,
        "dev and w, not the clean ones: {report:?}"
    );
    assert_eq!(report.retained, 1);
    // "kept" was sent to dev and never acknowledged; "queued" arrived while dev was away.
    assert_eq!(report.queued, 2);
    assert_eq!(report.pending_wills, 1);
    assert_eq!(report.skipped, 0);

    // The will fires 30 s after its disconnect, not 30 s after the restart.
    h.connect_simple(9, "watch", V5);
    h.subscribe(9, vec![sub("wills", QoS::AtLeastOnce)]);
    h.advance(19);
    assert!(h.payloads(9).is_empty());
    h.advance(1);
    assert_eq!(h.payloads(9), vec!["gone"]);

    // The durable session resumes with its queue and subscriptions (id, No Local, QoS 2).
    let mut again = connect_packet("dev", V5, false);
    again.properties.session_expiry_interval = Some(600);
    let ack = h.connect(1, again);
    assert!(ack.session_present);
    let d = h.deliveries(1);
    assert_eq!(d.len(), 2);
    assert_eq!(&d[0].message.payload[..], b"kept");
    assert!(
        d[0].dup,
        "resent in flight message keeps its packet id and says DUP"
    );
    assert_eq!(&d[1].message.payload[..], b"queued");
    assert_eq!(d[1].subscription_ids, vec![7]);
    // Properties survive, and expiry kept counting across the restart: 30 s passed.
    let props = d[1].properties();
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(props.user_properties.len(), 2);
    assert_eq!(d[1].expiry_remaining, Some(570));
    for d in &d {
        h.packet(
            1,
            Packet::PubAck(PubResp::new(d.packet_id.unwrap(), ReasonCode::Success)),
        );
    }
    h.packet(
        1,
        Packet::Publish(publish("a/own", "mine", QoS::AtMostOnce, 0)),
    );
    assert!(h.payloads(1).is_empty(), "No Local survived");
    h.connect_simple(5, "pub2", V5);
    h.packet(
        5,
        Packet::Publish(publish("gone", "x", QoS::AtLeastOnce, 1)),
    );
    h.packet(
        5,
        Packet::Publish(publish("a/z", "two", QoS::ExactlyOnce, 2)),
    );
    let d = h.deliveries(1);
    assert_eq!(d.len(), 1, "unsubscribed filter stays gone");
    assert_eq!(d[0].qos, QoS::ExactlyOnce);
    // Retained survived, the cleared one did not.
    h.connect_simple(6, "late", V5);
    h.packet(
        6,
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![sub("+/r", QoS::AtLeastOnce)],
            properties: Properties::default(),
        }),
    );
    assert_eq!(h.payloads(6), vec!["kept"]);

    // A second restart after a checkpoint with the old log dropped gives the same state.
    let begin = h.broker.checkpoint(&mut h.out).unwrap();
    log.clear();
    log.extend(
        h.out
            .journal
            .records()
            .skip(begin as usize)
            .map(|r| r.to_vec()),
    );
    h.out.journal.clear();
    h.out.actions.clear();
    let report = restart_from_journal(&mut h, &mut log);
    assert_eq!(report.retained, 1);
    assert_eq!(report.sessions, 2, "dev and w: {report:?}");
    assert_eq!(report.pending_wills, 0, "the will was published");
    assert_eq!(report.queued, 1, "the QoS 2 message still awaits PUBREC");
    // Session expiry counts from the disconnect: w left 30 s ago; dev was connected, so the
    // restart disconnected it.
    h.advance(569);
    assert_eq!(h.broker.session_count(), 2);
    h.advance(1);
    assert_eq!(h.broker.session_count(), 1);
    h.advance(29);
    assert_eq!(h.broker.session_count(), 1);
    h.advance(1);
    assert_eq!(h.broker.session_count(), 0);
}

#[test]
fn a_checkpoint_cut_short_by_a_crash_is_ignored() {
    let mut h = Harness::new();
    h.broker.enable_journal(&mut Outbox::default());
    let mut c = connect_packet("dev", V5, true);
    c.properties.session_expiry_interval = Some(600);
    h.connect(1, c);
    h.subscribe(1, vec![sub("t", QoS::AtLeastOnce)]);
    h.broker.closed(ConnId(1), h.now, &mut h.out);
    h.connect_simple(2, "pub", V5);
    for i in 1..=3 {
        h.packet(2, Packet::Publish(publish("t", "m", QoS::AtLeastOnce, i)));
    }
    let mut log: Vec<Vec<u8>> = h.out.journal.records().map(|r| r.to_vec()).collect();
    h.out.journal.clear();
    h.broker.checkpoint(&mut h.out).unwrap();
    let checkpoint: Vec<Vec<u8>> = h.out.journal.records().map(|r| r.to_vec()).collect();
    // The crash came after CheckpointBegin and the session, before its queue and the end.
    log.extend(checkpoint[..2].iter().cloned());
    let mut broker = Broker::new(BrokerConfig::default());
    let r = broker
        .restore(log.iter().map(|b| b.as_slice()), h.now)
        .unwrap();
    assert!(r.incomplete_checkpoint);
    assert_eq!((r.sessions, r.subscriptions, r.queued), (1, 1, 3), "{r:?}");
    // The whole checkpoint alone gives the same state.
    let mut broker = Broker::new(BrokerConfig::default());
    let r = broker
        .restore(checkpoint.iter().map(|b| b.as_slice()), h.now)
        .unwrap();
    assert!(!r.incomplete_checkpoint);
    assert_eq!((r.sessions, r.subscriptions, r.queued), (1, 1, 3), "{r:?}");
}

/// A reload's new rules (`Broker::set_acl`) hold for connections made before them: the
/// next publish is refused, and a subscription made while it was allowed delivers only
/// what the new rules let its client read; the user's own rules follow its identity.
#[test]
fn new_acl_rules_apply_to_connected_clients_and_their_subscriptions() {
    use ferrymq_core::acl::{AclAction, AclConfig, AclRule, Permission, Principal};
    use ferrymq_core::Identity;
    let mut h = Harness::new();
    h.connect_simple(1, "sub", V5);
    let alice = Identity {
        user: Some("alice".into()),
        token_acl: None,
    };
    h.broker.connect_as(
        ConnId(2),
        connect_packet("pub", V5, true),
        alice,
        h.now,
        &mut h.out,
    );
    h.take(2);
    let qos0 = SubscriptionOptions::default();
    assert_eq!(
        h.subscribe(1, vec![("secret/#".into(), qos0)]),
        vec![ReasonCode::Success]
    );
    h.packet(
        2,
        Packet::Publish(publish("secret/a", "before", QoS::AtMostOnce, 0)),
    );
    assert_eq!(h.payloads(1), vec!["before"]);

    let deny = |action, topic: &str, who| AclRule {
        permission: Permission::Deny,
        action,
        topic: topic.into(),
        who,
    };
    h.broker.set_acl(
        AclConfig {
            rules: vec![
                // Reading: anyone; publishing: only alice may not.
                deny(AclAction::Subscribe, "secret/#", Principal::Anyone),
                deny(
                    AclAction::Publish,
                    "news/#",
                    Principal::User("alice".into()),
                ),
            ],
            ..AclConfig::default()
        },
        ReasonCode::NotAuthorized,
    );
    h.packet(
        2,
        Packet::Publish(publish("secret/b", "after", QoS::AtMostOnce, 0)),
    );
    assert!(
        h.payloads(1).is_empty(),
        "the old subscription reads nothing denied"
    );
    assert_eq!(h.out.denied.len(), 0, "alice may still publish there");
    h.packet(
        2,
        Packet::Publish(publish("news/x", "hi", QoS::AtLeastOnce, 7)),
    );
    assert!(
        h.take(2).iter().any(|a| matches!(a,
            Action::Send(Packet::PubAck(r)) if r.reason == ReasonCode::NotAuthorized)),
        "alice's own rule holds on her open connection"
    );
    assert_eq!(h.out.denied.len(), 1);
    assert_eq!(
        h.subscribe(1, vec![("secret/x".into(), qos0)]),
        vec![ReasonCode::NotAuthorized]
    );
    assert_eq!(h.out.denied_subscriptions.len(), 1);
}
