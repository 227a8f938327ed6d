//! Connection limits per source address and per listener: past
//! `limits.max_connections_per_address` a CONNECT gets Server Busy (0x89; 3.1.1: 3) while other
//! addresses connect; past `limits.max_connection_rate` (per listener) or
//! `limits.max_connection_rate_per_address` it gets 0x9F Connection rate exceeded (3.1.1: 3),
//! and the limit recovers as its bucket refills. Refusals are counted by limit in
//! `ferrymq_connections_refused_total{reason}`.

use std::time::{Duration, Instant};

use ferrymq_mqtt::{Packet, ProtocolVersion, ReasonCode};
use ferrymq_server::Server;
use tokio::net::TcpSocket;

use crate::common::*;

/// Connects from `local` (any 127.x.y.z address reaches the loopback listener) and sends
/// CONNECT; returns the CONNACK's reason (`None` when closed without one) and the connection.
async fn connect_from(
    server: &Server,
    local: &str,
    id: &str,
    version: ProtocolVersion,
) -> (Option<ReasonCode>, Raw) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    let stream = socket.connect(server.mqtt_addr()).await.unwrap();
    let mut raw = Raw::from_stream(stream, version);
    // A socket the server dropped at once may refuse the write; the read then says so.
    let _ = raw
        .send_bytes(&{
            let mut b = bytes::BytesMut::new();
            ferrymq_mqtt::encode(&connect_packet(id, version), version, &mut b).unwrap();
            b
        })
        .await;
    let reason = match raw.recv().await {
        Some(Packet::ConnAck(a)) => Some(a.reason),
        None => None,
        Some(other) => panic!("{id}: expected CONNACK, got {other:?}"),
    };
    (reason, raw)
}

async fn refused(server: &Server, limit: &str) -> u64 {
    let name = format!("ferrymq_connections_refused_total{{reason=\"{limit}\"}}");
    metric(server, &name).await
}

/// Tries a connection from `local` every 100 ms until it is accepted; returns how long that
/// took (bounded by `within`).
async fn accepted_again(server: &Server, local: &str, within: Duration) -> Duration {
    let started = Instant::now();
    while started.elapsed() < within {
        let (reason, _raw) = connect_from(server, local, "again", ProtocolVersion::V5).await;
        if reason == Some(ReasonCode::Success) {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{local}: not accepted again within {within:?}");
}

#[tokio::test]
async fn past_the_per_address_limit_connect_gets_server_busy_and_other_addresses_connect() {
    let mut config = test_config();
    config.limits.max_connections_per_address = 2;
    let server = start_with(config).await;
    let mut held = Vec::new();
    for i in 0..2 {
        let (reason, raw) =
            connect_from(&server, "127.0.0.1", &format!("c{i}"), ProtocolVersion::V5).await;
        assert_eq!(reason, Some(ReasonCode::Success));
        held.push(raw);
    }
    let (v5, v5_raw) = connect_from(&server, "127.0.0.1", "c2", ProtocolVersion::V5).await;
    assert_eq!(v5, Some(ReasonCode::ServerBusy));
    let (v3, v3_raw) = connect_from(&server, "127.0.0.1", "c3", ProtocolVersion::V311).await;
    // 3.1.1 return code 3, server unavailable.
    assert_eq!(v3, Some(ReasonCode::ServerUnavailable));
    // The refused two are still open: four from one address is twice its limit, and the
    // next is closed without a CONNACK.
    let (fifth, _) = connect_from(&server, "127.0.0.1", "c4", ProtocolVersion::V5).await;
    assert_eq!(fifth, None, "closed without an answer");
    let (other, _other) =
        connect_from(&server, "127.0.0.2", "elsewhere", ProtocolVersion::V5).await;
    assert_eq!(
        other,
        Some(ReasonCode::Success),
        "another address has its own count"
    );
    assert_eq!(refused(&server, "max_connections_per_address").await, 3);

    // Once the address holds fewer than its limit, it connects again.
    drop((v5_raw, v3_raw));
    held.pop();
    let waited = accepted_again(&server, "127.0.0.1", Duration::from_secs(3)).await;
    println!("accepted again after {waited:?}");
}

#[tokio::test]
async fn past_the_listener_connection_rate_connect_gets_0x9f_and_recovers() {
    let mut config = test_config();
    // One a second, with a burst of three.
    config.limits.max_connection_rate = 1;
    config.limits.rate_burst_ms = 3000;
    let server = start_with(config).await;
    let mut held = Vec::new();
    for (i, local) in ["127.0.0.1", "127.0.0.2", "127.0.0.3"].iter().enumerate() {
        let (reason, raw) =
            connect_from(&server, local, &format!("c{i}"), ProtocolVersion::V5).await;
        assert_eq!(reason, Some(ReasonCode::Success));
        held.push(raw);
    }
    let last = Instant::now();
    let (v5, _) = connect_from(&server, "127.0.0.4", "c3", ProtocolVersion::V5).await;
    assert_eq!(v5, Some(ReasonCode::ConnectionRateExceeded));
    let (v3, _) = connect_from(&server, "127.0.0.5", "c4", ProtocolVersion::V311).await;
    assert_eq!(v3, Some(ReasonCode::ServerUnavailable));
    assert_eq!(refused(&server, "max_connection_rate").await, 2);
    // A token every second: accepted again within about one.
    accepted_again(&server, "127.0.0.6", Duration::from_secs(3)).await;
    let waited = last.elapsed();
    println!("accepted again {waited:?} after the burst");
    assert!(waited >= Duration::from_millis(500), "{waited:?}");
}

#[tokio::test]
async fn past_the_per_address_connection_rate_connect_gets_0x9f_and_other_addresses_connect() {
    let mut config = test_config();
    config.limits.max_connection_rate_per_address = 1;
    config.limits.rate_burst_ms = 3000;
    let server = start_with(config).await;
    for i in 0..3 {
        let (reason, _) =
            connect_from(&server, "127.0.0.1", &format!("c{i}"), ProtocolVersion::V5).await;
        assert_eq!(reason, Some(ReasonCode::Success));
    }
    let last = Instant::now();
    let (v5, _) = connect_from(&server, "127.0.0.1", "c3", ProtocolVersion::V5).await;
    assert_eq!(v5, Some(ReasonCode::ConnectionRateExceeded));
    let (v3, _) = connect_from(&server, "127.0.0.1", "c4", ProtocolVersion::V311).await;
    assert_eq!(v3, Some(ReasonCode::ServerUnavailable));
    let (other, _) = connect_from(&server, "127.0.0.2", "elsewhere", ProtocolVersion::V5).await;
    assert_eq!(
        other,
        Some(ReasonCode::Success),
        "another address has its own bucket"
    );
    assert_eq!(refused(&server, "max_connection_rate_per_address").await, 2);
    assert_eq!(refused(&server, "max_connection_rate").await, 0);
    accepted_again(&server, "127.0.0.1", Duration::from_secs(3)).await;
    let waited = last.elapsed();
    println!("accepted again {waited:?} after the burst");
    assert!(waited >= Duration::from_millis(500), "{waited:?}");
}
