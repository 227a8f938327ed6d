//! `mqtt.max_inflight`: a client that does not acknowledge has at most that many QoS 1
//! deliveries outstanding; each PUBACK lets exactly one more go out, in order.

use std::time::Duration;

use crate::common::*;
use ferrymq_mqtt::{Packet, ProtocolVersion, PubResp, QoS, ReasonCode};

/// Long enough for a delivery the router had released to show up on loopback.
const QUIET: Duration = Duration::from_millis(300);

async fn next_publish(raw: &mut Raw) -> (u16, String) {
    match raw.recv().await {
        Some(Packet::Publish(p)) => (
            p.packet_id.expect("QoS 1 has a packet id"),
            String::from_utf8(p.payload.to_vec()).unwrap(),
        ),
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

#[tokio::test]
async fn at_most_max_inflight_unacknowledged_deliveries() {
    let mut config = test_config();
    config.mqtt.max_inflight = 3;
    let server = start_with(config).await;
    // No Receive Maximum in CONNECT (65,535): the broker's limit is the one that applies.
    let mut raw = Raw::connected(&server, "no-acks", ProtocolVersion::V5).await;
    assert_eq!(
        raw.subscribe(1, &[("w/#", QoS::AtLeastOnce)]).await,
        vec![1]
    );

    let mut p = v4(v4_options(&server, "w-pub")).await;
    for i in 0..5 {
        p.client
            .publish("w/t", rumqttc::QoS::AtLeastOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
    p.acked(5).await;

    let mut ids = Vec::new();
    for i in 0..3 {
        let (id, payload) = next_publish(&mut raw).await;
        assert_eq!(payload, i.to_string());
        ids.push(id);
    }
    raw.quiet(QUIET).await;

    raw.send(&Packet::PubAck(PubResp::new(ids[0], ReasonCode::Success)))
        .await;
    let (_, payload) = next_publish(&mut raw).await;
    assert_eq!(payload, "3", "one PUBACK, one more delivery");
    raw.quiet(QUIET).await;

    raw.send(&Packet::PubAck(PubResp::new(ids[1], ReasonCode::Success)))
        .await;
    let (_, payload) = next_publish(&mut raw).await;
    assert_eq!(payload, "4");
}
