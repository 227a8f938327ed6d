//! Back-pressure from subscribers to publishers: a burst to a subscriber that reads as fast as
//! it can loses nothing at QoS 0 (its publishers are held back while it is over its high
//! mark), and a subscriber that stops reading holds them back only for
//! `limits.slow_consumer_grace_ms`, after which the others get their messages at full rate.

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use ferrymq_mqtt::{decode, encode, Limits, Packet, ProtocolVersion, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::common::*;
use ferrymq_server::config::SlowConsumer;

fn publish(topic: &str, payload: Bytes) -> Packet {
    publish_packet(topic, QoS::AtMostOnce, None, payload)
}

/// Sends `count` QoS 0 publishes of 1 KiB (publisher 0, sequence) at `rate` a second, in
/// writes of `batch`.
async fn paced(publisher: &mut Raw, topic: &str, rate: u64, count: u64, batch: u64) {
    let started = Instant::now();
    let mut out = BytesMut::new();
    for seq in 0..count {
        let mut payload = BytesMut::with_capacity(1024);
        payload.put_u32(0);
        payload.put_u32(seq as u32);
        payload.put_bytes(b'x', 1016);
        encode(
            &publish(topic, payload.freeze()),
            ProtocolVersion::V311,
            &mut out,
        )
        .unwrap();
        if seq % batch == batch - 1 {
            publisher.stream.write_all(&out).await.unwrap();
            out.clear();
            let due = started + Duration::from_micros((seq + 1) * 1_000_000 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
    }
    publisher.stream.write_all(&out).await.unwrap();
}

/// Writes `count` QoS 0 publishes back to back in 256 KiB writes, as a batching client or a
/// bridge does: nothing paces it but TCP. Each payload is (publisher, sequence). Returns the
/// connection, still open.
async fn burst(addr: std::net::SocketAddr, id: u32, topic: String, count: u32) -> Raw {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut raw = Raw::from_stream(stream, ProtocolVersion::V311);
    raw.send(&connect_packet(
        &format!("burst-{id}"),
        ProtocolVersion::V311,
    ))
    .await;
    assert!(matches!(raw.recv().await, Some(Packet::ConnAck(_))));
    let mut out = BytesMut::new();
    for seq in 0..count {
        let mut payload = BytesMut::with_capacity(56);
        payload.put_u32(id);
        payload.put_u32(seq);
        payload.put_bytes(b'x', 48);
        encode(
            &publish(&topic, payload.freeze()),
            ProtocolVersion::V311,
            &mut out,
        )
        .unwrap();
        if out.len() >= 256 * 1024 {
            raw.stream.write_all(&out).await.unwrap();
            out.clear();
        }
    }
    raw.stream.write_all(&out).await.unwrap();
    raw
}

/// A subscriber that reads as fast as it can and counts, per publisher, the messages that
/// arrive in order; returns the total once `expected` arrived or nothing came for 3 s.
async fn fast_reader(mut stream: TcpStream, publishers: usize, expected: u64) -> u64 {
    let mut next = vec![0u32; publishers];
    let mut buf = BytesMut::with_capacity(256 * 1024);
    let mut got = 0u64;
    while got < expected {
        loop {
            match decode(&mut buf, ProtocolVersion::V311, &Limits::default()).unwrap() {
                Some(Packet::Publish(p)) => {
                    let id = u32::from_be_bytes(p.payload[0..4].try_into().unwrap()) as usize;
                    let seq = u32::from_be_bytes(p.payload[4..8].try_into().unwrap());
                    assert_eq!(
                        seq, next[id],
                        "publisher {id}: a message was lost or reordered"
                    );
                    next[id] += 1;
                    got += 1;
                }
                Some(other) => panic!("unexpected {other:?}"),
                None => break,
            }
        }
        if got >= expected {
            break;
        }
        buf.reserve(64 * 1024);
        match tokio::time::timeout(Duration::from_secs(3), stream.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => break,
        }
    }
    got
}

async fn subscriber(server: &ferrymq_server::Server, id: &str, filter: &str) -> TcpStream {
    let mut raw = Raw::connected(server, id, ProtocolVersion::V311).await;
    assert_eq!(
        raw.subscribe(1, &[(filter, QoS::AtMostOnce)]).await,
        vec![0]
    );
    raw.stream
}

/// A small high mark so that a burst crosses it many times over: every crossing holds the
/// publisher back, and every drain lets it go.
fn config() -> ferrymq_server::Config {
    let mut c = test_config();
    c.limits.max_outbound_bytes = 64 * 1024;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos0_burst_to_a_subscriber_that_reads_loses_nothing() {
    const COUNT: u32 = 100_000;
    let server = start_with(config()).await;
    let sub = subscriber(&server, "reader", "burst/#").await;
    let reader = tokio::spawn(fast_reader(sub, 1, u64::from(COUNT)));
    let _publisher = burst(server.mqtt_addr(), 0, "burst/0".into(), COUNT).await;
    let got = reader.await.unwrap();

    assert_eq!(got, u64::from(COUNT), "every message of the burst arrives");
    assert_eq!(
        metric(
            &server,
            "ferrymq_messages_dropped_total{reason=\"slow_consumer\"}"
        )
        .await,
        0
    );
    assert!(
        metric(&server, "ferrymq_publisher_pauses_total").await > 0,
        "5.6 MB through a 64 KiB mark holds the publisher back"
    );
    assert_eq!(metric(&server, "ferrymq_slow_subscribers_total").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos0_burst_from_50_publishers_to_one_subscriber_loses_nothing() {
    const PUBLISHERS: u32 = 50;
    const EACH: u32 = 2_000;
    let server = start_with(config()).await;
    let sub = subscriber(&server, "reader", "fanin/#").await;
    let expected = u64::from(PUBLISHERS * EACH);
    let reader = tokio::spawn(fast_reader(sub, PUBLISHERS as usize, expected));
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|id| tokio::spawn(burst(server.mqtt_addr(), id, format!("fanin/{id}"), EACH)))
        .collect();
    let got = reader.await.unwrap();
    for p in publishers {
        p.await.unwrap();
    }

    assert_eq!(got, expected, "every message of every publisher arrives");
    assert_eq!(
        metric(
            &server,
            "ferrymq_messages_dropped_total{reason=\"slow_consumer\"}"
        )
        .await,
        0
    );
    assert!(metric(&server, "ferrymq_publisher_pauses_total").await > 0);
}

/// A subscriber that never reads, with the smallest receive buffer the kernel allows.
async fn stuck_subscriber(server: &ferrymq_server::Server, filter: &str) -> Raw {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.mqtt_addr()).await.unwrap();
    let mut raw = Raw::from_stream(stream, ProtocolVersion::V311);
    raw.send(&connect_packet("stuck", ProtocolVersion::V311))
        .await;
    assert!(matches!(raw.recv().await, Some(Packet::ConnAck(_))));
    assert_eq!(
        raw.subscribe(1, &[(filter, QoS::AtMostOnce)]).await,
        vec![0]
    );
    raw
}

/// One stuck subscriber and ten healthy ones on the same topic, a publisher at a steady
/// 2,000 msg/s of 1 KiB for 2 s: the stuck one holds the publisher back for the grace period
/// only, after which the healthy ones get everything at the publisher's pace, and the stuck
/// one meets the slow-consumer policy.
async fn stuck_among_healthy(policy: SlowConsumer) -> ferrymq_server::Server {
    const RATE: u64 = 2_000;
    const COUNT: u64 = 4_000;
    const GRACE: Duration = Duration::from_millis(300);
    let mut c = config();
    c.limits.slow_consumer = policy;
    c.limits.slow_consumer_grace_ms = GRACE.as_millis() as u64;
    let server = start_with(c).await;
    let stuck = stuck_subscriber(&server, "paced/#").await;
    let mut healthy = Vec::new();
    for i in 0..10 {
        let s = subscriber(&server, &format!("healthy-{i}"), "paced/#").await;
        healthy.push(tokio::spawn(async move {
            let got = fast_reader(s, 1, COUNT).await;
            (got, Instant::now())
        }));
    }
    let mut publisher = Raw::connected(&server, "paced", ProtocolVersion::V311).await;
    let started = Instant::now();
    // Batches of 20 (10 ms' worth).
    paced(&mut publisher, "paced/x", RATE, COUNT, 20).await;
    let sent_in = started.elapsed();
    for h in healthy {
        let (got, done) = h.await.unwrap();
        assert_eq!(got, COUNT, "a healthy subscriber lost messages");
        let took = done.duration_since(started);
        // Paced to 2 s; the stuck subscriber may hold things up for its grace period once,
        // then never again (generous slack for a loaded machine).
        assert!(
            took < Duration::from_secs(2) + GRACE + Duration::from_millis(1500),
            "a healthy subscriber took {took:?} (publisher done in {sent_in:?})"
        );
    }
    assert!(metric(&server, "ferrymq_publisher_pauses_total").await > 0);
    assert_eq!(metric(&server, "ferrymq_slow_subscribers_total").await, 1);
    let alarm = "ferrymq_alarm_active{name=\"slow_subscriber\"}";
    if policy == SlowConsumer::Drop {
        // Raised while the stuck subscriber is slow, cleared once it is gone.
        assert_eq!(metric(&server, alarm).await, 1);
        let (_, alarms) = http_get(&server, "/api/v1/alarms").await;
        assert!(alarms.contains("slow_subscriber"), "{alarms}");
    }
    drop(stuck);
    eventually("the slow_subscriber alarm clears", || async {
        metric(&server, alarm).await == 0
    })
    .await;
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_subscriber_holds_publishers_only_for_its_grace_then_drops() {
    let server = stuck_among_healthy(SlowConsumer::Drop).await;
    assert!(
        metric(
            &server,
            "ferrymq_messages_dropped_total{reason=\"slow_consumer\"}"
        )
        .await
            > 0,
        "the stuck subscriber's QoS 0 messages are dropped after the grace period"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_subscriber_is_disconnected_after_its_grace_under_the_disconnect_policy() {
    let server = stuck_among_healthy(SlowConsumer::Disconnect).await;
    assert_eq!(
        metric(
            &server,
            "ferrymq_disconnects_total{reason=\"quota_exceeded\"}"
        )
        .await,
        1
    );
}

/// A subscriber that was slow (past its grace, QoS 0 dropped) and then catches up is an
/// ordinary subscriber again: the next burst holds its publisher back instead of dropping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_that_catches_up_loses_nothing_afterwards() {
    let mut c = config();
    c.limits.slow_consumer_grace_ms = 200;
    let server = start_with(c).await;
    let mut stuck = stuck_subscriber(&server, "again/#").await;
    // Phase 1: it does not read while 9 MB arrive (more than the kernel's socket buffers
    // take); after the grace its messages are dropped.
    let first = burst(server.mqtt_addr(), 0, "again/0".into(), 120_000).await;
    eventually(
        "the stuck subscriber is slow and has messages dropped",
        || async {
            metric(&server, "ferrymq_slow_subscribers_total").await == 1
                && metric(
                    &server,
                    "ferrymq_messages_dropped_total{reason=\"slow_consumer\"}",
                )
                .await
                    > 0
        },
    )
    .await;
    // Phase 2: it reads everything that was queued for it.
    let mut buf = BytesMut::new();
    loop {
        buf.clear();
        match tokio::time::timeout(Duration::from_millis(500), stuck.stream.read_buf(&mut buf))
            .await
        {
            Ok(Ok(n)) if n > 0 => {}
            _ => break,
        }
    }
    drop(first);
    let dropped = metric(
        &server,
        "ferrymq_messages_dropped_total{reason=\"slow_consumer\"}",
    )
    .await;
    // Phase 3: a burst while it reads as fast as it can: nothing more is dropped.
    let reader = tokio::spawn(fast_reader(stuck.stream, 2, 50_000));
    let _second = burst(server.mqtt_addr(), 1, "again/1".into(), 50_000).await;
    assert_eq!(reader.await.unwrap(), 50_000);
    assert_eq!(
        metric(
            &server,
            "ferrymq_messages_dropped_total{reason=\"slow_consumer\"}"
        )
        .await,
        dropped,
        "a subscriber that caught up is held for, not dropped"
    );
}

/// A client that publishes QoS 1 into its own full queue: its PUBACK is held and its
/// publishes wait, but the PUBACKs it sends for its own deliveries still run (they are what
/// frees the queue), so it goes on at its own pace instead of waiting out
/// `mqtt.queue_full_timeout_ms` and being refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_publishing_into_its_own_full_queue_is_not_deadlocked() {
    const COUNT: usize = 500;
    let mut c = test_config();
    c.mqtt.max_queued_messages = 20;
    c.mqtt.max_inflight = 5;
    c.mqtt.queue_full_timeout_ms = 10_000;
    let server = start_with(c).await;
    let mut opts = v4_options(&server, "loopback");
    opts.set_clean_session(false);
    opts.set_inflight(100);
    let mut me = v4(opts).await;
    me.subscribe("self/#", rumqttc::QoS::AtLeastOnce).await;
    let started = Instant::now();
    let client = me.client.clone();
    let publishing = tokio::spawn(async move {
        for i in 0..COUNT {
            client
                .publish("self/x", rumqttc::QoS::AtLeastOnce, false, i.to_string())
                .await
                .unwrap();
        }
    });
    for i in 0..COUNT {
        let g = next(&mut me.rx).await;
        assert_eq!(
            &g.payload[..],
            i.to_string().as_bytes(),
            "in order, none lost"
        );
    }
    me.acked(COUNT).await;
    publishing.await.unwrap();
    let took = started.elapsed();
    assert!(
        metric(&server, "ferrymq_acks_held_total").await > 0,
        "its queue was full and its acks held"
    );
    assert_eq!(
        metric(
            &server,
            "ferrymq_publishes_refused_total{reason=\"queue_full\"}"
        )
        .await,
        0,
        "nothing waited out the timeout"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

/// A publisher that keeps to its rate limit (`rate_exceeded = "disconnect"`) is held back
/// for a stuck subscriber's grace period; what it sent meanwhile waits in TCP and arrives at
/// once when it is read again. That is not a burst of its own: it is not disconnected for it,
/// and a healthy subscriber gets everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_of_ours_does_not_count_against_a_client_rate_limit() {
    // 6 MB: more than the kernel buffers for the stuck subscriber, so it congests.
    const RATE: u64 = 2_000;
    const COUNT: u64 = 6_000;
    let mut c = config();
    c.limits.slow_consumer_grace_ms = 800;
    c.limits.max_messages_per_sec = RATE * 2;
    c.limits.rate_burst_ms = 100;
    c.limits.rate_exceeded = ferrymq_server::config::RateExceeded::Disconnect;
    let server = start_with(c).await;
    let _stuck = stuck_subscriber(&server, "rated/#").await;
    let healthy = subscriber(&server, "healthy", "rated/#").await;
    let reader = tokio::spawn(fast_reader(healthy, 1, COUNT));
    let mut publisher = Raw::connected(&server, "rated", ProtocolVersion::V311).await;
    paced(&mut publisher, "rated/x", RATE, COUNT, 10).await;
    assert_eq!(
        reader.await.unwrap(),
        COUNT,
        "the healthy subscriber got everything"
    );
    assert!(metric(&server, "ferrymq_publisher_pauses_total").await > 0);
    // The reason appears in /metrics once it has happened.
    let (_, metrics) = http_get(&server, "/metrics").await;
    assert!(
        !metrics.contains("reason=\"message_rate_too_high\"} 1"),
        "the publisher kept to its rate, yet was disconnected for it"
    );
    publisher.send(&Packet::PingReq).await;
    assert_eq!(
        publisher.recv().await,
        Some(Packet::PingResp),
        "still connected"
    );
}
