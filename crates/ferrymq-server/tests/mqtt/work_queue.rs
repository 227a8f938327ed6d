//! Work queues over real sockets: a 3.1.1 consumer (rumqttc) that never acks gets the
//! message again after the ack timeout; an MQTT 5 consumer nacks with a reason and its own
//! delay, and a lease outstanding at a restart comes back as a failed attempt; a full
//! `reject_new` queue answers 0x97; the per-queue metrics say what happened.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ferrymq_client::{Client, ConnectOptions};
use ferrymq_mqtt::{Packet, Properties, PubResp, Publish, QoS, ReasonCode, SubscriptionOptions};
use ferrymq_server::queue_spec::QueueSpec;

use crate::common::*;

fn queue_config(spec: &str) -> ferrymq_server::Config {
    let mut c = test_config();
    let spec: QueueSpec = toml::from_str(spec).expect("queue spec");
    c.queues.push(spec);
    c
}

fn publish(topic: &str, payload: &str) -> Publish {
    Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: topic.into(),
        packet_id: None,
        properties: Properties::default(),
        payload: Bytes::from(payload.to_string()),
    }
}

/// A `queue="jobs"` sample of a per-queue metric.
async fn queue_metric(server: &ferrymq_server::Server, name: &str) -> u64 {
    metric(server, &format!("{name}{{queue=\"jobs\"}}")).await
}

async fn consumer(server: &ferrymq_server::Server, id: &str, clean: bool) -> Client {
    let mut o = ConnectOptions::new(server.mqtt_addr().to_string(), id);
    o.clean_start = clean;
    o.properties.session_expiry_interval = Some(3600);
    o.properties.receive_maximum = Some(10);
    let (mut c, _) = Client::connect(o).await.expect("consumer connects");
    let qos1 = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        ..Default::default()
    };
    let acks = c
        .subscribe(vec![("$queue/jobs".into(), qos1)], Properties::default())
        .await
        .expect("subscribed");
    assert_eq!(acks.reasons, vec![ReasonCode::GrantedQoS1]);
    c
}

/// The next PUBLISH a client receives, with its `x-attempt`.
async fn next_delivery(c: &mut Client) -> (Publish, u32) {
    loop {
        let p = tokio::time::timeout(WAIT, c.recv())
            .await
            .expect("a delivery in time")
            .expect("connection open");
        if let Packet::Publish(p) = p {
            let attempt = p
                .properties
                .user_properties
                .iter()
                .find(|(k, _)| k == "x-attempt")
                .and_then(|(_, v)| v.parse().ok())
                .expect("x-attempt on a queue delivery");
            return (p, attempt);
        }
    }
}

#[tokio::test]
async fn a_3_1_1_consumer_that_never_acks_gets_the_message_again_after_the_ack_timeout() {
    let server = start_with(queue_config(
        "name = \"jobs\"\nfilter = \"jobs/#\"\nack_timeout_ms = 500\n",
    ))
    .await;
    let mut opts = v4_options(&server, "worker-311");
    opts.set_manual_acks(true);
    let mut c = v4(opts).await;
    c.subscribe("$queue/jobs", rumqttc::QoS::AtLeastOnce).await;
    let (mut p, _) = Client::connect(ConnectOptions::new(server.mqtt_addr().to_string(), "p"))
        .await
        .unwrap();
    assert_eq!(
        p.publish(publish("jobs/1", "work")).await.unwrap(),
        ReasonCode::Success
    );
    let first = next(&mut c.rx).await;
    let at = Instant::now();
    assert_eq!(
        (first.topic.as_str(), &first.payload[..]),
        ("jobs/1", &b"work"[..])
    );
    let again = next(&mut c.rx).await;
    let gap = at.elapsed();
    assert_eq!(&again.payload[..], b"work");
    assert!(
        gap >= Duration::from_millis(400),
        "redelivered after {gap:?}, before the 500 ms ack timeout"
    );
    assert!(queue_metric(&server, "ferrymq_queue_nacked_total").await >= 1);
    assert_eq!(
        queue_metric(&server, "ferrymq_queue_redelivered_total").await,
        1
    );
    server.shutdown().await;
}

#[tokio::test]
async fn an_mqtt5_nack_keeps_its_reason_and_delay_and_a_restart_returns_the_lease() {
    let config = queue_config(
        "name = \"jobs\"\nfilter = \"jobs/#\"\nbackoff = { kind = \"fixed\", initial_ms = 60000 }\n",
    );
    let server = start_with(config.clone()).await;
    let mut c = consumer(&server, "worker-5", true).await;
    let (mut p, _) = Client::connect(ConnectOptions::new(server.mqtt_addr().to_string(), "p"))
        .await
        .unwrap();
    p.publish(publish("jobs/7", "job")).await.unwrap();
    let (d, attempt) = next_delivery(&mut c).await;
    assert_eq!((attempt, d.topic.as_str()), (1, "jobs/7"));
    let first = Instant::now();
    // A nack whose own delay (200 ms) overrides the queue's minute of backoff.
    let mut nack = PubResp::new(
        d.packet_id.unwrap(),
        ReasonCode::ImplementationSpecificError,
    );
    nack.properties.reason_string = Some("database busy".into());
    nack.properties
        .user_properties
        .push(("retry-after-ms".into(), "200".into()));
    c.send(&Packet::PubAck(nack)).await.unwrap();
    let (d, attempt) = next_delivery(&mut c).await;
    let gap = first.elapsed();
    assert_eq!(attempt, 2);
    assert!(gap >= Duration::from_millis(180), "came back after {gap:?}");
    assert!(
        gap < Duration::from_secs(30),
        "the nack's delay, not the backoff: {gap:?}"
    );
    assert_eq!(queue_metric(&server, "ferrymq_queue_leased").await, 1);
    // Stop with the second delivery unacknowledged: the lease comes back, counted.
    drop(c);
    drop(d);
    server.shutdown().await;

    let server = start_with(config).await;
    assert_eq!(queue_metric(&server, "ferrymq_queue_depth").await, 1);
    let mut c = consumer(&server, "worker-5", false).await;
    // The restart (or the lost connection before it) is a failed attempt: the fixed
    // backoff of a minute applies, so nothing comes at once.
    let quiet = tokio::time::timeout(Duration::from_millis(300), next_delivery(&mut c)).await;
    assert!(quiet.is_err(), "delivered before its backoff");
    assert_eq!(queue_metric(&server, "ferrymq_queue_delayed").await, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn a_full_reject_new_queue_answers_quota_exceeded() {
    let server = start_with(queue_config(
        "name = \"jobs\"\nfilter = \"jobs/#\"\nmax_messages = 2\noverflow = \"reject_new\"\n",
    ))
    .await;
    let (mut p, _) = Client::connect(ConnectOptions::new(server.mqtt_addr().to_string(), "p"))
        .await
        .unwrap();
    let mut reasons = Vec::new();
    for i in 0..3 {
        reasons.push(
            p.publish(publish("jobs/x", &format!("m{i}")))
                .await
                .unwrap(),
        );
    }
    assert_eq!(
        reasons,
        vec![
            ReasonCode::Success,
            ReasonCode::Success,
            ReasonCode::QuotaExceeded
        ]
    );
    assert_eq!(queue_metric(&server, "ferrymq_queue_depth").await, 2);
    assert_eq!(
        queue_metric(&server, "ferrymq_queue_refused_total").await,
        1
    );
    // Both accepted messages are there for a consumer, in order.
    let mut c = consumer(&server, "w", true).await;
    let (a, _) = next_delivery(&mut c).await;
    let (b, _) = next_delivery(&mut c).await;
    assert_eq!((&a.payload[..], &b.payload[..]), (&b"m0"[..], &b"m1"[..]));
    server.shutdown().await;
}

/// A backlog past `limits.queue_memory_bytes`, with small segments and frequent checkpoints
/// so the log would be reclaimed under the queue if the floor were not kept: every message
/// comes back, in order, read from disk, before and after a restart.
#[tokio::test]
async fn a_backlog_larger_than_its_memory_budget_is_read_back_from_the_log() {
    let mut config = queue_config("name = \"jobs\"\nfilter = \"jobs/#\"\n");
    config.limits.queue_memory_bytes = 64 * 1024;
    config.storage.segment_bytes = 64 * 1024;
    config.storage.compact_after_bytes = 64 * 1024;
    let server = start_with(config.clone()).await;
    let (mut p, _) = Client::connect(ConnectOptions::new(server.mqtt_addr().to_string(), "p"))
        .await
        .unwrap();
    let body = |i: usize| format!("{i:06}-{}", "x".repeat(1017));
    const N: usize = 1500;
    for i in 0..N / 2 {
        p.publish(publish("jobs/big", &body(i))).await.unwrap();
    }
    assert!(queue_metric(&server, "ferrymq_queue_bytes").await > 700 * 1024);
    assert!(
        queue_metric(&server, "ferrymq_queue_cached_bytes").await <= 80 * 1024,
        "the budget holds"
    );
    // Half consumed before the restart, half after.
    let mut c = consumer(&server, "drain", true).await;
    for i in 0..N / 4 {
        let (d, _) = next_delivery(&mut c).await;
        assert_eq!(&d.payload[..], body(i).as_bytes(), "message {i}");
        c.send(&Packet::PubAck(PubResp::new(
            d.packet_id.unwrap(),
            ReasonCode::Success,
        )))
        .await
        .unwrap();
    }
    drop(c);
    for i in N / 2..N {
        p.publish(publish("jobs/big", &body(i))).await.unwrap();
    }
    drop(p);
    server.shutdown().await;
    // The checkpoints wrote the backlog's entries as snapshot files beside the log: the
    // newest adopted one (older ones removed) and at most the one finished at shutdown.
    let log_dir = config.data_dir.join("log");
    let snapshots = ferrymq_store::list_snapshots(&log_dir).unwrap();
    assert!((1..=2).contains(&snapshots.len()), "{snapshots:?}");
    assert!(std::fs::read_dir(&log_dir).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".tmp")));

    let server = start_with(config).await;
    // The durable session still consumes the queue: its deliveries start with the CONNACK
    // (subscribing again would race them: this client's subscribe skips other packets).
    let mut o = ConnectOptions::new(server.mqtt_addr().to_string(), "drain");
    o.clean_start = false;
    o.properties.session_expiry_interval = Some(3600);
    o.properties.receive_maximum = Some(10);
    let (mut c, ack) = Client::connect(o).await.unwrap();
    assert!(ack.session_present);
    let mut seen = Vec::new();
    while seen.len() < N - N / 4 {
        let (d, _) = next_delivery(&mut c).await;
        seen.push(String::from_utf8(d.payload.to_vec()).unwrap());
        c.send(&Packet::PubAck(PubResp::new(
            d.packet_id.unwrap(),
            ReasonCode::Success,
        )))
        .await
        .unwrap();
    }
    // The ten leased when the first consumer left come back first (a failed attempt each),
    // then the rest in order.
    seen.sort();
    let want: Vec<String> = (N / 4..N).map(body).collect();
    assert_eq!(seen, want);
    eventually("the queue is empty", || async {
        queue_metric(&server, "ferrymq_queue_depth").await == 0
            && queue_metric(&server, "ferrymq_queue_leased").await == 0
    })
    .await;
    assert_eq!(
        queue_metric(&server, "ferrymq_queue_unreadable_total").await,
        0
    );
    server.shutdown().await;
}
