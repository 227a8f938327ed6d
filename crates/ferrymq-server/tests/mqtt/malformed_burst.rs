//! A burst of malformed packets from some clients: each is closed with the right reason, the
//! server does not panic, and a healthy publisher/subscriber pair keeps flowing throughout.

use crate::common::*;
use ferrymq_mqtt::{Packet, ProtocolVersion, ReasonCode};
use rumqttc::QoS;

/// Garbage sent after a valid CONNECT, and the reason a 5.0 client must be given. The last
/// three are valid 3.1.1 publishes (3.1.1 has no properties), so only 5.0 clients send them.
const V5_ONLY: usize = 3;

fn hostile() -> Vec<(&'static str, Vec<u8>, ReasonCode)> {
    vec![
        (
            "varint too long",
            vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
            ReasonCode::MalformedPacket,
        ),
        (
            "reserved type 0",
            vec![0x00, 0x00],
            ReasonCode::MalformedPacket,
        ),
        (
            "bad subscribe flags",
            vec![0x80, 0x06, 0, 1, 0, 1, b'a', 0],
            ReasonCode::MalformedPacket,
        ),
        (
            "qos 3 publish",
            vec![0x36, 0x05, 0, 1, b'a', 0, 1],
            ReasonCode::MalformedPacket,
        ),
        (
            "nul in topic",
            vec![0x30, 0x05, 0, 2, b'a', 0, 0],
            ReasonCode::MalformedPacket,
        ),
        (
            "wildcard topic",
            vec![0x30, 0x04, 0, 1, b'#', 0],
            ReasonCode::TopicNameInvalid,
        ),
        (
            "string past end",
            vec![0x30, 0x04, 0, 9, b'a', 0],
            ReasonCode::MalformedPacket,
        ),
        (
            "second connect",
            vec![0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 0, 0, 0],
            ReasonCode::ProtocolError,
        ),
        (
            "unknown alias",
            vec![0x30, 6, 0, 0, 3, 0x23, 0, 9],
            ReasonCode::ProtocolError,
        ),
        (
            "subscription id from client",
            vec![0x30, 7, 0, 1, b'a', 2, 0x0B, 1, 0],
            ReasonCode::ProtocolError,
        ),
        (
            "duplicate property",
            vec![0x30, 14, 0, 1, b'a', 10, 0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 2],
            ReasonCode::ProtocolError,
        ),
        (
            "topic alias zero",
            vec![0x30, 7, 0, 1, b'a', 3, 0x23, 0, 0],
            ReasonCode::MalformedPacket,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_burst_is_contained() {
    let server = start().await;
    let mut sub = v4(v4_options(&server, "steady-sub")).await;
    sub.subscribe("steady", QoS::AtLeastOnce).await;
    let publisher = v4(v4_options(&server, "steady-pub")).await;

    let addr = server.mqtt_addr();
    let attackers = tokio::spawn(async move {
        let mut results = Vec::new();
        for round in 0..5 {
            let cases = hostile();
            let n = cases.len();
            for (i, (name, bytes, reason)) in cases.into_iter().enumerate() {
                let versions: &[ProtocolVersion] = if i >= n - V5_ONLY {
                    &[ProtocolVersion::V5]
                } else {
                    &[ProtocolVersion::V5, ProtocolVersion::V311]
                };
                for &version in versions {
                    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                    let mut raw = RawFrom::new(stream, version);
                    raw.0
                        .send(&connect_packet(
                            &format!("bad-{round}-{i}-{version:?}"),
                            version,
                        ))
                        .await;
                    assert!(matches!(raw.0.recv().await, Some(Packet::ConnAck(_))));
                    let _ = raw.0.send_bytes(&bytes).await;
                    let seen = raw.0.until_closed().await;
                    results.push((name, version, reason, seen));
                }
            }
        }
        results
    });

    // The healthy pair keeps flowing while the burst runs.
    for i in 0..200u32 {
        publisher
            .client
            .publish("steady", QoS::AtLeastOnce, false, i.to_be_bytes().to_vec())
            .await
            .unwrap();
        let g = next(&mut sub.rx).await;
        assert_eq!(&g.payload[..], &i.to_be_bytes()[..]);
    }

    for (name, version, reason, seen) in attackers.await.unwrap() {
        match version {
            ProtocolVersion::V5 => assert!(
                matches!(seen.last(), Some(Packet::Disconnect(d)) if d.reason == reason),
                "{name}: expected DISCONNECT {reason:?}, got {seen:?}"
            ),
            // 3.1.1 has no DISCONNECT from the server: the connection just closes.
            ProtocolVersion::V311 => assert!(
                !seen.iter().any(|p| matches!(p, Packet::Disconnect(_))),
                "{name}: {seen:?}"
            ),
        }
    }
    assert_eq!(
        metric(&server, "ferrymq_connections ").await,
        2,
        "only the healthy pair remains"
    );
}

/// `Raw` built from an existing stream.
struct RawFrom(Raw);

impl RawFrom {
    fn new(stream: tokio::net::TcpStream, version: ProtocolVersion) -> Self {
        RawFrom(Raw::from_stream(stream, version))
    }
}
