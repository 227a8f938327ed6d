//! The durable work-queue scenario (issue 11): publishers send QoS 1 messages to topics a
//! queue's filter matches, consumers lease them from `$queue/{name}` and ack each one.
//!
//! Every message goes to one consumer, so the consumers share one bitset per publisher
//! (atomic `fetch_or`): distinct, duplicate and missing messages are exact across consumers.
//! The rate is end to end: messages acked (distinct) per second, from the moment publishers
//! start to the last ack. With `nack_once`, a delivery whose `x-attempt` is 1 is nacked (an
//! MQTT 5 PUBACK with 0x80) and only the redelivery is acked: the nack path.
//!
//! The queue is durable, so a message left over from an earlier run (one that timed out, on
//! a broker that kept its data) can arrive here: each run publishes under its own topic
//! level, and a consumer acks what is not its run's without counting it (`stale`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrymq_client::Client;
use ferrymq_mqtt::{
    Packet, Properties, ProtocolVersion, PubResp, Publish, QoS, ReasonCode, Subscribe,
    SubscriptionOptions,
};
use hdrhistogram::Histogram;
use tokio::sync::Barrier;

use super::load::{self, clock, Progress, STAMP};
use super::report::{Latency, QueueStats, Report};
use super::Target;

pub struct QueuePlan {
    pub publishers: usize,
    pub consumers: usize,
    pub payload: usize,
    /// Per publisher.
    pub messages: u64,
    /// Unacknowledged publishes per publisher.
    pub inflight: usize,
    /// Each consumer's receive maximum: how many leases it may hold.
    pub receive_maximum: u16,
    pub queue: String,
    /// Publishers send to `{topic}/{run}/{publisher}`; the queue's filter must match it.
    pub topic: String,
    pub nack_once: bool,
    pub mode: Mode,
}

/// Publish and consume in one run, or only one half (a backlog filled by one run and
/// drained by another, with the broker restarted in between).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Both,
    FillOnly,
    Drain,
}

/// The bitsets of what was acked, one per publisher, shared by every consumer.
struct Seen {
    words: Vec<Vec<AtomicU64>>,
}

impl Seen {
    fn new(publishers: usize, messages: u64) -> Seen {
        let n = (messages as usize).div_ceil(64);
        Seen {
            words: (0..publishers)
                .map(|_| (0..n).map(|_| AtomicU64::new(0)).collect())
                .collect(),
        }
    }

    /// Marks (publisher, seq) acked; true the first time.
    fn mark(&self, publisher: usize, seq: u64) -> bool {
        let (w, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        self.words[publisher][w].fetch_or(bit, Relaxed) & bit == 0
    }
}

/// What one consumer did.
#[derive(Default)]
struct ConsumerTally {
    acked_distinct: u64,
    duplicates: u64,
    reordered: u64,
    nacked: u64,
    redelivered: u64,
    stale: u64,
    max_attempt: u32,
}

pub async fn run(t: &Target, plan: QueuePlan) -> anyhow::Result<Report> {
    if plan.nack_once && t.version != ProtocolVersion::V5 {
        anyhow::bail!("--nack-once needs MQTT 5 (a PUBACK with a reason code)");
    }
    let plan = Arc::new(plan);
    let progress = Arc::new(Progress::new());
    let run_id = format!("{:x}", clock() ^ u64::from(std::process::id()));
    let run_topic = format!("{}/{run_id}", plan.topic);
    // Draining takes what any earlier run published under the topic.
    let accept = match plan.mode {
        Mode::Drain => plan.topic.clone(),
        _ => run_topic.clone(),
    };
    let publishers_now = match plan.mode {
        Mode::Drain => 0,
        _ => plan.publishers,
    };
    let seen = Arc::new(Seen::new(plan.publishers, plan.messages));
    let ready = Arc::new(Barrier::new(plan.consumers + publishers_now + 1));
    let flow = load::Plan {
        publishers: plan.publishers,
        subscribers: plan.consumers,
        qos: QoS::AtLeastOnce,
        payload: plan.payload,
        messages: plan.messages,
        inflight: plan.inflight,
        rate: None,
        burst: false,
    };
    let flow = Arc::new(flow);

    let mut consumers = Vec::new();
    for c in 0..plan.consumers {
        // Subscribed here, before any task waits at the barrier: a refusal (or silence) ends
        // the run with its reason instead of leaving the others waiting.
        let mut conn =
            open_consumer(t, format!("qbench-{run_id}-c{c}"), plan.receive_maximum).await?;
        tokio::time::timeout(t.timeout, subscribe(&mut conn, &plan.queue))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "no SUBACK for $queue/{} within {:?}: {}",
                    plan.queue,
                    t.timeout,
                    MISSING_QUEUE
                )
            })??;
        let (plan, progress, ready, seen, run_topic) = (
            plan.clone(),
            progress.clone(),
            ready.clone(),
            seen.clone(),
            accept.clone(),
        );
        consumers.push(tokio::spawn(async move {
            consumer(conn, &plan, &run_topic, &progress, &ready, &seen).await
        }));
    }
    let mut pubs = Vec::new();
    for p in 0..publishers_now {
        let conn = load::open(t, format!("qbench-{run_id}-p{p}"), 60, false).await?;
        let (flow, progress, ready) = (flow.clone(), progress.clone(), ready.clone());
        let topic = format!("{run_topic}/{p}");
        pubs.push(tokio::spawn(async move {
            load::publisher(conn, p as u32, topic, &flow, &progress, &ready).await
        }));
    }
    ready.wait().await;
    let started = Instant::now();
    let expected_total = plan.messages * plan.publishers as u64;
    let mut published = 0;
    let (elapsed, timed_out) = if plan.mode == Mode::FillOnly {
        // Done when every publish is acknowledged (stored in the queue).
        let mut timed_out = false;
        for h in pubs.drain(..) {
            match tokio::time::timeout(t.timeout, h).await {
                Ok(Ok(Ok(n))) => published += n,
                Ok(Ok(Err(e))) => progress.error(format!("publisher: {e}")),
                Ok(Err(_)) => {}
                Err(_) => timed_out = true,
            }
        }
        (started.elapsed(), timed_out)
    } else if plan.mode == Mode::Drain {
        // No publishers to say the rest is not coming: a pause (a checkpoint of a large
        // backlog stalls the broker for seconds) is not the end. Until all, or the timeout.
        let deadline = started + t.timeout;
        let mut timed_out = false;
        while progress.received.load(Relaxed) < expected_total && !progress.stop.load(Relaxed) {
            if Instant::now() >= deadline {
                timed_out = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (started.elapsed(), timed_out)
    } else {
        progress
            .wait_for(expected_total, &pubs, started, t.timeout)
            .await
    };
    for h in pubs {
        match tokio::time::timeout(Duration::from_secs(5), h).await {
            Ok(Ok(Ok(n))) => published += n,
            Ok(Ok(Err(e))) => progress.error(format!("publisher: {e}")),
            _ => {}
        }
    }
    if plan.mode == Mode::Drain {
        // Nothing published now: what was expected is what the fill left.
        published = expected_total;
    }
    let mut tally = ConsumerTally::default();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for h in consumers {
        match tokio::time::timeout(Duration::from_secs(5), h).await {
            Ok(Ok(Ok((t, h)))) => {
                tally.acked_distinct += t.acked_distinct;
                tally.duplicates += t.duplicates;
                tally.reordered += t.reordered;
                tally.nacked += t.nacked;
                tally.redelivered += t.redelivered;
                tally.stale += t.stale;
                tally.max_attempt = tally.max_attempt.max(t.max_attempt);
                let _ = hist.add(&h);
            }
            Ok(Ok(Err(e))) => progress.error(format!("consumer: {e}")),
            _ => {}
        }
    }
    let secs = elapsed.as_secs_f64().max(1e-9);
    let latency_us = (!hist.is_empty()).then(|| Latency {
        p50: hist.value_at_quantile(0.5),
        p90: hist.value_at_quantile(0.9),
        p99: hist.value_at_quantile(0.99),
        p999: hist.value_at_quantile(0.999),
        max: hist.max(),
    });
    Ok(Report {
        scenario: if plan.nack_once {
            "queue-nack-once".into()
        } else {
            "queue".into()
        },
        publishers: plan.publishers,
        subscribers: plan.consumers,
        qos: 1,
        payload: plan.payload,
        published,
        expected: published,
        received: match plan.mode {
            Mode::FillOnly => published,
            _ => tally.acked_distinct,
        },
        lost: match plan.mode {
            Mode::FillOnly => expected_total.saturating_sub(published),
            _ => published.saturating_sub(tally.acked_distinct),
        },
        duplicates: tally.duplicates,
        reordered: tally.reordered,
        elapsed_secs: secs,
        deliveries_per_sec: match plan.mode {
            Mode::FillOnly => published as f64 / secs,
            _ => tally.acked_distinct as f64 / secs,
        },
        latency_us,
        queue: Some(QueueStats {
            queue: plan.queue.clone(),
            receive_maximum: plan.receive_maximum,
            nack_once: plan.nack_once,
            nacked: tally.nacked,
            redelivered: tally.redelivered,
            stale: tally.stale,
            max_attempt: tally.max_attempt,
        }),
        protocol_errors: progress.errors(),
        timed_out,
        ..Default::default()
    })
}

/// A consumer's connection: a clean session (the queue, not the session, holds its messages)
/// whose receive maximum bounds its leases.
async fn open_consumer(t: &Target, id: String, receive_maximum: u16) -> anyhow::Result<Client> {
    let mut o = t.options(id);
    o.keep_alive = 60;
    if t.version == ProtocolVersion::V5 {
        o.properties.receive_maximum = Some(receive_maximum.max(1));
    }
    let (client, _) = Client::connect(o).await?;
    Ok(client)
}

/// What to check when a broker refuses `$queue/NAME`.
const MISSING_QUEUE: &str =
    "is the broker started with that [[queue]]? (see `ferrymq bench queue --help`)";

/// Subscribes a consumer to `$queue/{queue}` and waits for the SUBACK.
async fn subscribe(c: &mut Client, queue: &str) -> anyhow::Result<()> {
    let filter = format!("$queue/{queue}");
    c.queue(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(
            filter.clone(),
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..Default::default()
            },
        )],
        properties: Properties::default(),
    }))?;
    c.flush().await?;
    match c.recv().await? {
        Packet::SubAck(a) if a.reasons.iter().all(|r| !r.is_error()) => Ok(()),
        Packet::SubAck(a) => {
            anyhow::bail!(
                "subscribing to {filter} was refused with {:?}: {MISSING_QUEUE}",
                a.reasons
            )
        }
        other => anyhow::bail!("{filter}: the broker answered {}", other.name()),
    }
}

async fn consumer(
    mut c: Client,
    plan: &QueuePlan,
    run_topic: &str,
    progress: &Progress,
    ready: &Barrier,
    seen: &Seen,
) -> anyhow::Result<(ConsumerTally, Histogram<u64>)> {
    ready.wait().await;
    let prefix = format!("{run_topic}/");
    let mut highest: Vec<Option<u64>> = vec![None; plan.publishers];
    let mut tally = ConsumerTally::default();
    // Microseconds, up to 60 s: a queue's backlog can hold a message for seconds.
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let expected = plan.messages * plan.publishers as u64;
    while progress.received.load(Relaxed) < expected && !progress.stop.load(Relaxed) {
        tokio::select! {
            r = c.fill() => r?,
            _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
        }
        let before = tally.acked_distinct;
        while let Some(p) = c.try_recv()? {
            let publish = match p {
                Packet::Publish(p) => p,
                other => anyhow::bail!("consumer got unexpected {}", other.name()),
            };
            let Some(id) = publish.packet_id else {
                anyhow::bail!("a queue delivery at QoS 0 (no packet id)");
            };
            let attempt = attempt_of(&publish)?;
            if plan.nack_once && attempt.is_none() {
                anyhow::bail!("--nack-once: a delivery without an x-attempt user property");
            }
            if let Some(a) = attempt {
                tally.max_attempt = tally.max_attempt.max(a);
                if a > 1 {
                    tally.redelivered += 1;
                }
            }
            if plan.nack_once && attempt == Some(1) {
                c.queue(&Packet::PubAck(PubResp::new(
                    id,
                    ReasonCode::UnspecifiedError,
                )))?;
                tally.nacked += 1;
                continue;
            }
            c.queue(&Packet::PubAck(PubResp::new(id, ReasonCode::Success)))?;
            let Some(publisher) = publish.topic.strip_prefix(&prefix) else {
                tally.stale += 1;
                continue;
            };
            // Draining: `{run}/{publisher}` under the topic, whichever run filled it.
            let publisher = match plan.mode {
                Mode::Drain => publisher.rsplit('/').next().unwrap_or(publisher),
                _ => publisher,
            };
            let (pid, seq, sent) = stamp(&publish.payload)?;
            if publisher.parse::<usize>().ok() != Some(pid)
                || pid >= plan.publishers
                || seq >= plan.messages
            {
                anyhow::bail!(
                    "stamp out of range on {}: publisher {pid} sequence {seq}",
                    publish.topic
                );
            }
            if !seen.mark(pid, seq) {
                tally.duplicates += 1;
                continue;
            }
            tally.acked_distinct += 1;
            if highest[pid].is_some_and(|h| seq < h) {
                tally.reordered += 1;
            }
            highest[pid] = Some(highest[pid].map_or(seq, |h| h.max(seq)));
            let _ = hist.record((clock().saturating_sub(sent) / 1000).max(1));
        }
        c.flush().await?;
        let got = tally.acked_distinct - before;
        if got > 0 {
            progress.received.fetch_add(got, Relaxed);
        }
    }
    Ok((tally, hist))
}

/// The delivery's `x-attempt` user property (1 on the first delivery), if it has one.
fn attempt_of(p: &Publish) -> anyhow::Result<Option<u32>> {
    match p
        .properties
        .user_properties
        .iter()
        .find(|(k, _)| k == "x-attempt")
    {
        None => Ok(None),
        Some((_, v)) => v
            .parse()
            .map(Some)
            .map_err(|_| anyhow::anyhow!("x-attempt {v:?} is not a number")),
    }
}

/// (publisher, sequence, send time) from the start of a payload.
fn stamp(b: &[u8]) -> anyhow::Result<(usize, u64, u64)> {
    if b.len() < STAMP {
        anyhow::bail!("payload of {} bytes has no stamp", b.len());
    }
    let pid = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let seq = u64::from_be_bytes(b[4..12].try_into().unwrap_or_default());
    let sent = u64::from_be_bytes(b[12..20].try_into().unwrap_or_default());
    Ok((pid, seq, sent))
}
