//! `ferrymq bench`: load generator and verifier for any MQTT broker.
//!
//! Every scenario counts every message and checks it: publishers stamp each payload with
//! (publisher, sequence, send time); subscribers record what arrived in a bitset per publisher,
//! so loss, duplicates and reordering are exact. A QoS 1/2 loss or a protocol error makes the
//! command exit non-zero. Every run is bounded by `--timeout`.

mod load;
mod queue;
mod report;

use std::time::Duration;

use anyhow::bail;
use ferrymq_mqtt::{ProtocolVersion, QoS};

pub use report::Report;

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    scenario: Scenario,
    /// Broker host.
    #[arg(long, global = true, default_value = "127.0.0.1")]
    host: String,
    /// Broker port.
    #[arg(long, global = true, default_value_t = 1883)]
    port: u16,
    /// Protocol version, 3 (3.1.1) or 5 [default: 5 for `queue`, 3 for the others].
    #[arg(long = "protocol-version", global = true)]
    version: Option<String>,
    /// Print one JSON object instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Give up after this many seconds.
    #[arg(long, global = true, default_value_t = 60)]
    timeout: u64,
    /// A label for the report (e.g. the broker's name).
    #[arg(long, global = true, default_value = "broker")]
    label: String,
    /// Subscribers use persistent sessions (3.1.1 clean session 0; 5.0 session expiry 300 s),
    /// so a broker with persistence must store QoS 1/2 messages for them: the durable case.
    #[arg(long, global = true)]
    persistent: bool,
    /// TLS (`--tls-ca`), WebSocket (`--ws`) or a broker URL (`--url wss://host:8084/mqtt`).
    #[command(flatten)]
    transport: crate::transport_args::TransportArgs,
}

#[derive(clap::Subcommand)]
enum Scenario {
    /// P publishers to S subscribers, all on one topic tree.
    Throughput(Flow),
    /// One publisher to many subscribers (default 100).
    Fanout(Flow),
    /// Many publishers (default 50) to one subscriber.
    Fanin(Flow),
    /// End-to-end latency at a paced rate, from timestamps in the payload.
    Latency(LatencyArgs),
    /// Open idle connections (`--concurrency` at a time): the connection-setup rate (TCP, TLS
    /// and WebSocket handshakes, CONNECT/CONNACK) and the broker's memory per connection held.
    Connections(ConnArgs),
    /// A durable work queue: P publishers (QoS 1) into a queue, C consumers on `$queue/NAME`
    /// acking each message; messages/s from publish to ack, and every message accounted for.
    #[command(after_long_help = QUEUE_CONFIG)]
    Queue(QueueArgs),
}

/// What the broker needs for `ferrymq bench queue` (its defaults), shown by `--help`.
const QUEUE_CONFIG: &str = "\
The broker must define the queue. For the defaults (--queue bench, --topic bench/q), start it
with this in its config file (`ferrymq serve --config FILE`):

    [[queue]]
    name = \"bench\"
    filter = \"bench/q/#\"
    max_attempts = 5
    backoff = { kind = \"none\" }

`backoff = none` makes --nack-once measure the nack path itself, not a retry delay. Each run
publishes under its own topic level (bench/q/RUN/PUBLISHER), so messages left in the durable
queue by an earlier run that timed out are acked and reported as stale, not counted.";

#[derive(clap::Args, Clone)]
pub struct QueueArgs {
    /// Publishers.
    #[arg(short = 'P', long, default_value_t = 1)]
    publishers: usize,
    /// Consumers, each subscribed to `$queue/NAME`.
    #[arg(short = 'C', long, default_value_t = 1)]
    consumers: usize,
    /// Payload size in bytes (at least 20: the stamp).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Messages per publisher (default: 200,000 in total, split over the publishers).
    #[arg(short = 'n', long)]
    messages: Option<u64>,
    /// Unacknowledged publishes per publisher.
    #[arg(long, default_value_t = 256)]
    inflight: usize,
    /// Each consumer's receive maximum (MQTT 5): the most messages it holds unacked.
    #[arg(long, default_value_t = 256)]
    receive_maximum: u16,
    /// The queue's name.
    #[arg(long, default_value = "bench")]
    queue: String,
    /// Topic prefix the queue's filter matches (publishers send to TOPIC/RUN/PUBLISHER).
    #[arg(long, default_value = "bench/q")]
    topic: String,
    /// Nack each message on its first delivery (x-attempt 1, PUBACK 0x80), ack it on the
    /// next: the nack path. Needs MQTT 5.
    #[arg(long)]
    nack_once: bool,
    /// Only publish, no consumers: fills the queue with a backlog (the rate is messages
    /// acknowledged to the publishers per second). Drain it later with `--drain`.
    #[arg(long, conflicts_with = "drain")]
    fill_only: bool,
    /// Only consume what an earlier `--fill-only` run with the same -P and -n left in the
    /// queue (any run's topic under --topic), counting each message once by its stamp.
    #[arg(long)]
    drain: bool,
}

#[derive(clap::Args, Clone)]
pub struct Flow {
    /// Publishers (default depends on the scenario: 1, or 50 for fanin).
    #[arg(short = 'P', long)]
    publishers: Option<usize>,
    /// Subscribers (default 1, or 100 for fanout).
    #[arg(short = 'S', long)]
    subscribers: Option<usize>,
    /// QoS of publishes and subscriptions.
    #[arg(short = 'q', long, default_value_t = 0)]
    qos: u8,
    /// Payload size in bytes (at least 20: the stamp).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Messages per publisher (default: 200,000 in total, split over the publishers).
    #[arg(short = 'n', long)]
    messages: Option<u64>,
    /// QoS 1/2: unacknowledged publishes per publisher. QoS 0: how far publishers may run
    /// ahead of the slowest subscriber, in messages.
    #[arg(long, default_value_t = 256)]
    inflight: usize,
    /// QoS 0: publishers write their messages back to back in large writes, as fast as the
    /// broker reads them, without waiting for subscribers (a batching client or a bridge).
    /// A broker that cannot push back loses messages here.
    #[arg(long)]
    burst: bool,
}

#[derive(clap::Args, Clone)]
pub struct LatencyArgs {
    /// Messages per second.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    #[arg(short = 'q', long, default_value_t = 0)]
    qos: u8,
    #[arg(long, default_value_t = 64)]
    payload: usize,
}

#[derive(clap::Args, Clone)]
pub struct ConnArgs {
    /// Connections to open.
    #[arg(short = 'c', long, default_value_t = 10_000)]
    connections: usize,
    /// Keep alive of each connection, in seconds.
    #[arg(long, default_value_t = 300)]
    keep_alive: u16,
    /// Seconds to hold them once all are open.
    #[arg(long, default_value_t = 3)]
    hold: u64,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// PID of the broker, to read its resident memory from /proc.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Bind client sockets to these local addresses in turn (e.g. 127.0.0.2,127.0.0.3): each
    /// source address has its own ~28K ephemeral ports, so more than that many connections
    /// to one broker address need several.
    #[arg(long, value_delimiter = ',')]
    source_addrs: Vec<std::net::IpAddr>,
}

#[derive(Clone)]
pub(crate) struct Target {
    pub addr: String,
    pub version: ProtocolVersion,
    pub timeout: Duration,
    /// Local address to connect from, if not the kernel's choice.
    pub source: Option<std::net::IpAddr>,
    /// Subscribers connect with persistent sessions.
    pub persistent: bool,
    /// TLS and WebSocket, if not plain TCP.
    pub tls: Option<ferrymq_client::TlsOptions>,
    pub websocket: Option<ferrymq_client::WsOptions>,
}

impl Target {
    /// Options for one connection to the target (its address, version, timeout, transport).
    pub(crate) fn options(&self, id: String) -> ferrymq_client::ConnectOptions {
        let mut o = ferrymq_client::ConnectOptions::new(self.addr.clone(), id);
        o.version = self.version;
        o.timeout = self.timeout;
        o.source = self.source;
        o.tls = self.tls.clone();
        o.websocket = self.websocket.clone();
        o
    }
}

pub async fn run(a: BenchArgs) -> anyhow::Result<()> {
    let default_version = match a.scenario {
        Scenario::Queue(_) => "5",
        _ => "3",
    };
    let version = match a.version.as_deref().unwrap_or(default_version) {
        "3" | "311" => ProtocolVersion::V311,
        "5" => ProtocolVersion::V5,
        v => bail!("unknown protocol version {v:?}: use 3 or 5"),
    };
    // No TLS session resumption: every connection pays a full handshake, as a fleet of
    // devices connecting for the first time (or after the broker restarted) does.
    let endpoint = a.transport.endpoint(&a.host, a.port, false)?;
    let target = Target {
        addr: endpoint.addr.clone(),
        version,
        timeout: Duration::from_secs(a.timeout),
        source: None,
        persistent: a.persistent,
        tls: endpoint.tls.clone(),
        websocket: endpoint.websocket.clone(),
    };
    let qos = |q: u8| QoS::from_u8(q).ok_or_else(|| anyhow::anyhow!("QoS must be 0, 1 or 2"));
    let mut report = match a.scenario {
        Scenario::Throughput(f) => flow(&target, "throughput", f, 1, 1, qos).await?,
        Scenario::Fanout(f) => flow(&target, "fanout", f, 1, 100, qos).await?,
        Scenario::Fanin(f) => flow(&target, "fanin", f, 50, 1, qos).await?,
        Scenario::Latency(l) => {
            let plan = load::Plan {
                publishers: 1,
                subscribers: 1,
                qos: qos(l.qos)?,
                payload: l.payload.max(load::STAMP),
                messages: l.rate * l.duration,
                inflight: 65_000,
                rate: Some(l.rate),
                burst: false,
            };
            load::run_flow(&target, "latency", plan).await?
        }
        Scenario::Connections(c) => load::run_connections(&target, c).await?,
        Scenario::Queue(q) => {
            let publishers = q.publishers.max(1);
            let plan = queue::QueuePlan {
                publishers,
                consumers: if q.fill_only { 0 } else { q.consumers.max(1) },
                payload: q.payload.max(load::STAMP),
                messages: q
                    .messages
                    .unwrap_or((200_000 / publishers as u64).max(1))
                    .max(1),
                inflight: q.inflight.clamp(1, 65_000),
                receive_maximum: q.receive_maximum.max(1),
                queue: q.queue,
                topic: q.topic.trim_end_matches('/').to_string(),
                nack_once: q.nack_once,
                mode: if q.fill_only {
                    queue::Mode::FillOnly
                } else if q.drain {
                    queue::Mode::Drain
                } else {
                    queue::Mode::Both
                },
            };
            queue::run(&target, plan).await?
        }
    };
    report.label = a.label;
    report.transport = endpoint.transport().into();
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    if let Some(problem) = report.failure() {
        bail!("{problem}");
    }
    Ok(())
}

async fn flow(
    target: &Target,
    name: &str,
    f: Flow,
    default_pubs: usize,
    default_subs: usize,
    qos: impl Fn(u8) -> anyhow::Result<QoS>,
) -> anyhow::Result<Report> {
    let publishers = f.publishers.unwrap_or(default_pubs).max(1);
    let subscribers = f.subscribers.unwrap_or(default_subs).max(1);
    let messages = f.messages.unwrap_or((200_000 / publishers as u64).max(1));
    let plan = load::Plan {
        publishers,
        subscribers,
        qos: qos(f.qos)?,
        payload: f.payload.max(load::STAMP),
        messages,
        inflight: f.inflight.clamp(1, 65_000),
        rate: None,
        burst: f.burst,
    };
    let name = if f.burst {
        format!("{name}-burst")
    } else {
        name.to_string()
    };
    load::run_flow(target, &name, plan).await
}
