//! `mqtt.max_topic_levels`: a filter with more levels is refused in its SUBACK (0x8F Topic
//! filter invalid; 3.1.1: 0x80); a PUBLISH or will with more levels is a Topic name invalid
//! (0x90) DISCONNECT or CONNACK (3.1.1: the connection is closed). Exactly the limit is fine.

use crate::common::*;
use ferrymq_mqtt::{Packet, ProtocolVersion, Publish, QoS, ReasonCode, Will};

fn publish(topic: &str) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: topic.into(),
        packet_id: None,
        properties: Default::default(),
        payload: "x".into(),
    })
}

fn config() -> ferrymq_server::Config {
    let mut config = test_config();
    config.mqtt.max_topic_levels = 4;
    config
}

#[tokio::test]
async fn too_many_levels_in_a_filter_or_topic_is_refused_v5() {
    let server = start_with(config()).await;
    let mut raw = Raw::connected(&server, "deep5", ProtocolVersion::V5).await;
    let q0 = QoS::AtMostOnce;
    let codes = raw
        .subscribe(1, &[("a/b/c/d", q0), ("a/b/c/d/e", q0), ("a/+/+/+/#", q0)])
        .await;
    assert_eq!(codes, vec![0x00, 0x8F, 0x8F]);

    raw.send(&publish("a/b/c/d")).await;
    match raw.recv().await {
        Some(Packet::Publish(p)) => assert_eq!(p.topic, "a/b/c/d", "four levels pass"),
        other => panic!("expected the four-level PUBLISH back, got {other:?}"),
    }
    raw.send(&publish("a/b/c/d/e")).await;
    let seen = raw.until_closed().await;
    assert!(
        matches!(&seen[..], [Packet::Disconnect(d)] if d.reason == ReasonCode::TopicNameInvalid),
        "{seen:?}"
    );
}

#[tokio::test]
async fn too_many_levels_in_a_filter_or_topic_is_refused_v311() {
    let server = start_with(config()).await;
    let mut raw = Raw::connected(&server, "deep3", ProtocolVersion::V311).await;
    let q0 = QoS::AtMostOnce;
    let codes = raw
        .subscribe(1, &[("a/b/c/d", q0), ("a/b/c/d/e", q0)])
        .await;
    assert_eq!(codes, vec![0x00, 0x80]);
    raw.send(&publish("a/b/c/d/e")).await;
    // 3.1.1 has no DISCONNECT from the server: the connection just closes.
    assert_eq!(raw.until_closed().await, vec![]);
}

#[tokio::test]
async fn a_will_topic_with_too_many_levels_is_refused_at_connect() {
    let server = start_with(config()).await;
    let mut raw = Raw::connect(&server, ProtocolVersion::V5).await;
    let Packet::Connect(mut c) = connect_packet("deep-will", ProtocolVersion::V5) else {
        unreachable!()
    };
    c.will = Some(Will {
        topic: "w/x/y/z/too-deep".into(),
        payload: "gone".into(),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Default::default(),
    });
    raw.send(&Packet::Connect(c)).await;
    let seen = raw.until_closed().await;
    assert!(
        matches!(&seen[..], [Packet::ConnAck(a)] if a.reason == ReasonCode::TopicNameInvalid),
        "{seen:?}"
    );
}
