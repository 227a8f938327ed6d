//! `limits.slow_consumer`: a subscriber that stops reading while QoS 0 floods in holds its
//! publisher back for `limits.slow_consumer_grace_ms` once `limits.max_outbound_bytes` are
//! queued for it; after that its QoS 0 deliveries over the mark are dropped (`drop`, counted
//! as `ferrymq_messages_dropped_total{reason="slow_consumer"}`), or it is disconnected with
//! 0x97 Quota exceeded (`disconnect`, counted as
//! `ferrymq_disconnects_total{reason="quota_exceeded"}`). Other clients keep getting their
//! messages either way.

use bytes::Bytes;
use ferrymq_mqtt::{Packet, ProtocolVersion, QoS, ReasonCode};
use tokio::net::TcpSocket;

use crate::common::*;
use ferrymq_server::config::SlowConsumer;

/// 300 × 64 KiB = 19 MiB: several times what the kernel buffers on loopback (at most 4 MiB
/// of send buffer here, and the subscriber's receive buffer is shrunk to its minimum).
const FLOOD: usize = 300;
const PAYLOAD: usize = 64 * 1024;

/// A 5.0 subscriber to `flood/#` at QoS 1 with a minimal receive buffer, which then stops
/// reading.
async fn slow_subscriber(server: &ferrymq_server::Server) -> Raw {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.mqtt_addr()).await.unwrap();
    let mut raw = Raw::from_stream(stream, ProtocolVersion::V5);
    raw.send(&connect_packet("slow", ProtocolVersion::V5)).await;
    assert!(matches!(raw.recv().await, Some(Packet::ConnAck(_))));
    assert_eq!(
        raw.subscribe(1, &[("flood/#", QoS::AtLeastOnce)]).await,
        vec![1]
    );
    raw
}

/// Sends the QoS 0 flood, then a QoS 1 end marker to the same subscribers, and waits for the
/// marker's PUBACK: the router has handled every message of the flood by then.
async fn flood(server: &ferrymq_server::Server) -> Raw {
    let mut publisher = Raw::connected(server, "flooder", ProtocolVersion::V311).await;
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    for _ in 0..FLOOD {
        publisher
            .send(&publish_packet(
                "flood/data",
                QoS::AtMostOnce,
                None,
                payload.clone(),
            ))
            .await;
    }
    publisher
        .send(&publish_packet(
            "flood/end",
            QoS::AtLeastOnce,
            Some(1),
            "end".into(),
        ))
        .await;
    assert!(matches!(publisher.recv().await, Some(Packet::PubAck(a)) if a.packet_id == 1));
    publisher
}

/// A reading subscriber on another topic still gets its message at once.
async fn others_unaffected(server: &ferrymq_server::Server, calm: &mut V4, publisher: &mut Raw) {
    publisher
        .send(&publish_packet(
            "calm/x",
            QoS::AtLeastOnce,
            Some(2),
            "fine".into(),
        ))
        .await;
    assert!(matches!(publisher.recv().await, Some(Packet::PubAck(a)) if a.packet_id == 2));
    let g = next(&mut calm.rx).await;
    assert_eq!((g.topic.as_str(), &g.payload[..]), ("calm/x", &b"fine"[..]));
    assert!(metric(server, "ferrymq_connections ").await >= 2);
}

fn config(policy: SlowConsumer) -> ferrymq_server::Config {
    let mut config = test_config();
    config.limits.max_outbound_bytes = 1024;
    config.limits.slow_consumer = policy;
    config.limits.slow_consumer_grace_ms = 200;
    config
}

/// The flood held its publisher back first, and the subscriber met the policy only after
/// its grace period.
async fn held_then_slow(server: &ferrymq_server::Server) {
    assert!(metric(server, "ferrymq_publisher_pauses_total").await >= 1);
    assert_eq!(metric(server, "ferrymq_slow_subscribers_total").await, 1);
}

#[tokio::test]
async fn drop_policy_drops_and_counts_qos0_for_a_subscriber_that_does_not_read() {
    let server = start_with(config(SlowConsumer::Drop)).await;
    let mut calm = v4(v4_options(&server, "calm")).await;
    calm.subscribe("calm/#", rumqttc::QoS::AtLeastOnce).await;
    let mut slow = slow_subscriber(&server).await;
    let started = std::time::Instant::now();
    let mut publisher = flood(&server).await;
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(200),
        "the publisher was held back for the grace period first"
    );
    held_then_slow(&server).await;

    let dropped = metric(
        &server,
        "ferrymq_messages_dropped_total{reason=\"slow_consumer\"}",
    )
    .await;
    assert!(
        dropped > 0,
        "a 19 MiB flood to a reader that stopped drops some"
    );
    others_unaffected(&server, &mut calm, &mut publisher).await;

    // The slow subscriber catches up: what it got plus what was counted is the whole flood,
    // then the QoS 1 marker (never dropped), and it is still connected.
    let mut received = 0;
    loop {
        match slow.recv().await {
            Some(Packet::Publish(p)) if p.topic == "flood/data" => received += 1,
            Some(Packet::Publish(p)) if p.topic == "flood/end" => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        received + dropped as usize,
        FLOOD,
        "received {received}, dropped {dropped}"
    );
    assert_eq!(
        metric(
            &server,
            "ferrymq_disconnects_total{reason=\"quota_exceeded\"}"
        )
        .await,
        0
    );
    slow.send(&Packet::PingReq).await;
    assert_eq!(slow.recv().await, Some(Packet::PingResp));
}

#[tokio::test]
async fn disconnect_policy_disconnects_a_subscriber_that_does_not_read_with_0x97() {
    let server = start_with(config(SlowConsumer::Disconnect)).await;
    let mut calm = v4(v4_options(&server, "calm")).await;
    calm.subscribe("calm/#", rumqttc::QoS::AtLeastOnce).await;
    let mut slow = slow_subscriber(&server).await;
    let mut publisher = flood(&server).await;
    held_then_slow(&server).await;

    assert_eq!(
        metric(
            &server,
            "ferrymq_disconnects_total{reason=\"quota_exceeded\"}"
        )
        .await,
        1
    );
    others_unaffected(&server, &mut calm, &mut publisher).await;
    assert_eq!(
        metric(&server, "ferrymq_connections ").await,
        2,
        "slow one gone"
    );

    // What was already queued still arrives, then DISCONNECT 0x97, then the close.
    let seen = slow.until_closed().await;
    assert!(
        matches!(seen.last(), Some(Packet::Disconnect(d)) if d.reason == ReasonCode::QuotaExceeded),
        "last of {} packets: {:?}",
        seen.len(),
        seen.last()
    );
    assert!(
        seen.len() < FLOOD,
        "the flood was cut short: {} packets",
        seen.len()
    );
}
