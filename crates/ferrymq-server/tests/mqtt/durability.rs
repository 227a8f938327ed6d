//! Durability through a restart of the server on the same data directory: sessions with
//! their subscriptions and queues, retained messages; disk use stays bounded; one process per
//! data directory. (Crashes with SIGKILL are tested by `crates/ferrymq/tests/crash.rs`.)

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use ferrymq_client::{Client, ConnectOptions};
use ferrymq_mqtt::{Packet, Properties, Publish, QoS, ReasonCode, SubscriptionOptions};

use crate::common::*;

fn publish(topic: &str, payload: impl Into<Bytes>, qos: QoS, retain: bool) -> Publish {
    Publish {
        dup: false,
        qos,
        retain,
        topic: topic.into(),
        packet_id: None,
        properties: Properties::default(),
        payload: payload.into(),
    }
}

fn options(server: &ferrymq_server::Server, id: &str, clean: bool) -> ConnectOptions {
    let mut o = ConnectOptions::new(server.mqtt_addr().to_string(), id);
    o.clean_start = clean;
    o.properties.session_expiry_interval = Some(3600);
    o
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn restart_keeps_sessions_queued_messages_and_retained() {
    let config = test_config();
    let server = start_with(config.clone()).await;
    let (mut sub, _) = Client::connect(options(&server, "dur-sub", true))
        .await
        .unwrap();
    let qos1 = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        ..Default::default()
    };
    sub.subscribe(vec![("jobs/#".into(), qos1)], Properties::default())
        .await
        .unwrap();
    sub.disconnect().await.unwrap();
    let (mut p, _) = Client::connect(options(&server, "dur-pub", true))
        .await
        .unwrap();
    for i in 0..50 {
        let rc = p
            .publish(publish(
                &format!("jobs/{i}"),
                format!("{i}"),
                QoS::AtLeastOnce,
                false,
            ))
            .await
            .unwrap();
        assert_eq!(rc, ReasonCode::Success);
    }
    p.publish(publish("status", "up", QoS::AtLeastOnce, true))
        .await
        .unwrap();
    server.shutdown().await;

    let server = start_with(config.clone()).await;
    let r = server
        .recovered()
        .expect("persistence is on")
        .report
        .clone();
    assert_eq!(r.sessions, 2, "dur-sub and dur-pub: {r:?}");
    assert_eq!(r.queued, 50, "{r:?}");
    assert_eq!(r.retained, 1, "{r:?}");

    let (mut sub, ack) = Client::connect(options(&server, "dur-sub", false))
        .await
        .unwrap();
    assert!(ack.session_present, "the session survived the restart");
    for i in 0..50 {
        let got = tokio::time::timeout(WAIT, sub.recv())
            .await
            .unwrap()
            .unwrap();
        let Packet::Publish(m) = got else {
            panic!("expected a PUBLISH, got {got:?}")
        };
        assert_eq!(m.payload, format!("{i}").as_bytes(), "in order, none lost");
        sub.queue_ack(&m).unwrap();
        sub.flush().await.unwrap();
    }
    let (mut late, _) = Client::connect(options(&server, "late", true))
        .await
        .unwrap();
    late.subscribe(vec![("status".into(), qos1)], Properties::default())
        .await
        .ok();
    let got = tokio::time::timeout(WAIT, late.recv())
        .await
        .unwrap()
        .unwrap();
    match got {
        Packet::Publish(m) => {
            assert!(m.retain);
            assert_eq!(&m.payload[..], b"up");
            late.queue_ack(&m).unwrap();
        }
        other => panic!("expected the retained message, got {other:?}"),
    }
    late.disconnect().await.unwrap();
    sub.disconnect().await.unwrap();
    eventually("both acknowledged and gone", || async {
        metric(&server, "ferrymq_connections").await == 0
    })
    .await;
    server.shutdown().await;

    // Everything was acknowledged: a third start finds the session with nothing queued.
    let server = start_with(config).await;
    let r = &server.recovered().unwrap().report;
    assert_eq!((r.sessions, r.queued, r.retained), (3, 0, 1), "{r:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn disk_use_stays_bounded_while_ten_times_the_retention_is_written() {
    let mut config = test_config();
    config.storage.segment_bytes = 64 * 1024;
    config.storage.compact_after_bytes = 256 * 1024;
    let log_dir = config.data_dir.join("log");
    let server = start_with(config.clone()).await;
    // A durable subscriber that acknowledges everything, so acked data can be reclaimed.
    let (mut sub, _) = Client::connect(options(&server, "disk-sub", true))
        .await
        .unwrap();
    let qos1 = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        ..Default::default()
    };
    sub.subscribe(vec![("disk/#".into(), qos1)], Properties::default())
        .await
        .unwrap();
    let reader = tokio::spawn(async move {
        let mut n = 0u64;
        while n < 3000 {
            match tokio::time::timeout(WAIT, sub.recv()).await {
                Ok(Ok(Packet::Publish(m))) => {
                    sub.queue_ack(&m).unwrap();
                    sub.flush().await.unwrap();
                    n += 1;
                }
                Ok(Ok(_)) => {}
                _ => break,
            }
        }
        n
    });
    let (mut p, _) = Client::connect(options(&server, "disk-pub", true))
        .await
        .unwrap();
    let payload = Bytes::from(vec![b'x'; 1000]);
    let mut peak = 0;
    // 3,000 × ~1.1 KB of journal ≈ 3.3 MB, over 12× the 256 KiB retention.
    for i in 0..3000 {
        p.publish(publish("disk/t", payload.clone(), QoS::AtLeastOnce, false))
            .await
            .unwrap();
        if i % 100 == 0 {
            peak = peak.max(dir_bytes(&log_dir));
        }
    }
    assert_eq!(reader.await.unwrap(), 3000, "every message delivered");
    eventually("the log is compacted", || async {
        dir_bytes(&log_dir) < 1024 * 1024
    })
    .await;
    // Live state is tiny; what may remain is one checkpoint interval (2 × 256 KiB at most
    // once checkpoints are small), plus the active and a sealed segment.
    assert!(
        peak < 2 * 1024 * 1024,
        "disk use peaked at {peak} bytes for 3.3 MB written"
    );
    let metric_bytes = metric(&server, "ferrymq_storage_disk_bytes").await;
    assert!(
        metric_bytes > 0 && metric_bytes < 1024 * 1024,
        "{metric_bytes}"
    );
    server.shutdown().await;
    // And the compacted log still restores the durable sessions.
    let server = start_with(config).await;
    let r = &server.recovered().unwrap().report;
    assert_eq!((r.sessions, r.subscriptions, r.queued), (2, 1, 0), "{r:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_second_server_on_the_same_data_dir_is_refused() {
    let config = test_config();
    let server = start_with(config.clone()).await;
    let err = match ferrymq_server::Server::start(config).await {
        Ok(_) => panic!("two servers on one data_dir"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("in use by another ferrymq"), "{err}");
    server.shutdown().await;
    tokio::time::sleep(Duration::from_millis(10)).await;
}
