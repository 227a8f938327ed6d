//! `ferrymq-peer-bench`: the durable work-queue scenario of `ferrymq bench queue`, run against
//! FerryMQ's peers with their own client crates, for `scripts/compare-peers.sh --queues`.
//!
//! - `nats`: nats-server JetStream as a work queue (async-nats): a stream with WorkQueue
//!   retention and file storage, one durable pull consumer with explicit ack, MaxDeliver and
//!   BackOff; publishers use JetStream publish (each acknowledged by the server), consumers pull
//!   in batches and ack each message.
//! - `rabbitmq`: a quorum queue (lapin): publishers with confirms, consumers with a prefetch
//!   and manual acks.
//!
//! The load and the checks are the same as FerryMQ's: N publishers each keep a window of
//! unacknowledged publishes; every payload starts with (publisher, sequence, send time); the
//! consumers share one bitset per publisher, so lost and duplicated messages are exact. The
//! rate is distinct messages acked per second, from the start of publishing to the last ack.
//! `--nack-once` nacks each message on its first delivery (JetStream `-NAK`, AMQP
//! `basic.nack` with requeue) and acks the redelivery. The report is printed in the JSON
//! shape of `ferrymq bench --json`, so `scripts/compare_report.py` reads both.
//!
//! Not a workspace member (its own `[workspace]`): the main build and CI never compile these
//! client crates.

mod nats;
mod rabbit;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::{BufMut, Bytes, BytesMut};
use clap::Parser;
use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Parser)]
#[command(about = "Durable work-queue load for nats-server JetStream and RabbitMQ")]
struct Cli {
    #[command(subcommand)]
    broker: Broker,
    #[command(flatten)]
    load: Load,
}

#[derive(clap::Subcommand)]
enum Broker {
    /// nats-server with JetStream: a WorkQueue stream and a durable pull consumer.
    Nats {
        /// Server address.
        #[arg(long, default_value = "127.0.0.1:4222")]
        url: String,
    },
    /// RabbitMQ: a quorum queue.
    Rabbitmq {
        /// AMQP URI.
        #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
        url: String,
    },
}

#[derive(clap::Args, Clone)]
pub struct Load {
    /// Publishers, each on its own connection.
    #[arg(short = 'P', long, global = true, default_value_t = 1)]
    pub publishers: usize,
    /// Consumers, each on its own connection.
    #[arg(short = 'C', long, global = true, default_value_t = 1)]
    pub consumers: usize,
    /// Payload size in bytes (at least 20: the stamp).
    #[arg(long, global = true, default_value_t = 64)]
    pub payload: usize,
    /// Messages per publisher (default: 200,000 in total, split over the publishers).
    #[arg(short = 'n', long, global = true)]
    pub messages: Option<u64>,
    /// Unacknowledged publishes per publisher.
    #[arg(long, global = true, default_value_t = 256)]
    pub inflight: usize,
    /// Messages each consumer may hold unacked (JetStream: pull batch, and the consumer's
    /// MaxAckPending is this times the consumers; RabbitMQ: basic.qos prefetch).
    #[arg(long, global = true, default_value_t = 256)]
    pub prefetch: u16,
    /// Nack each message on its first delivery, ack it on the next.
    #[arg(long, global = true)]
    pub nack_once: bool,
    /// Give up after this many seconds.
    #[arg(long, global = true, default_value_t = 60)]
    pub timeout: u64,
    /// A label for the report.
    #[arg(long, global = true, default_value = "peer")]
    pub label: String,
    /// Print one JSON object instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Bytes of the stamp at the start of every payload: publisher (4), sequence (8), send time (8).
pub const STAMP: usize = 20;

pub fn clock() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// The payload of message `seq` of publisher `id`.
pub fn payload(id: u32, seq: u64, size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size.max(STAMP));
    b.put_u32(id);
    b.put_u64(seq);
    b.put_u64(clock());
    b.resize(size.max(STAMP), b'x');
    b.freeze()
}

/// What every task shares: the bitsets of acked messages, counters, and the stop flag.
pub struct Shared {
    pub publishers: usize,
    pub messages: u64,
    seen: Vec<Vec<AtomicU64>>,
    pub acked: AtomicU64,
    pub stop: AtomicBool,
    errors: Mutex<Vec<String>>,
}

impl Shared {
    fn new(publishers: usize, messages: u64) -> Shared {
        let n = (messages as usize).div_ceil(64);
        Shared {
            publishers,
            messages,
            seen: (0..publishers)
                .map(|_| (0..n).map(|_| AtomicU64::new(0)).collect())
                .collect(),
            acked: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            errors: Mutex::new(Vec::new()),
        }
    }

    pub fn expected(&self) -> u64 {
        self.messages * self.publishers as u64
    }

    pub fn done(&self) -> bool {
        self.stop.load(Relaxed) || self.acked.load(Relaxed) >= self.expected()
    }

    pub fn error(&self, e: String) {
        if let Ok(mut v) = self.errors.lock() {
            if v.len() < 10 {
                v.push(e);
            }
        }
        self.stop.store(true, Relaxed);
    }
}

/// What one consumer saw.
pub struct Tally {
    pub acked_distinct: u64,
    pub duplicates: u64,
    pub nacked: u64,
    pub redelivered: u64,
    pub max_attempt: u32,
    pub hist: Histogram<u64>,
}

impl Tally {
    pub fn new() -> anyhow::Result<Tally> {
        Ok(Tally {
            acked_distinct: 0,
            duplicates: 0,
            nacked: 0,
            redelivered: 0,
            max_attempt: 0,
            // Microseconds, up to 60 s: a backlog can hold a message for seconds.
            hist: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        })
    }

    /// Counts an acked payload (after the ack was sent).
    pub fn acked(&mut self, shared: &Shared, payload: &[u8]) -> anyhow::Result<()> {
        if payload.len() < STAMP {
            bail!("payload of {} bytes has no stamp", payload.len());
        }
        let pid = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
        let seq = u64::from_be_bytes(payload[4..12].try_into()?);
        let sent = u64::from_be_bytes(payload[12..20].try_into()?);
        if pid >= shared.publishers || seq >= shared.messages {
            bail!("stamp out of range: publisher {pid} sequence {seq}");
        }
        let (w, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if shared.seen[pid][w].fetch_or(bit, Relaxed) & bit != 0 {
            self.duplicates += 1;
            return Ok(());
        }
        self.acked_distinct += 1;
        shared.acked.fetch_add(1, Relaxed);
        let _ = self
            .hist
            .record((clock().saturating_sub(sent) / 1000).max(1));
        Ok(())
    }

    pub fn attempt(&mut self, attempt: u32) {
        self.max_attempt = self.max_attempt.max(attempt);
        if attempt > 1 {
            self.redelivered += 1;
        }
    }
}

#[derive(Serialize)]
struct Report {
    label: String,
    scenario: String,
    publishers: usize,
    subscribers: usize,
    qos: u8,
    payload: usize,
    published: u64,
    expected: u64,
    received: u64,
    lost: u64,
    duplicates: u64,
    reordered: u64,
    elapsed_secs: f64,
    deliveries_per_sec: f64,
    latency_us: Option<Latency>,
    queue: QueueStats,
    protocol_errors: Vec<String>,
    timed_out: bool,
}

#[derive(Serialize)]
struct Latency {
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

#[derive(Serialize)]
struct QueueStats {
    queue: String,
    receive_maximum: u16,
    nack_once: bool,
    nacked: u64,
    redelivered: u64,
    stale: u64,
    max_attempt: u32,
}

type Tasks<T> = Vec<tokio::task::JoinHandle<anyhow::Result<T>>>;

/// Waits for the run to end (everything acked, nothing moving for 2 s after the publishers
/// finished, or the timeout), then stops every task and reports.
async fn finish(
    load: &Load,
    shared: &Shared,
    queue: &str,
    started: Instant,
    publishers: Tasks<u64>,
    consumers: Tasks<Tally>,
) -> anyhow::Result<Report> {
    let deadline = started + Duration::from_secs(load.timeout);
    let mut last = (0, Instant::now());
    let mut timed_out = false;
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let got = shared.acked.load(Relaxed);
        if shared.done() {
            break;
        }
        if got != last.0 {
            last = (got, Instant::now());
        } else if publishers.iter().all(|h| h.is_finished())
            && last.1.elapsed() > Duration::from_secs(2)
        {
            break;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
    }
    let got = shared.acked.load(Relaxed);
    let elapsed = if got < shared.expected() && !timed_out && last.0 == got {
        last.1 - started
    } else {
        started.elapsed()
    };
    shared.stop.store(true, Relaxed);
    let mut published = 0;
    for h in publishers {
        match tokio::time::timeout(Duration::from_secs(5), h).await {
            Ok(Ok(Ok(n))) => published += n,
            Ok(Ok(Err(e))) => shared.error(format!("publisher: {e:#}")),
            _ => shared.error("publisher did not stop".into()),
        }
    }
    let mut all = Tally::new()?;
    for h in consumers {
        match tokio::time::timeout(Duration::from_secs(5), h).await {
            Ok(Ok(Ok(t))) => {
                all.acked_distinct += t.acked_distinct;
                all.duplicates += t.duplicates;
                all.nacked += t.nacked;
                all.redelivered += t.redelivered;
                all.max_attempt = all.max_attempt.max(t.max_attempt);
                let _ = all.hist.add(&t.hist);
            }
            Ok(Ok(Err(e))) => shared.error(format!("consumer: {e:#}")),
            _ => shared.error("consumer did not stop".into()),
        }
    }
    let secs = elapsed.as_secs_f64().max(1e-9);
    let h = &all.hist;
    Ok(Report {
        label: load.label.clone(),
        scenario: if load.nack_once {
            "queue-nack-once".into()
        } else {
            "queue".into()
        },
        publishers: load.publishers,
        subscribers: load.consumers,
        qos: 1,
        payload: load.payload,
        published,
        expected: published,
        received: all.acked_distinct,
        lost: published.saturating_sub(all.acked_distinct),
        duplicates: all.duplicates,
        reordered: 0,
        elapsed_secs: secs,
        deliveries_per_sec: all.acked_distinct as f64 / secs,
        latency_us: (!h.is_empty()).then(|| Latency {
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }),
        queue: QueueStats {
            queue: queue.into(),
            receive_maximum: load.prefetch,
            nack_once: load.nack_once,
            nacked: all.nacked,
            redelivered: all.redelivered,
            stale: 0,
            max_attempt: all.max_attempt,
        },
        protocol_errors: shared.errors.lock().map(|v| v.clone()).unwrap_or_default(),
        timed_out,
    })
}

impl Report {
    fn print_table(&self) {
        println!("{} / {}", self.label, self.scenario);
        println!(
            "  {} pub -> {} consumers, {} B payload, prefetch {}{}",
            self.publishers,
            self.subscribers,
            self.payload,
            self.queue.receive_maximum,
            if self.queue.nack_once {
                ", nack once"
            } else {
                ""
            }
        );
        println!("  published            {}", self.published);
        println!(
            "  acked (distinct)     {} of {}",
            self.received, self.expected
        );
        println!("  lost / dup           {} / {}", self.lost, self.duplicates);
        println!(
            "  nacked / redelivered {} / {} (highest attempt {})",
            self.queue.nacked, self.queue.redelivered, self.queue.max_attempt
        );
        println!(
            "  elapsed              {:.3} s{}",
            self.elapsed_secs,
            if self.timed_out { " (timed out)" } else { "" }
        );
        println!(
            "  throughput           {:.0} msgs/s (published -> acked, distinct)",
            self.deliveries_per_sec
        );
        if let Some(l) = &self.latency_us {
            println!(
                "  latency µs           p50 {} p90 {} p99 {} p99.9 {} max {}",
                l.p50, l.p90, l.p99, l.p999, l.max
            );
        }
        for e in &self.protocol_errors {
            println!("  ERROR                {e}");
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut load = cli.load;
        load.publishers = load.publishers.max(1);
        load.consumers = load.consumers.max(1);
        load.payload = load.payload.max(STAMP);
        load.inflight = load.inflight.max(1);
        load.prefetch = load.prefetch.max(1);
        let messages = load
            .messages
            .unwrap_or((200_000 / load.publishers as u64).max(1))
            .max(1);
        load.messages = Some(messages);
        let shared = std::sync::Arc::new(Shared::new(load.publishers, messages));
        let report = match cli.broker {
            Broker::Nats { url } => nats::run(&url, &load, shared.clone()).await?,
            Broker::Rabbitmq { url } => rabbit::run(&url, &load, shared.clone()).await?,
        };
        if load.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            report.print_table();
        }
        if let Some(e) = report.protocol_errors.first() {
            bail!("error: {e}");
        }
        if report.lost > 0 {
            bail!("{} of {} messages lost", report.lost, report.published);
        }
        Ok(())
    })
}
