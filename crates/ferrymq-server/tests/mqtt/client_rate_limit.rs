//! `limits.max_messages_per_sec` / `limits.max_bytes_per_sec`: a publisher writing as fast as
//! it can is held to its rate (plus the burst) and loses nothing under `throttle`, is not
//! closed for the silence our throttle causes, and gets DISCONNECT 0x96 (5.0) or a closed
//! connection (3.1.1) under `disconnect`; real clients (rumqttc) included.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ferrymq_mqtt::{encode, Packet, ProtocolVersion, QoS, ReasonCode};
use ferrymq_server::config::RateExceeded;
use ferrymq_server::{Config, Server};
use tokio::io::AsyncWriteExt;

use crate::common::*;

/// `count` QoS 0 publishes to `rate/data`, then a QoS 1 marker (packet id 1) to `rate/end`,
/// encoded into one buffer for back-to-back writes; and the size of one data publish.
fn burst(count: usize, payload: usize, version: ProtocolVersion) -> (BytesMut, usize) {
    let mut out = BytesMut::new();
    let data = publish_packet(
        "rate/data",
        QoS::AtMostOnce,
        None,
        Bytes::from(vec![b'x'; payload]),
    );
    for _ in 0..count {
        encode(&data, version, &mut out).unwrap();
    }
    let size = out.len() / count;
    let end = publish_packet("rate/end", QoS::AtLeastOnce, Some(1), "end".into());
    encode(&end, version, &mut out).unwrap();
    (out, size)
}

/// A subscriber to `rate/#` that records when each `rate/data` message arrives, until the
/// `rate/end` marker.
async fn subscriber(server: &Server) -> tokio::task::JoinHandle<Vec<Instant>> {
    let mut sub = Raw::connected(server, "sub", ProtocolVersion::V5).await;
    assert_eq!(sub.subscribe(1, &[("rate/#", QoS::AtLeastOnce)]).await, [1]);
    tokio::spawn(async move {
        let mut arrivals = Vec::new();
        loop {
            match sub.recv().await {
                Some(Packet::Publish(p)) if p.topic == "rate/data" => arrivals.push(Instant::now()),
                Some(Packet::Publish(p)) if p.topic == "rate/end" => return arrivals,
                other => panic!("subscriber got {other:?}"),
            }
        }
    })
}

fn rate_config(messages: u64, bytes: u64, exceeded: RateExceeded) -> Config {
    let mut c = test_config();
    c.limits.max_messages_per_sec = messages;
    c.limits.max_bytes_per_sec = bytes;
    c.limits.rate_exceeded = exceeded;
    c
}

/// Publishes the burst as fast as the socket takes it and waits for the marker's PUBACK;
/// returns when the writing started and each data message's arrival at the subscriber.
async fn flood(server: &Server, count: usize, payload: usize) -> (Instant, Vec<Instant>, usize) {
    let sub = subscriber(server).await;
    let mut publisher = Raw::connected(server, "pub", ProtocolVersion::V311).await;
    let (bytes, size) = burst(count, payload, ProtocolVersion::V311);
    let started = Instant::now();
    publisher.stream.write_all(&bytes).await.unwrap();
    assert!(
        matches!(publisher.recv().await, Some(Packet::PubAck(a)) if a.packet_id == 1),
        "the throttled publisher is served to the end"
    );
    let arrivals = sub.await.unwrap();
    assert_eq!(arrivals.len(), count, "nothing is lost to the throttle");
    (started, arrivals, size)
}

/// Asserts that no message arrived before the bucket allowed it: by the arrival of the i-th
/// (0-based), the i + 1 messages of `unit` units each are within `rate` units/s since the
/// start plus the `burst` (plus one message, for the one that takes the last tokens).
fn assert_held_to_rate(started: Instant, arrivals: &[Instant], rate: f64, burst: f64, unit: f64) {
    for (i, at) in arrivals.iter().enumerate() {
        let t = at.duration_since(started).as_secs_f64();
        let used = (i + 1) as f64 * unit;
        assert!(
            used <= rate * t + burst + unit,
            "message {i} at {t:.3} s: {used} units, allowed {:.0}",
            rate * t + burst
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_holds_a_flooding_publisher_to_its_message_rate_and_loses_nothing() {
    const RATE: u64 = 2000;
    const COUNT: usize = 6000;
    let server = start_with(rate_config(RATE, 0, RateExceeded::Throttle)).await;
    let (started, arrivals, _) = flood(&server, COUNT, 8).await;
    // Burst (1 s of the rate) at once, then 4,000 at 2,000/s: 2 s.
    let took = arrivals[COUNT - 1].duration_since(started).as_secs_f64();
    let achieved = (COUNT as u64 - RATE) as f64 / took;
    println!("{COUNT} messages in {took:.3} s: {achieved:.0} msg/s after the burst of {RATE}");
    assert_held_to_rate(started, &arrivals, RATE as f64, RATE as f64, 1.0);
    assert!(
        took < 3.5,
        "the throttle is far below its rate: {took:.3} s"
    );
    let (_, metrics) = http_get(&server, "/metrics").await;
    assert!(
        !metrics.contains("message_rate_too_high"),
        "throttled, never disconnected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_holds_a_flooding_publisher_to_its_byte_rate_and_loses_nothing() {
    const RATE: u64 = 256 * 1024;
    const COUNT: usize = 800;
    let server = start_with(rate_config(0, RATE, RateExceeded::Throttle)).await;
    let (started, arrivals, size) = flood(&server, COUNT, 1000).await;
    // 800 x ~1016 B = ~794 KiB: 256 KiB at once, then ~538 KiB at 256 KiB/s: ~2.1 s.
    let took = arrivals[COUNT - 1].duration_since(started).as_secs_f64();
    let achieved = ((COUNT * size) as f64 - RATE as f64) / took;
    println!(
        "{COUNT} x {size} B in {took:.3} s: {:.0} KiB/s after the burst",
        achieved / 1024.0
    );
    assert_held_to_rate(started, &arrivals, RATE as f64, RATE as f64, size as f64);
    assert!(
        took < 3.5,
        "the throttle is far below its rate: {took:.3} s"
    );
}

/// 25 small publishes fit the reader's first read (512 bytes); at 10/s with no burst to
/// speak of, the reader holds them for 2.4 s without reading the socket again. The client's
/// keep alive is 1 s (closed after 1.5 s of silence), but that silence is our throttle, not
/// the client's: it stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_client_is_not_closed_for_the_silence_we_cause() {
    const COUNT: usize = 25;
    let mut config = rate_config(10, 0, RateExceeded::Throttle);
    config.limits.rate_burst_ms = 100;
    let server = start_with(config).await;
    let sub = subscriber(&server).await;
    let mut publisher = Raw::connect(&server, ProtocolVersion::V311).await;
    let Packet::Connect(mut c) = connect_packet("pub", ProtocolVersion::V311) else {
        unreachable!()
    };
    c.keep_alive = 1;
    publisher.send(&Packet::Connect(c)).await;
    assert!(matches!(publisher.recv().await, Some(Packet::ConnAck(_))));
    let (bytes, _) = burst(COUNT, 1, ProtocolVersion::V311);
    let started = Instant::now();
    publisher.stream.write_all(&bytes).await.unwrap();
    assert!(
        matches!(publisher.recv().await, Some(Packet::PubAck(a)) if a.packet_id == 1),
        "still connected after the throttle"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(2200),
        "throttled for 2.4 s: {:?}",
        started.elapsed()
    );
    assert_eq!(sub.await.unwrap().len(), COUNT);
    assert_eq!(
        metric(
            &server,
            "ferrymq_disconnects_total{reason=\"keep_alive_timeout\"}"
        )
        .await,
        0
    );
}

/// Sends `count` publishes (and the marker) at once over a fresh connection and checks how the
/// server closes it.
async fn over_the_rate(server: &Server, version: ProtocolVersion, count: usize, payload: usize) {
    let mut raw = Raw::connected(server, "hasty", version).await;
    let (bytes, _) = burst(count, payload, version);
    raw.stream.write_all(&bytes).await.unwrap();
    let seen = raw.until_closed().await;
    match version {
        ProtocolVersion::V5 => assert!(
            matches!(&seen[..], [Packet::Disconnect(d)] if d.reason == ReasonCode::MessageRateTooHigh),
            "{seen:?}"
        ),
        _ => assert!(seen.is_empty(), "3.1.1: just closed, got {seen:?}"),
    }
}

#[tokio::test]
async fn disconnect_policy_closes_a_client_over_its_message_rate_with_0x96() {
    let server = start_with(rate_config(10, 0, RateExceeded::Disconnect)).await;
    let sub = subscriber(&server).await;
    over_the_rate(&server, ProtocolVersion::V5, 50, 8).await;
    over_the_rate(&server, ProtocolVersion::V311, 50, 8).await;
    assert_eq!(
        metric(
            &server,
            "ferrymq_disconnects_total{reason=\"message_rate_too_high\"}"
        )
        .await,
        2
    );
    // What came within the burst (10 each) was routed; the rest went with the connection.
    let mut marker = Raw::connected(&server, "marker", ProtocolVersion::V5).await;
    let (end, _) = burst(1, 1, ProtocolVersion::V5);
    marker.stream.write_all(&end).await.unwrap();
    let got = sub.await.unwrap().len();
    assert!((21..=24).contains(&got), "{got} messages routed");
}

#[tokio::test]
async fn disconnect_policy_closes_a_client_over_its_byte_rate_with_0x96() {
    let server = start_with(rate_config(0, 1000, RateExceeded::Disconnect)).await;
    over_the_rate(&server, ProtocolVersion::V5, 20, 200).await;
    over_the_rate(&server, ProtocolVersion::V311, 20, 200).await;
    assert_eq!(
        metric(
            &server,
            "ferrymq_disconnects_total{reason=\"message_rate_too_high\"}"
        )
        .await,
        2
    );
}

/// The same with a real client: rumqttc (5.0) reports the server's DISCONNECT 0x96 (as an
/// error of its event loop, which is how rumqttc surfaces a server DISCONNECT).
#[tokio::test]
async fn a_rumqttc_client_over_its_rate_is_told_0x96() {
    use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;
    use rumqttc::v5::{ConnectionError, StateError};
    let server = start_with(rate_config(10, 0, RateExceeded::Disconnect)).await;
    let (client, mut events) = rumqttc::v5::AsyncClient::new(v5_options(&server, "rumqttc"), 100);
    for i in 0..50u32 {
        let qos = rumqttc::v5::mqttbytes::QoS::AtMostOnce;
        let payload = i.to_be_bytes().to_vec();
        client
            .publish("rate/data", qos, false, payload)
            .await
            .unwrap();
    }
    let told = tokio::time::timeout(WAIT, async {
        loop {
            match events.poll().await {
                Ok(_) => {}
                Err(ConnectionError::MqttState(StateError::ServerDisconnect {
                    reason_code,
                    ..
                })) => return Some(reason_code),
                Err(_) => return None,
            }
        }
    })
    .await
    .expect("the event loop ends in time");
    assert_eq!(told, Some(DisconnectReasonCode::MessageRateTooHigh));
}

/// A real client under `throttle`: rumqttc (3.1.1) publishing 300 QoS 1 messages at 100/s
/// gets every PUBACK (the last after about 2 s) and its subscriber every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_rumqttc_client_gets_every_ack_at_the_rate() {
    const COUNT: usize = 300;
    let server = start_with(rate_config(100, 0, RateExceeded::Throttle)).await;
    let mut sub = v4(v4_options(&server, "sub")).await;
    sub.subscribe("rate/#", rumqttc::QoS::AtLeastOnce).await;
    let mut publisher = v4(v4_options(&server, "pub")).await;
    let started = Instant::now();
    for i in 0..COUNT as u32 {
        let payload = i.to_be_bytes().to_vec();
        let qos = rumqttc::QoS::AtLeastOnce;
        publisher
            .client
            .publish("rate/data", qos, false, payload)
            .await
            .unwrap();
    }
    publisher.acked(COUNT).await;
    let took = started.elapsed();
    println!("{COUNT} QoS 1 publishes acknowledged in {took:?}");
    assert!(took >= Duration::from_millis(1800), "{took:?}");
    for i in 0..COUNT as u32 {
        assert_eq!(next(&mut sub.rx).await.payload[..], i.to_be_bytes());
    }
}
