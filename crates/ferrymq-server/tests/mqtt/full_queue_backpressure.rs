//! Flood under `mqtt.queue_full = backpressure`: 20 publishers at full QoS 1 speed into one
//! slow persistent subscriber (a small queue, acknowledging about one message per
//! millisecond). Proves:
//! - nothing acknowledged is lost: every PUBACKed message reaches the subscriber;
//! - publishers slow to the subscriber's pace: they are never told more messages are stored
//!   than the queue limit (plus the subscriber's window) ahead of what it consumed, and their
//!   acknowledgement rate matches its consumption rate;
//! - the queue passes its limit by at most the publishers' unacknowledged windows (without
//!   the router pausing held publishers' input, each keeps sending up to its window);
//! - a paced 1,000 msg/s QoS 1 pair on another topic keeps its latency beside the flood.
//!
//! Run with `--nocapture` to see the measured numbers.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

use crate::common::*;

const PUBLISHERS: usize = 20;
const PER_PUBLISHER: usize = 250;
const TOTAL: usize = PUBLISHERS * PER_PUBLISHER;
/// `mqtt.max_queued_messages`.
const LIMIT: u64 = 200;
/// `mqtt.max_inflight`: the subscriber's window.
const WINDOW: u64 = 10;
/// Each publisher's unacknowledged window (rumqttc's default).
const PUB_INFLIGHT: u16 = 100;
const SIDE_MESSAGES: usize = 2_000;
/// The whole test must finish in this time.
const DEADLINE: Duration = Duration::from_secs(90);

/// Held by each flood test for its whole run: two floods at once on a 2-core machine would
/// measure each other (the side pair's latency above all).
pub(crate) static ONE_FLOOD_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Counters shared by the clients.
#[derive(Default)]
pub(crate) struct Progress {
    /// PUBACKs received by the flood publishers.
    acked: AtomicU64,
    /// Flood messages the subscriber consumed (acknowledged).
    pub(crate) consumed: AtomicU64,
    /// Most `acked - consumed` seen at any PUBACK.
    max_ahead: AtomicU64,
}

/// A flood publisher: sends its messages as fast as its window allows, counts its PUBACKs.
async fn publisher(mut o: MqttOptions, i: usize, progress: Arc<Progress>) {
    o.set_inflight(PUB_INFLIGHT);
    let (client, mut ev) = AsyncClient::new(o, PER_PUBLISHER + 10);
    let (done_tx, mut done) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut mine = 0;
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    mine += 1;
                    let acked = progress.acked.fetch_add(1, SeqCst) + 1;
                    let ahead = acked.saturating_sub(progress.consumed.load(SeqCst));
                    progress.max_ahead.fetch_max(ahead, SeqCst);
                    if mine == PER_PUBLISHER {
                        let _ = done_tx.send(());
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("flood publisher {i}: {e}"),
            }
        }
    });
    for j in 0..PER_PUBLISHER {
        client
            .publish("flood/data", QoS::AtLeastOnce, false, format!("{i}/{j}"))
            .await
            .unwrap();
    }
    tokio::time::timeout(DEADLINE, done.recv())
        .await
        .expect("every publish acknowledged in time");
}

/// The slow subscriber to `flood/#`: acknowledges one message per millisecond.
pub(crate) async fn slow_subscriber(
    opts: MqttOptions,
    progress: Arc<Progress>,
    got: Arc<Mutex<HashSet<String>>>,
) -> AsyncClient {
    let (client, mut ev) = AsyncClient::new(opts, 1000);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (ctx, mut connected) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(p);
                }
                Ok(Event::Incoming(Packet::ConnAck(_) | Packet::SubAck(_))) => {
                    let _ = ctx.send(());
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    tokio::time::timeout(WAIT, connected.recv())
        .await
        .expect("CONNACK in time");
    client.subscribe("flood/#", QoS::AtLeastOnce).await.unwrap();
    tokio::time::timeout(WAIT, connected.recv())
        .await
        .expect("SUBACK in time");
    let acker = client.clone();
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let mut n = 0u32;
        while let Some(p) = rx.recv().await {
            n += 1;
            tokio::time::sleep_until(start + Duration::from_millis(u64::from(n))).await;
            got.lock()
                .unwrap()
                .insert(String::from_utf8(p.payload.to_vec()).unwrap());
            progress.consumed.fetch_add(1, SeqCst);
            if acker.ack(&p).await.is_err() {
                break;
            }
        }
    });
    client
}

/// The side pair: 1,000 msg/s QoS 1 on its own topic; returns each message's latency.
async fn side_pair(server: &ferrymq_server::Server) -> Vec<Duration> {
    let epoch = Instant::now();
    let mut sub = v4(v4_options(server, "side-sub")).await;
    sub.subscribe("side/t", QoS::AtLeastOnce).await;
    let p = v4(v4_options(server, "side-pub")).await;
    let sender = tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        for k in 0..SIDE_MESSAGES {
            tokio::time::sleep_until(start + Duration::from_millis(k as u64)).await;
            let sent = epoch.elapsed().as_micros() as u64;
            p.client
                .publish(
                    "side/t",
                    QoS::AtLeastOnce,
                    false,
                    sent.to_be_bytes().to_vec(),
                )
                .await
                .unwrap();
        }
        p
    });
    let mut latencies = Vec::with_capacity(SIDE_MESSAGES);
    for _ in 0..SIDE_MESSAGES {
        let g = next(&mut sub.rx).await;
        let sent = u64::from_be_bytes(g.payload[..8].try_into().unwrap());
        let now = epoch.elapsed().as_micros() as u64;
        latencies.push(Duration::from_micros(now.saturating_sub(sent)));
    }
    let _ = sender.await;
    latencies
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_slow_to_a_slow_subscriber_and_lose_nothing_acknowledged() {
    let _alone = ONE_FLOOD_AT_A_TIME.lock().await;
    let mut config = test_config();
    config.mqtt.max_queued_messages = LIMIT as usize;
    config.mqtt.max_inflight = WINDOW as u16;
    let server = start_with(config).await;
    let progress = Arc::new(Progress::default());
    let got = Arc::new(Mutex::new(HashSet::new()));
    let mut so = v4_options(&server, "slow-sub");
    so.set_clean_session(false);
    so.set_manual_acks(true);
    let _sub = slow_subscriber(so, progress.clone(), got.clone()).await;

    let started = Instant::now();
    let flood: Vec<_> = (0..PUBLISHERS)
        .map(|i| {
            let o = v4_options(&server, &format!("flood-pub-{i}"));
            tokio::spawn(publisher(o, i, progress.clone()))
        })
        .collect();
    let flood = async {
        for p in flood {
            p.await.expect("flood publisher");
        }
    };

    // Measure the rates between 1,000 and 4,000 consumed (the queue is full by then), and
    // run the side pair while the flood is at its height.
    let watch = async {
        let mut marks = Vec::new();
        for target in [1_000u64, 4_000] {
            while progress.consumed.load(SeqCst) < target {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            marks.push((Instant::now(), progress.acked.load(SeqCst), target));
        }
        marks
    };
    let side = async {
        while progress.consumed.load(SeqCst) < 300 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        side_pair(&server).await
    };
    let ((), marks, mut latencies) =
        tokio::time::timeout(DEADLINE, async { tokio::join!(flood, watch, side) })
            .await
            .expect("the flood finishes in time");
    let acked_in = started.elapsed();

    // Every acknowledged message reaches the subscriber.
    eventually("the subscriber consumed everything", || async {
        progress.consumed.load(SeqCst) >= TOTAL as u64
    })
    .await;
    let distinct = got.lock().unwrap().len();
    assert_eq!(distinct, TOTAL, "acknowledged messages lost");
    let consumed = progress.consumed.load(SeqCst);

    let ((t1, a1, c1), (t2, a2, c2)) = (marks[0], marks[1]);
    let secs = (t2 - t1).as_secs_f64();
    let ack_rate = (a2 - a1) as f64 / secs;
    let consume_rate = (c2 - c1) as f64 / secs;
    let max_ahead = progress.max_ahead.load(SeqCst);
    let high_water = metric(&server, "ferrymq_queued_messages_high_water").await;
    let held = metric(&server, "ferrymq_acks_held_total").await;
    latencies.sort_unstable();
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    eprintln!(
        "flood: {TOTAL} acked in {acked_in:?}; consumed {consumed} ({} duplicates); \
         ack rate {ack_rate:.0}/s vs consume rate {consume_rate:.0}/s; \
         acked ahead of consumed at most {max_ahead}; queue high water {high_water} \
         (limit {LIMIT}); {held} acks held; side pair p50 {p50:?} p99 {p99:?} max {:?}",
        consumed - distinct as u64,
        latencies[latencies.len() - 1]
    );

    // Publishers were held: they are never told more is stored than the queue (within its
    // limit) and the subscriber's window hold, beyond what it consumed. The slack covers
    // PUBACKs and deliveries in transit while the counters are read.
    assert!(held > 0, "no acknowledgement was held");
    assert!(
        max_ahead <= LIMIT + 2 * WINDOW + 20,
        "publishers were acknowledged {max_ahead} messages ahead of the subscriber"
    );
    let ratio = ack_rate / consume_rate;
    assert!(
        (0.8..=1.2).contains(&ratio),
        "ack rate {ack_rate:.0}/s does not follow consume rate {consume_rate:.0}/s"
    );
    // The router stops running a publisher's input at the PUBLISH whose ack is held, so
    // each publisher puts at most one message past the limit (its window would allow
    // PUB_INFLIGHT).
    assert!(
        high_water <= LIMIT + PUBLISHERS as u64,
        "queue reached {high_water}: publishers were not paused at their held ack"
    );
    let refused = "ferrymq_publishes_refused_total{reason=\"queue_full\"}";
    assert_eq!(metric(&server, refused).await, 0);
    let dropped = "ferrymq_messages_dropped_total{reason=\"queue_full\"}";
    assert_eq!(metric(&server, dropped).await, 0);
    assert!(
        p99 < Duration::from_millis(100),
        "side pair p99 {p99:?} beside the flood"
    );
}
