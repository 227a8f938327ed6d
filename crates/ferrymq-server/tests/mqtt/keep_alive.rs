//! A silent client is closed after 1.5 times its keep alive; a 5.0 client is told why (0x8D).

use std::time::{Duration, Instant};

use crate::common::*;
use ferrymq_mqtt::{Packet, ProtocolVersion, ReasonCode};

#[tokio::test]
async fn silent_client_is_disconnected_after_one_and_a_half_keep_alives() {
    let server = start().await;
    let mut raw = Raw::connect(&server, ProtocolVersion::V5).await;
    let Packet::Connect(mut c) = connect_packet("sleepy", ProtocolVersion::V5) else {
        unreachable!()
    };
    c.keep_alive = 1;
    raw.send(&Packet::Connect(c)).await;
    assert!(matches!(raw.recv().await, Some(Packet::ConnAck(_))));
    let started = Instant::now();
    let seen = raw.until_closed().await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1400),
        "closed too early: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(4),
        "closed too late: {waited:?}"
    );
    assert!(
        matches!(seen.last(), Some(Packet::Disconnect(d)) if d.reason == ReasonCode::KeepAliveTimeout),
        "{seen:?}"
    );
}

#[tokio::test]
async fn pings_keep_the_connection_alive() {
    let server = start().await;
    let mut raw = Raw::connect(&server, ProtocolVersion::V311).await;
    let Packet::Connect(mut c) = connect_packet("pinger", ProtocolVersion::V311) else {
        unreachable!()
    };
    c.keep_alive = 1;
    raw.send(&Packet::Connect(c)).await;
    assert!(matches!(raw.recv().await, Some(Packet::ConnAck(_))));
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        raw.send(&Packet::PingReq).await;
        assert_eq!(raw.recv().await, Some(Packet::PingResp));
    }
}

#[tokio::test]
async fn no_connect_within_the_timeout_closes() {
    let mut config = test_config();
    config.limits.connect_timeout_secs = 1;
    let server = start_with(config).await;
    let mut raw = Raw::connect(&server, ProtocolVersion::V311).await;
    let started = Instant::now();
    assert!(raw.until_closed().await.is_empty());
    assert!(started.elapsed() < Duration::from_secs(3));
}
