//! `mqtt.max_connect_size` (issue 12, item 5): a CONNECT declared larger than it is refused
//! from its fixed header, before the rest is sent or buffered: 5.0 gets CONNACK 0x95 Packet
//! too large, 3.1.1 (which has no such code) a closed connection. One at the limit, with a
//! will payload filling it, is accepted, and raising the limit admits larger ones.
//! (Memory with many half-sent CONNECTs: `crates/ferrymq/tests/preauth_memory.rs`.)

use bytes::Bytes;
use ferrymq_mqtt::{encoded_len, Packet, ProtocolVersion, QoS, ReasonCode, Will};

use crate::common::*;

/// The first bytes of a CONNECT of `version` declared `total` bytes long (fixed header
/// included, 4-byte remaining length): fixed header, protocol name and level, no more.
fn connect_header(version: ProtocolVersion, total: usize) -> Vec<u8> {
    let remaining = total - 5;
    let mut b = vec![0x10];
    for i in 0..4 {
        let digit = ((remaining >> (7 * i)) & 0x7F) as u8;
        b.push(if i < 3 { digit | 0x80 } else { digit });
    }
    b.extend_from_slice(b"\x00\x04MQTT");
    b.push(version.level());
    b
}

/// A CONNECT whose will payload (and, past what that holds, a 5.0 user property) makes it
/// exactly `total` bytes long.
fn connect_of_size(version: ProtocolVersion, id: &str, total: usize) -> Packet {
    let mut p = connect_packet(id, version);
    let Packet::Connect(c) = &mut p else {
        unreachable!()
    };
    if total > 60_000 + 1024 {
        let pad = "x".repeat(total - 60_000);
        c.properties.user_properties.push(("pad".into(), pad));
    }
    c.will = Some(Will {
        topic: "w".into(),
        payload: Bytes::new(),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Default::default(),
    });
    let empty = encoded_len(&p, version);
    let Packet::Connect(c) = &mut p else {
        unreachable!()
    };
    // The remaining length's own size moves with the payload; close in on the total.
    let mut payload = total - empty;
    loop {
        c.will.as_mut().unwrap().payload = Bytes::from(vec![b'x'; payload]);
        let len = encoded_len(&Packet::Connect(c.clone()), version);
        if len == total {
            break;
        }
        payload -= len - total;
    }
    p
}

#[tokio::test]
async fn a_5_0_connect_over_the_limit_gets_connack_0x95_from_its_fixed_header() {
    let server = start().await;
    let mut raw = Raw::connect(&server, ProtocolVersion::V5).await;
    // Declared one byte over 64 KiB; only its first 12 bytes are sent.
    let header = connect_header(ProtocolVersion::V5, 64 * 1024 + 1);
    raw.send_bytes(&header).await.unwrap();
    let seen = raw.until_closed().await;
    assert!(
        matches!(seen.as_slice(), [Packet::ConnAck(a)] if a.reason == ReasonCode::PacketTooLarge),
        "{seen:?}"
    );
    // A claimed 1 MiB, the old per-connection exposure, is refused the same way.
    let mut raw = Raw::connect(&server, ProtocolVersion::V5).await;
    let header = connect_header(ProtocolVersion::V5, 1024 * 1024);
    raw.send_bytes(&header).await.unwrap();
    let seen = raw.until_closed().await;
    assert!(
        matches!(seen.as_slice(), [Packet::ConnAck(a)] if a.reason == ReasonCode::PacketTooLarge),
        "{seen:?}"
    );
    assert_eq!(
        metric(
            &server,
            "ferrymq_disconnects_total{reason=\"packet_too_large\"}"
        )
        .await,
        2
    );
}

#[tokio::test]
async fn a_3_1_1_connect_over_the_limit_is_closed_without_a_connack() {
    let server = start().await;
    let mut raw = Raw::connect(&server, ProtocolVersion::V311).await;
    let header = connect_header(ProtocolVersion::V311, 64 * 1024 + 1);
    raw.send_bytes(&header).await.unwrap();
    let seen = raw.until_closed().await;
    assert!(seen.is_empty(), "{seen:?}");
}

#[tokio::test]
async fn a_connect_at_the_limit_is_accepted_and_the_limit_can_be_raised() {
    let server = start().await;
    for version in [ProtocolVersion::V5, ProtocolVersion::V311] {
        let mut raw = Raw::connect(&server, version).await;
        raw.send(&connect_of_size(version, "at-limit", 64 * 1024))
            .await;
        let ack = raw.recv().await;
        assert!(
            matches!(&ack, Some(Packet::ConnAck(a)) if a.reason == ReasonCode::Success),
            "{version:?}: {ack:?}"
        );
    }
    let mut raw = Raw::connect(&server, ProtocolVersion::V5).await;
    raw.send(&connect_of_size(ProtocolVersion::V5, "over", 64 * 1024 + 1))
        .await;
    let seen = raw.until_closed().await;
    assert!(
        matches!(seen.as_slice(), [Packet::ConnAck(a)] if a.reason == ReasonCode::PacketTooLarge),
        "{seen:?}"
    );

    let mut config = test_config();
    config.mqtt.max_connect_size = 256 * 1024;
    let server = start_with(config).await;
    let mut raw = Raw::connect(&server, ProtocolVersion::V5).await;
    raw.send(&connect_of_size(ProtocolVersion::V5, "big", 100 * 1024))
        .await;
    let ack = raw.recv().await;
    assert!(
        matches!(&ack, Some(Packet::ConnAck(a)) if a.reason == ReasonCode::Success),
        "{ack:?}"
    );
}

/// The smallest settings still serve: a first read never asks the budget for more than the
/// largest CONNECT.
#[tokio::test]
async fn the_smallest_limit_and_budget_still_take_a_small_connect() {
    let mut config = test_config();
    config.mqtt.max_connect_size = 64;
    config.limits.preauth_buffer_bytes = 64;
    let server = start_with(config).await;
    for i in 0..3 {
        Raw::connected(&server, &format!("small-{i}"), ProtocolVersion::V5).await;
    }
    assert_eq!(metric(&server, "ferrymq_preauth_buffer_bytes").await, 0);
}

/// Edge review note: a refused CONNECT kept its share of the pre-auth budget through the
/// refusal's linger (up to 2 s), so refused clients that keep their sockets open held budget
/// that connecting clients wait for. The share goes back before the CONNACK is sent.
#[tokio::test]
async fn a_refused_connect_gives_its_budget_share_back_before_the_linger() {
    let dir = fresh_data_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let passwd = dir.join("passwd");
    let hash = ferrymq_server::password_file::hash_password(b"wonderland").unwrap();
    std::fs::write(&passwd, format!("alice:{hash}\n")).unwrap();
    let mut config = test_config();
    config.auth.password_file = Some(passwd);
    config.auth.max_failures = 1_000;
    let server = start_with(config).await;
    let mut raw = Raw::connect(&server, ProtocolVersion::V5).await;
    let mut p = connect_of_size(ProtocolVersion::V5, "refused", 60 * 1024);
    let Packet::Connect(c) = &mut p else {
        unreachable!()
    };
    c.username = Some("alice".into());
    c.password = Some(Bytes::from_static(b"a wrong password"));
    raw.send(&p).await;
    let ack = raw.recv().await;
    assert!(
        matches!(&ack, Some(Packet::ConnAck(a)) if a.reason == ReasonCode::BadUserNameOrPassword),
        "{ack:?}"
    );
    // The socket is still open (the broker lingers, reading) and holds no budget.
    assert_eq!(metric(&server, "ferrymq_preauth_buffer_bytes").await, 0);
    drop(raw);
}
