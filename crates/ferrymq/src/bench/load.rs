//! The load itself: raw MQTT through `ferrymq-client` (our codec, packets exposed, no
//! per-message tasks), so the generator costs little next to the broker.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use ferrymq_client::Client;
use ferrymq_mqtt::{
    Packet, Properties, PubResp, Publish, QoS, ReasonCode, Subscribe, SubscriptionOptions,
};
use hdrhistogram::Histogram;
use tokio::sync::{Barrier, Notify};

use super::report::{Connections, Latency, Report};
use super::{ConnArgs, Target};

/// Bytes of the stamp at the start of every payload: publisher (4), sequence (8), send time (8).
pub const STAMP: usize = 20;
const TOPIC_ROOT: &str = "ferrymq-bench";

pub struct Plan {
    pub publishers: usize,
    pub subscribers: usize,
    pub qos: QoS,
    pub payload: usize,
    pub messages: u64,
    pub inflight: usize,
    /// Total messages per second across publishers, when paced.
    pub rate: Option<u64>,
    /// QoS 0 publishers do not wait for subscribers: they write as fast as TCP lets them,
    /// in large writes.
    pub burst: bool,
}

/// Bytes a bursting publisher writes per call.
const BURST_WRITE: usize = 256 * 1024;

pub(super) fn clock() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Shared progress, for QoS 0 pacing and for knowing when to stop.
pub(super) struct Progress {
    pub(super) published: AtomicU64,
    pub(super) received: AtomicU64,
    pub(super) stop: AtomicBool,
    pub(super) wake: Notify,
    pub(super) errors: Mutex<Vec<String>>,
}

impl Progress {
    pub(super) fn new() -> Progress {
        Progress {
            published: AtomicU64::new(0),
            received: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            wake: Notify::new(),
            errors: Mutex::new(Vec::new()),
        }
    }

    pub(super) fn error(&self, e: String) {
        if let Ok(mut v) = self.errors.lock() {
            if v.len() < 10 {
                v.push(e);
            }
        }
        self.stop.store(true, Relaxed);
        self.wake.notify_waiters();
    }

    pub(super) fn errors(&self) -> Vec<String> {
        self.errors.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Waits until `expected` deliveries were counted, or nothing moved for 2 s after every
    /// publisher finished, or `timeout`; then tells every task to stop. Returns the time from
    /// `started` to the last delivery that counted, and whether the run timed out.
    pub(super) async fn wait_for(
        &self,
        expected: u64,
        publishers: &[tokio::task::JoinHandle<anyhow::Result<u64>>],
        started: Instant,
        timeout: Duration,
    ) -> (Duration, bool) {
        let deadline = started + timeout;
        let mut last = (0, Instant::now());
        let mut timed_out = false;
        loop {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let got = self.received.load(Relaxed);
            if got >= expected || self.stop.load(Relaxed) {
                break;
            }
            let all_published = publishers.iter().all(|h| h.is_finished());
            if got != last.0 {
                last = (got, Instant::now());
            } else if all_published && last.1.elapsed() > Duration::from_secs(2) {
                break; // The rest is not coming.
            }
            if Instant::now() >= deadline {
                timed_out = true;
                break;
            }
        }
        let got = self.received.load(Relaxed);
        let elapsed = if last.0 == got && !timed_out && got < expected {
            last.1 - started
        } else {
            started.elapsed()
        };
        self.stop.store(true, Relaxed);
        self.wake.notify_waiters();
        (elapsed, timed_out)
    }
}

/// Opens a bench connection with the project's client: clean start, or a persistent session
/// when `persistent`.
pub(super) async fn open(
    t: &Target,
    id: String,
    keep_alive: u16,
    persistent: bool,
) -> anyhow::Result<Client> {
    let mut o = t.options(id);
    if persistent {
        o.clean_start = false;
        o.properties.session_expiry_interval = Some(300);
    }
    o.keep_alive = keep_alive;
    let (client, _) = Client::connect(o).await?;
    Ok(client)
}

pub async fn run_flow(t: &Target, scenario: &str, plan: Plan) -> anyhow::Result<Report> {
    let plan = Arc::new(plan);
    let progress = Arc::new(Progress::new());
    let run_id = format!("{:x}", clock() ^ u64::from(std::process::id()));
    let topic = format!("{TOPIC_ROOT}/{run_id}");
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let ready = Arc::new(Barrier::new(plan.subscribers + plan.publishers + 1));

    let mut subs = Vec::new();
    for s in 0..plan.subscribers {
        let conn = open(t, format!("bench-{run_id}-s{s}"), 60, t.persistent).await?;
        let (plan, progress, ready, hist) =
            (plan.clone(), progress.clone(), ready.clone(), hist.clone());
        let filter = format!("{topic}/#");
        subs.push(tokio::spawn(async move {
            subscriber(conn, filter, &plan, &progress, &ready, s == 0, &hist).await
        }));
    }
    let mut pubs = Vec::new();
    for p in 0..plan.publishers {
        let conn = open(t, format!("bench-{run_id}-p{p}"), 60, false).await?;
        let (plan, progress, ready) = (plan.clone(), progress.clone(), ready.clone());
        let topic = format!("{topic}/{p}");
        pubs.push(tokio::spawn(async move {
            publisher(conn, p as u32, topic, &plan, &progress, &ready).await
        }));
    }
    ready.wait().await;
    let started = Instant::now();
    let expected_total = plan.messages * plan.publishers as u64 * plan.subscribers as u64;
    let (elapsed, timed_out) = progress
        .wait_for(expected_total, &pubs, started, t.timeout)
        .await;
    let mut published = 0;
    for h in pubs {
        match tokio::time::timeout(Duration::from_secs(5), h).await {
            Ok(Ok(Ok(n))) => published += n,
            Ok(Ok(Err(e))) => progress.error(format!("publisher: {e}")),
            _ => {}
        }
    }
    let mut tally = Tally::default();
    for h in subs {
        match tokio::time::timeout(Duration::from_secs(5), h).await {
            Ok(Ok(Ok(t))) => tally.add(&t),
            Ok(Ok(Err(e))) => progress.error(format!("subscriber: {e}")),
            _ => {}
        }
    }
    let expected = published * plan.subscribers as u64;
    let secs = elapsed.as_secs_f64().max(1e-9);
    let h = hist
        .lock()
        .map_err(|_| anyhow::anyhow!("histogram lock poisoned"))?;
    let latency_us = (plan.rate.is_some() && !h.is_empty()).then(|| Latency {
        p50: h.value_at_quantile(0.5) / 1000,
        p90: h.value_at_quantile(0.9) / 1000,
        p99: h.value_at_quantile(0.99) / 1000,
        p999: h.value_at_quantile(0.999) / 1000,
        max: h.max() / 1000,
    });
    let errors = progress.errors();
    Ok(Report {
        scenario: scenario.into(),
        publishers: plan.publishers,
        subscribers: plan.subscribers,
        qos: plan.qos as u8,
        payload: plan.payload,
        published,
        expected,
        received: tally.unique,
        lost: expected.saturating_sub(tally.unique),
        duplicates: tally.duplicates,
        reordered: tally.reordered,
        elapsed_secs: secs,
        deliveries_per_sec: tally.unique as f64 / secs,
        latency_us,
        protocol_errors: errors,
        timed_out,
        ..Default::default()
    })
}

pub(super) async fn publisher(
    mut c: Client,
    id: u32,
    topic: String,
    plan: &Plan,
    progress: &Progress,
    ready: &Barrier,
) -> anyhow::Result<u64> {
    ready.wait().await;
    let started = Instant::now();
    let per_pub_rate = plan.rate.map(|r| r as f64 / plan.publishers as f64);
    let filler = Bytes::from(vec![b'x'; plan.payload - STAMP]);
    let mut inflight = 0usize;
    let mut acked = 0u64;
    let mut seq = 0u64;
    let mut next_pid: u16 = 1;
    let subs = plan.subscribers as u64;
    while !progress.stop.load(Relaxed) {
        // Send what the window (and the pace) allows.
        while seq < plan.messages && !progress.stop.load(Relaxed) {
            if plan.qos != QoS::AtMostOnce && inflight >= plan.inflight {
                break;
            }
            if plan.qos == QoS::AtMostOnce && plan.rate.is_none() && !plan.burst {
                let ahead = progress.published.load(Relaxed) * subs;
                if ahead > progress.received.load(Relaxed) + (plan.inflight as u64 * subs) {
                    break;
                }
            }
            if let Some(r) = per_pub_rate {
                let due = started + Duration::from_secs_f64(seq as f64 / r);
                if Instant::now() < due {
                    break;
                }
            }
            let mut payload = BytesMut::with_capacity(plan.payload);
            payload.put_u32(id);
            payload.put_u64(seq);
            payload.put_u64(clock());
            payload.extend_from_slice(&filler);
            let packet_id = (plan.qos != QoS::AtMostOnce).then(|| {
                let pid = next_pid;
                next_pid = if pid == u16::MAX { 1 } else { pid + 1 };
                pid
            });
            c.queue(&Packet::Publish(Publish {
                dup: false,
                qos: plan.qos,
                retain: false,
                topic: topic.clone(),
                packet_id,
                properties: Properties::default(),
                payload: payload.freeze(),
            }))?;
            seq += 1;
            if plan.qos == QoS::AtMostOnce {
                progress.published.fetch_add(1, Relaxed);
                acked += 1;
            } else {
                inflight += 1;
            }
            let chunk = if plan.burst { BURST_WRITE } else { 64 * 1024 };
            if c.queued_bytes() >= chunk {
                break;
            }
        }
        c.flush().await?;
        if seq >= plan.messages && inflight == 0 {
            break;
        }
        // Harvest acks; block only when there is nothing else to do.
        let must_wait =
            seq >= plan.messages || (plan.qos != QoS::AtMostOnce && inflight >= plan.inflight);
        if plan.qos == QoS::AtMostOnce {
            if seq < plan.messages {
                if let Some(r) = per_pub_rate {
                    let due = started + Duration::from_secs_f64(seq as f64 / r);
                    tokio::time::sleep_until(due.into()).await;
                } else if plan.burst {
                    // Straight on: only TCP (the flush above) slows a bursting publisher.
                } else {
                    let _ =
                        tokio::time::timeout(Duration::from_millis(5), progress.wake.notified())
                            .await;
                }
            }
            continue;
        }
        if must_wait {
            tokio::select! {
                r = c.fill() => r?,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        } else {
            if !c.try_fill()? {
                if let Some(r) = per_pub_rate {
                    let due = started + Duration::from_secs_f64(seq as f64 / r);
                    tokio::select! {
                        r = c.fill() => r?,
                        _ = tokio::time::sleep_until(due.into()) => {}
                    }
                }
            }
        }
        while let Some(p) = c.try_recv()? {
            match p {
                Packet::PubAck(a) if plan.qos == QoS::AtLeastOnce => {
                    if a.reason.is_error() {
                        anyhow::bail!("PUBACK {:?}", a.reason);
                    }
                    inflight -= 1;
                    acked += 1;
                    progress.published.fetch_add(1, Relaxed);
                }
                Packet::PubRec(r) if plan.qos == QoS::ExactlyOnce => {
                    c.queue(&Packet::PubRel(PubResp::new(
                        r.packet_id,
                        ReasonCode::Success,
                    )))?;
                }
                Packet::PubComp(_) if plan.qos == QoS::ExactlyOnce => {
                    inflight -= 1;
                    acked += 1;
                    progress.published.fetch_add(1, Relaxed);
                }
                other => anyhow::bail!("publisher got unexpected {}", other.name()),
            }
        }
    }
    Ok(acked)
}

/// What one subscriber saw.
#[derive(Default)]
struct Tally {
    unique: u64,
    duplicates: u64,
    reordered: u64,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.unique += o.unique;
        self.duplicates += o.duplicates;
        self.reordered += o.reordered;
    }
}

async fn subscriber(
    mut c: Client,
    filter: String,
    plan: &Plan,
    progress: &Progress,
    ready: &Barrier,
    record_latency: bool,
    hist: &Mutex<Histogram<u64>>,
) -> anyhow::Result<Tally> {
    let options = SubscriptionOptions {
        qos: plan.qos,
        ..Default::default()
    };
    c.queue(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(filter, options)],
        properties: Properties::default(),
    }))?;
    c.flush().await?;
    match c.recv().await? {
        Packet::SubAck(a) if a.reasons.iter().all(|r| !r.is_error()) => {}
        other => anyhow::bail!("subscribe refused: {other:?}"),
    }
    ready.wait().await;
    let words = (plan.messages as usize).div_ceil(64);
    let mut seen: Vec<Vec<u64>> = vec![vec![0u64; words]; plan.publishers];
    let mut highest: Vec<Option<u64>> = vec![None; plan.publishers];
    let mut tally = Tally::default();
    let mut local_hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let expected = plan.messages * plan.publishers as u64;
    while tally.unique < expected && !progress.stop.load(Relaxed) {
        tokio::select! {
            r = c.fill() => r?,
            _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
        }
        let before = tally.unique;
        while let Some(p) = c.try_recv()? {
            let publish = match p {
                Packet::Publish(p) => p,
                Packet::PubRel(r) => {
                    c.queue(&Packet::PubComp(PubResp::new(
                        r.packet_id,
                        ReasonCode::Success,
                    )))?;
                    continue;
                }
                other => anyhow::bail!("subscriber got unexpected {}", other.name()),
            };
            match (publish.qos, publish.packet_id) {
                (QoS::AtLeastOnce, Some(id)) => {
                    c.queue(&Packet::PubAck(PubResp::new(id, ReasonCode::Success)))?
                }
                (QoS::ExactlyOnce, Some(id)) => {
                    c.queue(&Packet::PubRec(PubResp::new(id, ReasonCode::Success)))?
                }
                _ => {}
            }
            let b = &publish.payload;
            if b.len() < STAMP {
                anyhow::bail!("payload of {} bytes has no stamp", b.len());
            }
            let pid = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
            let seq = u64::from_be_bytes(b[4..12].try_into().unwrap_or_default());
            let sent = u64::from_be_bytes(b[12..20].try_into().unwrap_or_default());
            if pid >= plan.publishers || seq >= plan.messages {
                anyhow::bail!("stamp out of range: publisher {pid} sequence {seq}");
            }
            let (w, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
            if seen[pid][w] & bit != 0 {
                tally.duplicates += 1;
                continue;
            }
            seen[pid][w] |= bit;
            tally.unique += 1;
            if highest[pid].is_some_and(|h| seq < h) {
                tally.reordered += 1;
            }
            highest[pid] = Some(highest[pid].map_or(seq, |h| h.max(seq)));
            if record_latency {
                let _ = local_hist.record(clock().saturating_sub(sent).max(1));
            }
        }
        c.flush().await?;
        let got = tally.unique - before;
        if got > 0 {
            progress.received.fetch_add(got, Relaxed);
            progress.wake.notify_waiters();
        }
    }
    if record_latency {
        if let Ok(mut h) = hist.lock() {
            let _ = h.add(&local_hist);
        }
    }
    Ok(tally)
}

/// Sends a PINGREQ on every live connection, then waits for each PINGRESP (all in flight at
/// once: 20,000 round trips one by one would take seconds). A connection that errs, answers
/// something else or stays silent for 10 s in all is marked dead.
async fn ping_all(held: &mut [Client], alive: &mut [bool]) {
    for (c, ok) in held.iter_mut().zip(alive.iter_mut()) {
        if *ok {
            *ok = c.queue(&Packet::PingReq).is_ok() && c.flush().await.is_ok();
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for (c, ok) in held.iter_mut().zip(alive.iter_mut()) {
        if *ok {
            let answer = tokio::time::timeout_at(deadline, c.recv()).await;
            *ok = matches!(answer, Ok(Ok(Packet::PingResp)));
        }
    }
}

/// Opens many idle connections and reports the broker's memory per connection.
pub async fn run_connections(t: &Target, a: ConnArgs) -> anyhow::Result<Report> {
    let rss_before = a.broker_pid.and_then(rss_kb);
    let sources: Vec<Option<std::net::IpAddr>> = if a.source_addrs.is_empty() {
        vec![None]
    } else {
        a.source_addrs.iter().copied().map(Some).collect()
    };
    let run_id = format!("{:x}", clock() ^ u64::from(std::process::id()));
    let mut held = Vec::with_capacity(a.connections);
    let mut alive = Vec::with_capacity(a.connections);
    let mut failed = 0;
    let deadline = Instant::now() + t.timeout;
    // Idle clients are silent but for a PINGREQ every half keep alive, from the start: opening
    // tens of thousands can take longer than a keep alive, and a hold longer than 1.5 keep
    // alives must measure live connections, not ones the broker rightly closed.
    let ping_every =
        (a.keep_alive > 0).then(|| Duration::from_millis(u64::from(a.keep_alive) * 500));
    let mut next_ping = ping_every.map(|every| Instant::now() + every);
    // `concurrency` setups in flight; as each ends the next starts.
    let concurrency = a.concurrency.clamp(1, a.connections.max(1));
    let mut setting_up = tokio::task::JoinSet::new();
    let mut started = 0;
    let setup_started = Instant::now();
    let mut last_connack = setup_started;
    let mut timed_out = false;
    let mut errors = Vec::new();
    while held.len() + failed < a.connections {
        while started < a.connections && setting_up.len() < concurrency && !timed_out {
            let mut target = t.clone();
            target.source = sources[started % sources.len()];
            target.persistent = false;
            let id = format!("idle-{run_id}-{started}");
            let ka = a.keep_alive;
            setting_up.spawn(async move { open(&target, id, ka, false).await });
            started += 1;
        }
        let Some(done) = setting_up.join_next().await else {
            break;
        };
        match done {
            Ok(Ok(c)) => {
                held.push(c);
                alive.push(true);
                last_connack = Instant::now();
            }
            Ok(Err(e)) => {
                failed += 1;
                if errors.len() < 3 {
                    errors.push(format!("connection {}: {e}", held.len() + failed));
                }
            }
            Err(_) => failed += 1,
        }
        if let (Some(at), Some(every)) = (next_ping, ping_every) {
            if Instant::now() >= at {
                ping_all(&mut held, &mut alive).await;
                next_ping = Some(Instant::now() + every);
            }
        }
        if Instant::now() > deadline && !timed_out {
            // Count what was never tried; what is in flight ends within its own timeout.
            timed_out = true;
            failed += a.connections - started;
        }
    }
    let setup_secs = (last_connack - setup_started).as_secs_f64();
    let opened = held.len();
    let hold_until = Instant::now() + Duration::from_secs(a.hold);
    loop {
        let now = Instant::now();
        if now >= hold_until {
            break;
        }
        match next_ping {
            Some(at) if at <= now => {
                ping_all(&mut held, &mut alive).await;
                next_ping = ping_every.map(|every| Instant::now() + every);
            }
            Some(at) => tokio::time::sleep(at.min(hold_until) - now).await,
            None => tokio::time::sleep(hold_until - now).await,
        }
    }
    let rss_after = a.broker_pid.and_then(rss_kb);
    // Still alive? Every connection must answer a PINGREQ.
    ping_all(&mut held, &mut alive).await;
    let dead = alive.iter().filter(|a| !**a).count();
    let held_n = held.len() - dead;
    drop(held);
    let per = match (rss_before, rss_after) {
        (Some(b), Some(a)) if held_n > 0 => Some(a.saturating_sub(b) as f64 / held_n as f64),
        _ => None,
    };
    Ok(Report {
        scenario: "connections".into(),
        connections: Some(Connections {
            requested: a.connections,
            held: held_n,
            failed: failed + dead,
            broker_rss_before_kb: rss_before,
            broker_rss_after_kb: rss_after,
            kb_per_connection: per,
            setup_secs,
            connections_per_sec: if setup_secs > 0.0 {
                opened as f64 / setup_secs
            } else {
                0.0
            },
            concurrency,
            errors,
        }),
        ..Default::default()
    })
}

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
