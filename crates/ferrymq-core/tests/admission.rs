//! The admission seam (issue 10): what the engine refuses while the driver says memory is over
//! its high-water mark or the log is out of room. Deterministic: no sockets, no clock.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use ferrymq_core::*;
use ferrymq_mqtt::*;

const V5: ProtocolVersion = ProtocolVersion::V5;
const V3: ProtocolVersion = ProtocolVersion::V311;
const NOW: Time = Time(1_000);

fn connect(b: &mut Broker, conn: u64, id: &str, v: ProtocolVersion, expiry: u32) -> Vec<Action> {
    let mut c = Connect {
        version: v,
        client_id: id.into(),
        clean_start: false,
        keep_alive: 30,
        username: None,
        password: None,
        will: None,
        properties: Properties::default(),
    };
    if v == V5 {
        c.properties.session_expiry_interval = Some(expiry);
    } else {
        c.clean_start = expiry == 0;
    }
    let mut out = Outbox::default();
    b.connect(ConnId(conn), c, NOW, &mut out);
    out.actions
        .into_iter()
        .filter(|(c, _)| *c == ConnId(conn))
        .map(|(_, a)| a)
        .collect()
}

fn connack(actions: &[Action]) -> ReasonCode {
    match actions.first() {
        Some(Action::Send(Packet::ConnAck(a))) => a.reason,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn packet(b: &mut Broker, conn: u64, p: Packet) -> Vec<(ConnId, Action)> {
    let mut out = Outbox::default();
    b.packet(ConnId(conn), p, NOW, &mut out);
    out.actions
}

fn publish(b: &mut Broker, conn: u64, qos: QoS, retain: bool) -> Vec<(ConnId, Action)> {
    let p = Publish {
        dup: false,
        qos,
        retain,
        topic: "t".into(),
        packet_id: (qos != QoS::AtMostOnce).then_some(7),
        properties: Properties::default(),
        payload: Bytes::from_static(b"x"),
    };
    packet(b, conn, Packet::Publish(p))
}

fn subscribe(b: &mut Broker, conn: u64) -> Vec<ReasonCode> {
    let s = Subscribe {
        packet_id: 1,
        filters: vec![(
            "t".into(),
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..Default::default()
            },
        )],
        properties: Properties::default(),
    };
    match &packet(b, conn, Packet::Subscribe(s))[..] {
        [(_, Action::Send(Packet::SubAck(a))), ..] => a.reasons.clone(),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

fn ack_reason(actions: &[(ConnId, Action)], conn: u64) -> Option<ReasonCode> {
    actions.iter().find_map(|(c, a)| match a {
        Action::Send(Packet::PubAck(r) | Packet::PubRec(r)) if *c == ConnId(conn) => Some(r.reason),
        _ => None,
    })
}

fn delivered(actions: &[(ConnId, Action)], conn: u64) -> usize {
    actions
        .iter()
        .filter(|(c, a)| *c == ConnId(conn) && matches!(a, Action::Deliver(_)))
        .count()
}

/// A subscriber (conn 1) and a publisher (conn 2), both 5.0.
fn pair() -> Broker {
    let mut b = Broker::new(BrokerConfig::default());
    connect(&mut b, 1, "sub", V5, 0);
    assert_eq!(subscribe(&mut b, 1), vec![ReasonCode::GrantedQoS1]);
    connect(&mut b, 2, "pub", V5, 0);
    b
}

#[test]
fn memory_high_refuses_qos1_and_qos2_with_0x97_and_drops_qos0_counted() {
    let mut b = pair();
    b.set_admission(Admission {
        memory_high: true,
        storage_full: false,
    });
    for qos in [QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let out = publish(&mut b, 2, qos, false);
        assert_eq!(ack_reason(&out, 2), Some(ReasonCode::QuotaExceeded));
        assert_eq!(delivered(&out, 1), 0, "a refused publish is not routed");
    }
    let out = publish(&mut b, 2, QoS::AtMostOnce, false);
    assert_eq!(delivered(&out, 1), 0);
    assert_eq!(b.stats().dropped_memory_high, 1);
    assert_eq!(b.stats().refused_memory_high, 2);
    assert_eq!(b.stats().messages_received, [0, 0, 0]);

    b.set_admission(Admission::default());
    let out = publish(&mut b, 2, QoS::AtLeastOnce, false);
    assert_eq!(ack_reason(&out, 2), Some(ReasonCode::Success));
    assert_eq!(delivered(&out, 1), 1, "taken in again once below the mark");
}

#[test]
fn a_3_1_1_publisher_refused_for_memory_is_disconnected() {
    let mut b = pair();
    connect(&mut b, 3, "pub3", V3, 0);
    b.set_admission(Admission {
        memory_high: true,
        storage_full: false,
    });
    let out = publish(&mut b, 3, QoS::AtLeastOnce, false);
    assert!(
        out.iter()
            .any(|(c, a)| *c == ConnId(3) && matches!(a, Action::Close)),
        "3.1.1 has no negative ack: {out:?}"
    );
    assert_eq!(ack_reason(&out, 3), None);
}

#[test]
fn storage_full_refuses_durable_work_but_keeps_qos0_flowing() {
    let mut b = pair();
    connect(&mut b, 4, "durable", V5, 3600);
    b.set_admission(Admission {
        memory_high: false,
        storage_full: true,
    });
    // QoS 1 and retained QoS 0 are refused / dropped, plain QoS 0 flows.
    let out = publish(&mut b, 2, QoS::AtLeastOnce, false);
    assert_eq!(ack_reason(&out, 2), Some(ReasonCode::QuotaExceeded));
    let out = publish(&mut b, 2, QoS::AtMostOnce, true);
    assert_eq!(delivered(&out, 1), 0);
    assert_eq!(b.retained_count(), 0);
    let out = publish(&mut b, 2, QoS::AtMostOnce, false);
    assert_eq!(delivered(&out, 1), 1);
    assert_eq!(b.stats().dropped_storage_full, 1);

    // A new durable session is refused; a non-durable one and resuming a durable one are not.
    assert_eq!(
        connack(&connect(&mut b, 5, "new-durable", V5, 3600)),
        ReasonCode::QuotaExceeded
    );
    assert_eq!(
        connack(&connect(&mut b, 6, "new-durable-3", V3, 3600)),
        ReasonCode::QuotaExceeded,
        "3.1.1 clients see return code 3, server unavailable"
    );
    assert_eq!(
        connack(&connect(&mut b, 7, "clean", V5, 0)),
        ReasonCode::Success
    );
    assert_eq!(
        connack(&connect(&mut b, 8, "durable", V5, 3600)),
        ReasonCode::Success
    );
    // The durable session may not subscribe; the clean one may.
    assert_eq!(subscribe(&mut b, 8), vec![ReasonCode::QuotaExceeded]);
    assert_eq!(subscribe(&mut b, 7), vec![ReasonCode::GrantedQoS1]);
    assert_eq!(b.stats().refused_storage_full, 4);

    b.set_admission(Admission::default());
    assert_eq!(subscribe(&mut b, 8), vec![ReasonCode::GrantedQoS1]);
    assert_eq!(
        connack(&connect(&mut b, 9, "new-durable", V5, 3600)),
        ReasonCode::Success
    );
}
