//! Review of the observability change (issue 14): what hostile clients, churn and bursts do
//! to `/metrics`, the peers map behind the client views and the per-message log.

use std::time::Duration;

use crate::common::*;
use ferrymq_mqtt::{Disconnect, Packet, ProtocolVersion, ReasonCode};

/// Sum of every `ferrymq_client_connections{listener,protocol}` sample.
async fn client_connections(server: &ferrymq_server::Server) -> u64 {
    let (_, body) = http_get(server, "/metrics").await;
    body.lines()
        .filter(|l| l.starts_with("ferrymq_client_connections{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Waits until the engine has no connection and no connection task is left, then checks that
/// the per-listener gauge (the peers map) agrees: zero.
async fn all_gone(server: &ferrymq_server::Server, how: &str) {
    eventually(&format!("{how}: every connection closed"), || async {
        metric(server, "ferrymq_connections_open ").await == 0
            && metric(server, "ferrymq_connections ").await == 0
    })
    .await;
    eventually(
        &format!("{how}: ferrymq_client_connections back to 0"),
        || async { client_connections(server).await == 0 },
    )
    .await;
}

#[tokio::test]
async fn peers_entry_goes_with_every_way_a_connection_ends() {
    let server = start().await;
    let v5 = ProtocolVersion::V5;

    // A clean DISCONNECT from the client.
    let mut a = Raw::connected(&server, "peer-clean", v5).await;
    a.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success)))
        .await;
    a.until_closed().await;
    all_gone(&server, "client DISCONNECT").await;

    // The socket dropped without DISCONNECT.
    drop(Raw::connected(&server, "peer-drop", v5).await);
    all_gone(&server, "socket dropped").await;

    // Taken over by a second connection with the same client id, which then leaves.
    let mut first = Raw::connected(&server, "peer-take", v5).await;
    let mut second = Raw::connected(&server, "peer-take", v5).await;
    first.until_closed().await;
    second
        .send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success)))
        .await;
    second.until_closed().await;
    all_gone(&server, "takeover").await;

    // Kicked through the API.
    let mut k = Raw::connected(&server, "peer-kick", v5).await;
    let (status, _) = api(&server, "DELETE", "/api/v1/clients/peer-kick", None).await;
    assert_eq!(status, 200);
    k.until_closed().await;
    all_gone(&server, "DELETE /api/v1/clients").await;

    // A protocol violation (a second CONNECT) closed by the server.
    let mut p = Raw::connected(&server, "peer-bad", v5).await;
    p.send(&connect_packet("peer-bad", v5)).await;
    p.until_closed().await;
    all_gone(&server, "protocol violation").await;

    // Silent past its keep alive (1 s: closed after 1.5 s).
    let mut s = Raw::connect(&server, v5).await;
    let mut connect = connect_packet("peer-silent", v5);
    if let Packet::Connect(c) = &mut connect {
        c.keep_alive = 1;
    }
    s.send(&connect).await;
    assert!(matches!(s.recv().await, Some(Packet::ConnAck(_))));
    tokio::time::timeout(Duration::from_secs(5), s.until_closed())
        .await
        .expect("closed for its keep alive");
    all_gone(&server, "keep-alive timeout").await;
}
