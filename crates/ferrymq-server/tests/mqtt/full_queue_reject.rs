//! Flood under `mqtt.queue_full = reject`: 10 MQTT 5.0 publishers at full QoS 1 speed into
//! one slow persistent subscriber with a small queue. Once its queue is full the publishers
//! get PUBACK 0x97 Quota exceeded at once (nobody is held), and every message acknowledged
//! with success reaches the subscriber, while none of the refused ones does. (A 3.1.1
//! publisher has its connection closed instead: `queued_messages_limit.rs`.)

use std::collections::HashSet;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use tokio::sync::mpsc;

use crate::common::*;
use crate::full_queue_backpressure::{slow_subscriber, Progress, ONE_FLOOD_AT_A_TIME};

const PUBLISHERS: usize = 10;
const PER_PUBLISHER: usize = 200;

/// Publishes `PER_PUBLISHER` messages; returns the payloads acknowledged with success and
/// how many were refused with 0x97. PUBACKs come in publish order (MQTT-4.6.0-2), so the
/// k-th PUBACK answers the k-th publish.
async fn publisher(mut o: rumqttc::v5::MqttOptions, i: usize) -> (Vec<String>, usize) {
    o.set_outgoing_inflight_upper_limit(100);
    let (client, mut ev) = AsyncClient::new(o, PER_PUBLISHER + 10);
    let (tx, mut acks) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::PubAck(a))) => {
                    let _ = tx.send(a.reason);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    for j in 0..PER_PUBLISHER {
        client
            .publish("flood/data", QoS::AtLeastOnce, false, format!("{i}/{j}"))
            .await
            .unwrap();
    }
    let (mut stored, mut refused) = (Vec::new(), 0);
    for j in 0..PER_PUBLISHER {
        let reason = tokio::time::timeout(WAIT, acks.recv())
            .await
            .expect("PUBACK in time")
            .expect("publisher connected");
        match reason {
            PubAckReason::Success => stored.push(format!("{i}/{j}")),
            PubAckReason::QuotaExceeded => refused += 1,
            other => panic!("unexpected PUBACK reason {other:?}"),
        }
    }
    (stored, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_get_0x97_and_every_stored_message_arrives() {
    let _alone = ONE_FLOOD_AT_A_TIME.lock().await;
    let mut config = test_config();
    config.mqtt.max_queued_messages = 200;
    config.mqtt.max_inflight = 10;
    config.mqtt.queue_full = ferrymq_server::config::QueueFull::Reject;
    let server = start_with(config).await;
    let progress = Arc::new(Progress::default());
    let got = Arc::new(Mutex::new(HashSet::new()));
    let mut so = v4_options(&server, "reject-sub");
    so.set_clean_session(false);
    so.set_manual_acks(true);
    let _sub = slow_subscriber(so, progress.clone(), got.clone()).await;

    let tasks: Vec<_> = (0..PUBLISHERS)
        .map(|i| {
            let o = v5_options(&server, &format!("reject-pub-{i}"));
            tokio::spawn(publisher(o, i))
        })
        .collect();
    let (mut stored, mut refused) = (HashSet::new(), 0);
    for t in tasks {
        let (s, r) = t.await.unwrap();
        stored.extend(s);
        refused += r;
    }
    eprintln!(
        "reject flood: {} stored, {refused} refused with 0x97",
        stored.len()
    );
    assert!(refused > 0, "no publish was refused");
    eventually("the subscriber consumed every stored message", || async {
        progress.consumed.load(SeqCst) >= stored.len() as u64
    })
    .await;
    // Nothing else arrives: the refused messages were not queued for it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(*got.lock().unwrap(), stored);
    let counted = "ferrymq_publishes_refused_total{reason=\"queue_full\"}";
    assert_eq!(metric(&server, counted).await, refused as u64);
    assert_eq!(metric(&server, "ferrymq_acks_held_total").await, 0);
}
