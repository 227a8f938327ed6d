//! Recovery time: a real `ferrymq serve` holding N queued QoS 1 messages for an offline
//! persistent session (and N/10 retained messages) is killed with SIGKILL and restarted; the
//! test reports how long the restart took (the broker's own `took_ms` and until it accepts
//! connections), then drains the session and checks every message came back in order.
//!
//! CI runs it with 20,000 messages. The 1M figure in docs/performance.md comes from
//! `FERRYMQ_RECOVERY_MESSAGES=1000000 cargo test --release -p ferrymq --test recovery -- --nocapture`.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStderr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{free_port, options, scratch_dir, serve, wait_listening};
use ferrymq_client::Client;
use ferrymq_mqtt::{Packet, Properties, Publish, QoS, SubscriptionOptions};

fn start(config: &Path, mqtt: u16, http: u16, data: &Path) -> (Child, ChildStderr) {
    let mut child = serve(config, mqtt, http, data);
    let stderr = child.stderr.take().unwrap();
    (child, stderr)
}

type Checkpoints = Arc<Mutex<Vec<serde_json::Value>>>;

/// Reads the broker's log until the "recovered durable state" line and returns its fields;
/// keeps reading in the background (the broker must never block on a full pipe), collecting
/// the fields of every "checkpoint written" line.
fn recovered_line(stderr: ChildStderr) -> (serde_json::Value, Checkpoints) {
    let mut lines = BufReader::new(stderr).lines();
    let checkpoints: Checkpoints = Arc::default();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let v: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => continue,
        };
        if v["fields"]["message"] == "recovered durable state" {
            let seen = checkpoints.clone();
            std::thread::spawn(move || {
                for line in lines.map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                        if v["fields"]["message"] == "checkpoint written" {
                            seen.lock().unwrap().push(v["fields"].clone());
                        }
                    }
                }
            });
            return (v["fields"].clone(), checkpoints);
        }
    }
    panic!("the broker exited without logging its recovery");
}

/// Publishes `n` QoS 1 messages with up to 1,000 unacknowledged, `retained_every`-th retained
/// on its own topic; returns once all are acknowledged.
async fn publish(addr: &str, n: u64, retained_every: u64) {
    let (mut c, _) = Client::connect(options(addr, "rec-pub", true, Duration::from_secs(30)))
        .await
        .unwrap();
    let (mut sent, mut acked) = (0u64, 0u64);
    while acked < n {
        while sent < n && sent - acked < 1000 {
            let retain = sent % retained_every == 0;
            let topic = if retain {
                format!("rec/retained/{sent}")
            } else {
                "rec/q".to_string()
            };
            let pid = c.next_packet_id();
            c.queue(&Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain,
                topic,
                packet_id: Some(pid),
                properties: Properties::default(),
                payload: Bytes::copy_from_slice(&sent.to_be_bytes()),
            }))
            .unwrap();
            sent += 1;
        }
        c.flush().await.unwrap();
        if let Packet::PubAck(_) = c.recv().await.unwrap() {
            acked += 1;
        }
    }
}

#[test]
fn restart_with_many_queued_messages_is_timed_and_loses_nothing() {
    let n: u64 = std::env::var("FERRYMQ_RECOVERY_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let data = scratch_dir("recovery");
    let config = data.join("ferrymq.toml");
    std::fs::write(
        &config,
        format!(
            "[mqtt]\nmax_queued_messages = {}\n[sys]\ninterval_secs = 0\n\
             [storage]\ncompact_after_bytes = 262144\n",
            n * 2
        ),
    )
    .unwrap();
    let store = data.join("store");
    let (mqtt, http) = (free_port(), free_port());
    let addr = format!("127.0.0.1:{mqtt}");
    let (mut broker, stderr) = start(&config, mqtt, http, &store);
    let (first, checkpoints) = recovered_line(stderr);
    assert_eq!(first["sessions"], 0);
    wait_listening(mqtt, Duration::from_secs(300));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut sub, _) =
            Client::connect(options(&addr, "rec-sub", true, Duration::from_secs(30)))
                .await
                .unwrap();
        let o = SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            ..Default::default()
        };
        sub.subscribe(vec![("rec/q".into(), o)], Properties::default())
            .await
            .unwrap();
        sub.disconnect().await.unwrap();
    });
    let started = Instant::now();
    rt.block_on(publish(&addr, n, 10));
    let publish_secs = started.elapsed().as_secs_f64();

    broker.kill().unwrap(); // SIGKILL: no checkpoint at exit, the whole log is replayed
    broker.wait().unwrap();
    let log_bytes: u64 = std::fs::read_dir(store.join("log"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let restarted = Instant::now();
    let written = checkpoints.lock().unwrap().clone();
    let (mut broker, stderr) = start(&config, mqtt, http, &store);
    let (rec, _) = recovered_line(stderr);
    wait_listening(mqtt, Duration::from_secs(300));
    let up = restarted.elapsed();
    let queued = n - n.div_ceil(10);
    println!(
        "recovery: {n} messages published in {publish_secs:.1} s; log {:.1} MB; restart to \
         listening in {:.0} ms (replay took_ms {}, records {}, queued {}, retained {})",
        log_bytes as f64 / 1e6,
        up.as_secs_f64() * 1000.0,
        rec["took_ms"],
        rec["records"],
        rec["queued"],
        rec["retained"],
    );
    // With a 256 KiB compaction threshold the broker checkpointed while the backlog grew.
    let largest = written
        .iter()
        .max_by_key(|c| c["bytes"].as_u64().unwrap_or(0))
        .cloned()
        .expect("checkpoints were written while publishing");
    println!(
        "recovery: {} checkpoints while publishing; the largest, {:.1} MB, stalled the router \
         {} ms",
        written.len(),
        largest["bytes"].as_u64().unwrap_or(0) as f64 / 1e6,
        largest["took_ms"],
    );
    assert_eq!(rec["queued"], queued);
    assert_eq!(rec["retained"], n.div_ceil(10));

    let drained = rt.block_on(async {
        let (mut sub, ack) =
            Client::connect(options(&addr, "rec-sub", false, Duration::from_secs(30)))
                .await
                .unwrap();
        assert!(ack.session_present);
        let mut last = None;
        let mut got = 0u64;
        while got < queued {
            match sub.recv().await.unwrap() {
                Packet::Publish(p) => {
                    let seq = u64::from_be_bytes(p.payload[..8].try_into().unwrap());
                    assert!(last.is_none_or(|l| seq > l), "in order");
                    last = Some(seq);
                    got += 1;
                    sub.queue_ack(&p).unwrap();
                    if sub.queued_bytes() > 16 * 1024 {
                        sub.flush().await.unwrap();
                    }
                }
                _ => continue,
            }
            if got.is_multiple_of(256) {
                sub.flush().await.unwrap();
            }
        }
        sub.flush().await.unwrap();
        got
    });
    assert_eq!(drained, queued);
    broker.kill().unwrap();
    broker.wait().unwrap();
    let _ = std::fs::remove_dir_all(&data);
}
