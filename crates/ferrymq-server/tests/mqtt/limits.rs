//! Operator limits: maximum packet size, connection limit, subscription deny list.

use crate::common::*;
use ferrymq_mqtt::{Packet, ProtocolVersion, QoS, ReasonCode, Subscribe, SubscriptionOptions};

#[tokio::test]
async fn oversized_packet_gets_0x95_and_a_closed_connection() {
    let mut config = test_config();
    config.mqtt.max_packet_size = 1024;
    let server = start_with(config).await;
    let mut raw = Raw::connect(&server, ProtocolVersion::V5).await;
    raw.send(&connect_packet("big", ProtocolVersion::V5)).await;
    let Some(Packet::ConnAck(ack)) = raw.recv().await else {
        panic!("no CONNACK")
    };
    assert_eq!(ack.properties.maximum_packet_size, Some(1024));
    // Claim a 1 MiB publish; the server must refuse it without waiting for the bytes.
    raw.send_bytes(&[0x30, 0x80, 0x80, 0x40]).await.unwrap();
    let seen = raw.until_closed().await;
    assert!(
        matches!(seen.last(), Some(Packet::Disconnect(d)) if d.reason == ReasonCode::PacketTooLarge),
        "{seen:?}"
    );
}

#[tokio::test]
async fn connection_limit_answers_server_busy() {
    let mut config = test_config();
    config.limits.max_connections = 2;
    let server = start_with(config).await;
    let mut held = Vec::new();
    for i in 0..2 {
        let mut raw = Raw::connect(&server, ProtocolVersion::V5).await;
        raw.send(&connect_packet(&format!("c{i}"), ProtocolVersion::V5))
            .await;
        assert!(
            matches!(raw.recv().await, Some(Packet::ConnAck(a)) if a.reason == ReasonCode::Success)
        );
        held.push(raw);
    }
    let mut third = Raw::connect(&server, ProtocolVersion::V5).await;
    third.send(&connect_packet("c3", ProtocolVersion::V5)).await;
    assert!(
        matches!(third.recv().await, Some(Packet::ConnAck(a)) if a.reason == ReasonCode::ServerBusy)
    );
    let mut v3 = Raw::connect(&server, ProtocolVersion::V311).await;
    v3.send(&connect_packet("c4", ProtocolVersion::V311)).await;
    // 3.1.1 has "server unavailable" (3) for this.
    assert!(
        matches!(v3.recv().await, Some(Packet::ConnAck(a)) if a.reason == ReasonCode::ServerUnavailable)
    );
}

#[tokio::test]
async fn deny_list_refuses_subscriptions_with_the_right_code_per_version() {
    let mut config = test_config();
    config.mqtt.deny_subscribe = vec!["private/#".into()];
    let server = start_with(config).await;
    for (version, expected) in [(ProtocolVersion::V5, 0x87u8), (ProtocolVersion::V311, 0x80)] {
        let mut raw = Raw::connect(&server, version).await;
        raw.send(&connect_packet("denied", version)).await;
        raw.recv().await;
        let filters = vec![
            (
                "private/data".to_string(),
                SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..Default::default()
                },
            ),
            (
                "public/#".to_string(),
                SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..Default::default()
                },
            ),
        ];
        raw.send(&Packet::Subscribe(Subscribe {
            packet_id: 5,
            filters,
            properties: Default::default(),
        }))
        .await;
        let Some(Packet::SubAck(ack)) = raw.recv().await else {
            panic!("no SUBACK")
        };
        let codes: Vec<u8> = ack.reasons.iter().map(|r| r.as_u8()).collect();
        assert_eq!(codes, vec![expected, 1], "{version:?}");
    }
}

#[tokio::test]
async fn unsupported_protocol_version_gets_connack_0x84() {
    let server = start().await;
    let mut raw = Raw::connect(&server, ProtocolVersion::V5).await;
    // CONNECT with protocol level 6.
    raw.send_bytes(&[
        0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 6, 2, 0, 60, 0, 1, b'x',
    ])
    .await
    .unwrap();
    let seen = raw.until_closed().await;
    assert!(
        matches!(&seen[..], [Packet::ConnAck(a)] if a.reason == ReasonCode::UnsupportedProtocolVersion),
        "{seen:?}"
    );
}
