//! Regression tests from the independent review of issue 10 (`mqtt.queue_full`), on a
//! virtual clock: each failed on the reviewed commit (48d33e3).

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use ferrymq_core::*;
use ferrymq_mqtt::*;

fn connect(b: &mut Broker, conn: u64, id: &str, clean: bool, now: Time, out: &mut Outbox) {
    connect_window(b, conn, id, clean, 1, now, out)
}

fn connect_window(
    b: &mut Broker,
    conn: u64,
    id: &str,
    clean: bool,
    window: u16,
    now: Time,
    out: &mut Outbox,
) {
    let mut properties = Properties::default();
    if !clean {
        properties.session_expiry_interval = Some(3600);
        properties.receive_maximum = Some(window);
    }
    let c = Connect {
        version: ProtocolVersion::V5,
        client_id: id.into(),
        clean_start: clean,
        keep_alive: 0,
        username: None,
        password: None,
        will: None,
        properties,
    };
    assert!(b.connect(ConnId(conn), c, now, out).accepted);
}

fn publish(pid: u16) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "q/a".into(),
        packet_id: Some(pid),
        properties: Properties::default(),
        payload: Bytes::from(format!("{pid}")),
    })
}

/// Found: a driver that obeys every `Flow::Pause` still grew a full queue by one message per
/// publisher connection that went away while held: `drop_holds` left the held message queued
/// past `max_queued_messages`. 100 short-lived publishers (connect, one QoS 1 publish, give
/// up waiting for the PUBACK, close) left an offline subscriber's queue of limit 2 at 102.
#[test]
fn publishers_that_leave_while_held_do_not_grow_a_full_queue_past_its_limit() {
    const LIMIT: usize = 2;
    let mut b = Broker::new(BrokerConfig {
        max_queued_messages: LIMIT,
        queue_full: QueueFull::Backpressure,
        queue_full_timeout_ms: 5_000,
        ..Default::default()
    });
    let mut out = Outbox::default();
    b.enable_journal(&mut out);
    let mut now = Time(1_000);
    // A durable subscriber, then offline.
    connect(&mut b, 1, "s", false, now, &mut out);
    let options = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        ..Default::default()
    };
    b.packet(
        ConnId(1),
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![("q/#".into(), options)],
            properties: Properties::default(),
        }),
        now,
        &mut out,
    );
    b.closed(ConnId(1), now, &mut out);
    // Fill its queue to the limit.
    connect(&mut b, 2, "filler", true, now, &mut out);
    for pid in 1..=LIMIT as u16 {
        b.packet(ConnId(2), publish(pid), now, &mut out);
    }
    b.closed(ConnId(2), now, &mut out);
    assert_eq!(b.session_pending("s"), Some((0, LIMIT)));
    out.flow.clear();

    for i in 0..100u64 {
        let conn = 10 + i;
        connect(&mut b, conn, &format!("p{i}"), true, now, &mut out);
        b.packet(ConnId(conn), publish(1), now, &mut out);
        // The driver pauses it here (nothing more of its input runs); it gives up and leaves.
        assert_eq!(out.flow.drain(..).next(), Some((ConnId(conn), Flow::Pause)));
        now = now.plus_millis(10);
        b.closed(ConnId(conn), now, &mut out);
        b.tick(now, &mut out);
        out.flow.clear();
    }
    // Long after every timeout.
    now = now.plus_millis(60_000);
    b.tick(now, &mut out);
    let queued = b.session_pending("s").unwrap().1;
    println!(
        "queue limit {LIMIT}: {queued} queued, held acks {}",
        b.held_acks()
    );
    assert!(
        queued <= LIMIT + 1,
        "an offline session limited to {LIMIT} queues {queued} messages"
    );
}

fn connect_v3(b: &mut Broker, conn: u64, id: &str, now: Time, out: &mut Outbox) {
    let c = Connect {
        version: ProtocolVersion::V311,
        client_id: id.into(),
        clean_start: false,
        keep_alive: 0,
        username: None,
        password: None,
        will: None,
        properties: Properties::default(),
    };
    assert!(b.connect(ConnId(conn), c, now, out).accepted);
}

/// MQTT 3.1.1 has no negative PUBREC, so a refused QoS 2 publish closes the connection, and
/// the client resends the same PUBLISH with DUP on reconnect (MQTT-4.4.0-1). Found in review:
/// the subscriber that had room received it twice. `reject` is now all or nothing.
#[test]
fn a_refused_qos2_publish_from_a_3_1_1_client_is_not_delivered_twice_after_its_resend() {
    let mut b = Broker::new(BrokerConfig {
        max_queued_messages: 1,
        queue_full: QueueFull::Reject,
        ..Default::default()
    });
    let mut out = Outbox::default();
    let now = Time(1_000);
    let options = SubscriptionOptions {
        qos: QoS::ExactlyOnce,
        ..Default::default()
    };
    let subscribe = Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![("q/#".into(), options)],
        properties: Properties::default(),
    });
    // "room": online, reads everything. "full": offline with a full queue.
    connect_window(&mut b, 1, "room", false, 100, now, &mut out);
    b.packet(ConnId(1), subscribe.clone(), now, &mut out);
    connect(&mut b, 2, "full", false, now, &mut out);
    b.packet(ConnId(2), subscribe, now, &mut out);
    b.closed(ConnId(2), now, &mut out);
    connect(&mut b, 3, "filler", true, now, &mut out);
    b.packet(ConnId(3), publish(1), now, &mut out);
    assert_eq!(b.session_pending("full"), Some((0, 1)));
    out.actions.clear();

    let qos2 = |dup| {
        Packet::Publish(Publish {
            dup,
            qos: QoS::ExactlyOnce,
            retain: false,
            topic: "q/x".into(),
            packet_id: Some(7),
            properties: Properties::default(),
            payload: Bytes::from_static(b"once"),
        })
    };
    connect_v3(&mut b, 4, "pub311", now, &mut out);
    b.packet(ConnId(4), qos2(false), now, &mut out);
    // The 3.1.1 publisher is closed without a PUBREC; it reconnects and resends.
    assert!(out
        .actions
        .iter()
        .any(|(c, a)| *c == ConnId(4) && matches!(a, Action::Close)));
    connect_v3(&mut b, 5, "pub311", now, &mut out);
    b.packet(ConnId(5), qos2(true), now, &mut out);

    // "room" (a window of 100) holds the filler's message in flight and what else it got.
    // `reject` is all or nothing: the queue is still full, so both tries are refused and
    // nobody gets it (before, "room" got it twice).
    let (inflight, queued) = b.session_pending("room").unwrap();
    assert_eq!(queued, 0);
    let copies = inflight - 1;
    assert_eq!(
        copies, 0,
        "a refused QoS 2 message reached one subscriber {copies} times"
    );
}
