//! Takeover of a live client id: the old connection is closed (5.0: DISCONNECT 0x8E), and
//! concurrent takeovers leave exactly one live connection.

use crate::common::*;
use ferrymq_mqtt::{Packet, ProtocolVersion, ReasonCode};

#[tokio::test]
async fn old_connection_gets_session_taken_over() {
    let server = start().await;
    let mut first = Raw::connect(&server, ProtocolVersion::V5).await;
    first
        .send(&connect_packet("dup-id", ProtocolVersion::V5))
        .await;
    assert!(matches!(first.recv().await, Some(Packet::ConnAck(_))));
    let mut second = Raw::connect(&server, ProtocolVersion::V5).await;
    second
        .send(&connect_packet("dup-id", ProtocolVersion::V5))
        .await;
    assert!(
        matches!(second.recv().await, Some(Packet::ConnAck(a)) if a.reason == ReasonCode::Success)
    );
    let seen = first.until_closed().await;
    assert!(
        matches!(&seen[..], [Packet::Disconnect(d)] if d.reason == ReasonCode::SessionTakenOver),
        "{seen:?}"
    );
    second.send(&Packet::PingReq).await;
    assert_eq!(
        second.recv().await,
        Some(Packet::PingResp),
        "the new connection lives on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_takeovers_leave_exactly_one_connection() {
    let server = start().await;
    let addr = server.mqtt_addr();
    let mut tasks = Vec::new();
    for i in 0..40 {
        tasks.push(tokio::spawn(async move {
            let version = if i % 2 == 0 {
                ProtocolVersion::V5
            } else {
                ProtocolVersion::V311
            };
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut raw = Raw::from_stream(stream, version);
            raw.send(&connect_packet("contested", version)).await;
            let ack = raw.recv().await;
            assert!(
                matches!(&ack, Some(Packet::ConnAck(a)) if a.reason == ReasonCode::Success),
                "{ack:?}"
            );
            raw
        }));
    }
    let mut conns = Vec::new();
    for t in tasks {
        conns.push(t.await.unwrap());
    }
    eventually("one connection left", || async {
        metric(&server, "ferrymq_connections ").await == 1
    })
    .await;
    assert_eq!(metric(&server, "ferrymq_sessions").await, 1);
    // Exactly one socket is still open and answers a ping.
    let mut alive = 0;
    for mut c in conns {
        c.send_bytes(&[0xC0, 0]).await.ok();
        if let Some(Packet::PingResp) = c.recv().await {
            alive += 1;
        }
    }
    assert_eq!(alive, 1);
}
