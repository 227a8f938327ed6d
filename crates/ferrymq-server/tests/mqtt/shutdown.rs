//! Graceful shutdown tells 5.0 clients why (DISCONNECT 0x8B) and closes 3.1.1 clients.

use crate::common::*;
use ferrymq_mqtt::{Packet, ProtocolVersion, ReasonCode};

#[tokio::test]
async fn shutdown_disconnects_clients_with_0x8b() {
    let server = start().await;
    let mut v5 = Raw::connect(&server, ProtocolVersion::V5).await;
    v5.send(&connect_packet("five", ProtocolVersion::V5)).await;
    assert!(matches!(v5.recv().await, Some(Packet::ConnAck(_))));
    let mut v3 = Raw::connect(&server, ProtocolVersion::V311).await;
    v3.send(&connect_packet("three", ProtocolVersion::V311))
        .await;
    assert!(matches!(v3.recv().await, Some(Packet::ConnAck(_))));
    let addr = server.mqtt_addr();
    server.shutdown().await;
    let seen = v5.until_closed().await;
    assert!(
        matches!(&seen[..], [Packet::Disconnect(d)] if d.reason == ReasonCode::ServerShuttingDown),
        "{seen:?}"
    );
    assert!(v3.until_closed().await.is_empty());
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed"
    );
}
