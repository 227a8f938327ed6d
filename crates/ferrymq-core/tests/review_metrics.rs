//! Review of issue 14's per-message log in the engine: the traced drops a step reports
//! (`Outbox::dropped`) are bounded, whatever the fan-out, and the rest are counted.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use ferrymq_core::*;
use ferrymq_mqtt::*;

const V5: ProtocolVersion = ProtocolVersion::V5;
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// One traced publish dropped for 2,000 subscribers (each takes packets of at most 32 bytes):
/// the step lists at most `MAX_DROPPED_LISTED` of them (each listed one costs the router an
/// allocation and a log call) and counts the others.
#[test]
fn a_traced_message_dropped_for_many_subscribers_lists_a_bounded_number() {
    const SUBSCRIBERS: u64 = 2_000;
    let mut b = Broker::new(BrokerConfig::default());
    let mut out = Outbox::default();
    let now = Time(1_000);
    for i in 0..=SUBSCRIBERS {
        let mut properties = Properties::default();
        properties.maximum_packet_size = Some(32);
        let c = Connect {
            version: V5,
            client_id: format!("c{i}"),
            clean_start: true,
            keep_alive: 0,
            username: None,
            password: None,
            will: None,
            properties,
        };
        assert!(b.connect(ConnId(i), c, now, &mut out).accepted);
        if i > 0 {
            let s = Subscribe {
                packet_id: 1,
                filters: vec![("t".into(), SubscriptionOptions::default())],
                properties: Properties::default(),
            };
            b.packet(ConnId(i), Packet::Subscribe(s), now, &mut out);
        }
    }
    out = Outbox::default();
    let mut properties = Properties::default();
    properties.user_properties = vec![("traceparent".into(), TRACEPARENT.into())];
    let p = Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: "t".into(),
        packet_id: None,
        properties,
        payload: Bytes::from(vec![b'x'; 100]),
    };
    b.packet(ConnId(0), Packet::Publish(p), now, &mut out);
    assert_eq!(b.stats().dropped_too_large, SUBSCRIBERS);
    assert!(
        out.dropped.len() <= Outbox::MAX_DROPPED_LISTED,
        "{} drops listed in one step",
        out.dropped.len()
    );
    assert_eq!(
        out.dropped.len() as u64 + out.dropped_unlisted,
        SUBSCRIBERS,
        "every traced drop listed or counted"
    );
}
