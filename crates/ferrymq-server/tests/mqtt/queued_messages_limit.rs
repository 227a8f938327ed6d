//! `mqtt.max_queued_messages` and `mqtt.queue_full`: a durable session queues at most that
//! many QoS 1/2 messages beyond those in flight, and a new one for a full queue is held
//! (`backpressure`: the publisher's PUBACK waits for room, then 0x97 after the timeout),
//! refused (`reject`: 0x97, or a closed 3.1.1 connection) or makes room by dropping the
//! oldest (`drop_oldest`, counted). The flood version is `full_queue_backpressure.rs`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ferrymq_mqtt::{Packet, ProtocolVersion, Publish, ReasonCode};
use ferrymq_server::config::QueueFull;

use crate::common::*;
use rumqttc::QoS;

fn publish(pid: u16) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: ferrymq_mqtt::QoS::AtLeastOnce,
        retain: false,
        topic: format!("q/{pid}"),
        packet_id: Some(pid),
        properties: Default::default(),
        payload: Bytes::from(format!("{pid}")),
    })
}

/// The next packet must be a PUBACK for `pid` with `reason`.
async fn expect_puback(raw: &mut Raw, pid: u16, reason: ReasonCode) {
    match raw.recv().await {
        Some(Packet::PubAck(a)) if a.packet_id == pid && a.reason == reason => {}
        other => panic!("expected PUBACK {pid} {reason:?}, got {other:?}"),
    }
}

async fn payloads(sub: &mut V4, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    for _ in 0..n {
        let g = next(&mut sub.rx).await;
        got.push(String::from_utf8(g.payload.to_vec()).unwrap());
    }
    got
}

#[tokio::test]
async fn backpressure_holds_the_ack_until_the_subscriber_drains_its_queue() {
    let server = start_with(queue_full_config(QueueFull::Backpressure, 5)).await;
    let o = offline_subscriber(&server, "bp-sub").await;
    let mut p = v4(v4_options(&server, "bp-pub")).await;
    for i in 0..8 {
        p.client
            .publish(format!("q/{i}"), QoS::AtLeastOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
    p.acked(5).await;
    p.no_ack_within(Duration::from_millis(500)).await;
    // The router stops running the publisher's input at its first held ack: the sixth is
    // queued (over the limit, durable) with its ack held, the last two wait unrouted.
    assert_eq!(metric(&server, "ferrymq_acks_held ").await, 1);

    // The subscriber comes back and reads: the queue drains, the held acks go out.
    let mut sub = v4(o).await;
    let expected: Vec<String> = (0..8).map(|i| i.to_string()).collect();
    assert_eq!(payloads(&mut sub, 8).await, expected, "all eight, in order");
    p.acked(3).await;
    nothing(&mut sub.rx, Duration::from_millis(300)).await;
    assert!(metric(&server, "ferrymq_acks_held_total").await >= 1);
    assert_eq!(metric(&server, "ferrymq_acks_held ").await, 0);
    let dropped = "ferrymq_messages_dropped_total{reason=\"queue_full\"}";
    assert_eq!(metric(&server, dropped).await, 0);
}

#[tokio::test]
async fn backpressure_refuses_with_0x97_after_the_timeout_and_forgets_the_message() {
    let mut c = queue_full_config(QueueFull::Backpressure, 2);
    c.mqtt.queue_full_timeout_ms = 300;
    let server = start_with(c).await;
    let o = offline_subscriber(&server, "to-sub").await;
    let mut p = Raw::connected(&server, "to-pub", ProtocolVersion::V5).await;
    for pid in 1..=3 {
        p.send(&publish(pid)).await;
    }
    expect_puback(&mut p, 1, ReasonCode::Success).await;
    expect_puback(&mut p, 2, ReasonCode::Success).await;
    let held = Instant::now();
    expect_puback(&mut p, 3, ReasonCode::QuotaExceeded).await;
    assert!(held.elapsed() >= Duration::from_millis(250), "{held:?}");
    let refused = "ferrymq_publishes_refused_total{reason=\"queue_full\"}";
    assert_eq!(metric(&server, refused).await, 1);

    let mut sub = v4(o).await;
    assert_eq!(payloads(&mut sub, 2).await, vec!["1", "2"]);
    nothing(&mut sub.rx, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn reject_refuses_with_0x97_and_delivers_a_refused_message_to_no_one() {
    let server = start_with(queue_full_config(QueueFull::Reject, 2)).await;
    let o = offline_subscriber(&server, "rj-full").await;
    let mut free = v4(v4_options(&server, "rj-free")).await;
    free.subscribe("q/#", QoS::AtLeastOnce).await;
    let mut p = Raw::connected(&server, "rj-pub", ProtocolVersion::V5).await;
    for pid in 1..=4 {
        p.send(&publish(pid)).await;
    }
    for (pid, reason) in [
        (1, ReasonCode::Success),
        (2, ReasonCode::Success),
        (3, ReasonCode::QuotaExceeded),
        (4, ReasonCode::QuotaExceeded),
    ] {
        expect_puback(&mut p, pid, reason).await;
    }
    // All or nothing: what was refused reaches no session, so a publisher that sends it
    // again does not deliver it twice to the sessions that had room.
    assert_eq!(payloads(&mut free, 2).await, vec!["1", "2"]);
    nothing(&mut free.rx, Duration::from_millis(300)).await;
    let mut full = v4(o).await;
    assert_eq!(payloads(&mut full, 2).await, vec!["1", "2"]);
    nothing(&mut full.rx, Duration::from_millis(300)).await;
    let refused = "ferrymq_publishes_refused_total{reason=\"queue_full\"}";
    assert_eq!(metric(&server, refused).await, 2);
}

#[tokio::test]
async fn reject_closes_a_3_1_1_publisher_which_has_no_negative_ack() {
    let server = start_with(queue_full_config(QueueFull::Reject, 1)).await;
    let _o = offline_subscriber(&server, "rj3-sub").await;
    let mut p = Raw::connected(&server, "rj3-pub", ProtocolVersion::V311).await;
    p.send(&publish(1)).await;
    p.send(&publish(2)).await;
    let seen = p.until_closed().await;
    assert!(
        matches!(&seen[..], [Packet::PubAck(a)] if a.packet_id == 1),
        "{seen:?}"
    );
}

#[tokio::test]
async fn drop_oldest_keeps_the_newest_and_counts_the_dropped() {
    let server = start_with(queue_full_config(QueueFull::DropOldest, 5)).await;
    let o = offline_subscriber(&server, "do-sub").await;
    let mut p = v4(v4_options(&server, "do-pub")).await;
    for i in 0..8 {
        p.client
            .publish(format!("q/{i}"), QoS::AtLeastOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
    // All eight acknowledged at once: each was queued, three by dropping an older one.
    p.acked(8).await;
    let dropped = "ferrymq_messages_dropped_total{reason=\"queue_full\"}";
    assert_eq!(metric(&server, dropped).await, 3);

    let mut sub = v4(o).await;
    assert_eq!(
        payloads(&mut sub, 5).await,
        vec!["3", "4", "5", "6", "7"],
        "the newest five, in order"
    );
    nothing(&mut sub.rx, Duration::from_millis(400)).await;
}
