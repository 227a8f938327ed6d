//! Counters kept by the network layer, and what a scrape gathers (`exposition.rs` encodes
//! it; `docs/metrics.md` is the catalogue).
//!
//! Connection tasks, the router and the storage threads add to atomics here ([`NetMetrics`],
//! with its [`Histogram`]s); the engine keeps its own plain counters ([`ferrymq_core::Stats`])
//! that the router copies out on request ([`EngineSnapshot`]). No per-message locking or
//! allocation.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use ferrymq_core::Stats;
use ferrymq_mqtt::{ProtocolVersion, ReasonCode};

use crate::config::ListenerKind;
use crate::histogram::{EngineClock, Histogram, LATENCY_BOUNDS_US};
use crate::limits::Refusal;

pub use crate::exposition::render;

/// Counters updated by connection tasks.
#[derive(Debug, Default)]
pub struct NetMetrics {
    pub connections_accepted: AtomicU64,
    /// Connections refused by a connection limit, per limit (in the order of
    /// `limits::Refusal::ALL`).
    pub connections_refused: [AtomicU64; Refusal::ALL.len()],
    pub connections_open: AtomicU64,
    /// Bytes of read buffer held by connections whose CONNECT is not complete (bounded by
    /// `limits.preauth_buffer_bytes`; see `limits::PreauthBudget`).
    pub preauth_buffer_bytes: AtomicU64,
    /// CONNECTs refused by authentication, per `auth::AuthRefusal` (in the order of its `ALL`).
    pub auth_refused: [AtomicU64; crate::auth::AuthRefusal::ALL.len()],
    /// Connections accepted, per listener (in the order of `config::ListenerKind::ALL`).
    pub listener_accepted: [AtomicU64; ListenerKind::ALL.len()],
    /// Open connections, per listener.
    pub listener_open: [AtomicU64; ListenerKind::ALL.len()],
    /// TLS or WebSocket handshakes that failed or timed out, per listener.
    pub handshake_failures: [AtomicU64; ListenerKind::ALL.len()],
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub dropped_slow_consumer: AtomicU64,
    /// Times a publisher's input was held back because it fed a subscriber over its high mark.
    pub publisher_pauses: AtomicU64,
    /// Subscribers that stayed over their high mark past the grace period.
    pub slow_subscribers: AtomicU64,
    pub malformed_packets: AtomicU64,
    /// Connections the server closed for breaking a rule (malformed packet, protocol error,
    /// keep alive, slow consumer, a bad first packet), by the reason code it gave.
    pub disconnects: ReasonCounts,
    /// The longest router step since start, in microseconds (a checkpoint, a large batch).
    pub router_step_max_us: AtomicU64,
    /// Router steps that took over 10 ms.
    pub router_steps_over_10ms: AtomicU64,
    /// Every router step's duration.
    pub router_step: Histogram,
    /// Publish-to-deliver latency (see [`crate::histogram::LatencyBatch`]).
    pub delivery: DeliveryLatency,
    /// How long log writes, fsyncs and checkpoints take.
    pub storage: StorageTimings,
    /// Config reloads applied, and refused (the config in force stays).
    pub config_reloads_ok: AtomicU64,
    pub config_reloads_error: AtomicU64,
    /// Audit records dropped because the audit writer's queue was full.
    pub audit_dropped: AtomicU64,
}

impl NetMetrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
}

/// The publish-to-deliver histogram and the clock subscribers' writers read it with.
#[derive(Debug)]
pub struct DeliveryLatency {
    pub histogram: Histogram,
    pub clock: EngineClock,
}

impl Default for DeliveryLatency {
    fn default() -> Self {
        DeliveryLatency {
            histogram: Histogram::new(LATENCY_BOUNDS_US),
            clock: EngineClock::default(),
        }
    }
}

impl DeliveryLatency {
    /// A write batch's recorder: call [`crate::histogram::LatencyBatch::record`] for each
    /// delivery encoded, then `flush` before the write awaits.
    pub(crate) fn batch(&self) -> crate::histogram::LatencyBatch<'_> {
        crate::histogram::LatencyBatch::new(&self.histogram, &self.clock)
    }
}

/// Durations of the log's work, recorded where it is done: appends and fsyncs on the group
/// commit thread (`fsync = always`) or inline on the router thread and the syncer thread
/// (`interval`, `os`); checkpoints on the router thread (the time routing stalls while the
/// checkpoint's records are made and handed to the log).
#[derive(Debug, Default)]
pub struct StorageTimings {
    pub append: Histogram,
    pub fsync: Histogram,
    pub checkpoint: Histogram,
}

impl ferrymq_store::CommitObserver for NetMetrics {
    fn wrote(&self, took: Duration) {
        self.storage.append.observe(took);
    }

    fn synced(&self, took: Duration) {
        self.storage.fsync.observe(took);
    }
}

/// First and last error reason code (MQTT 5.0 §2.4): the reasons a server closes with.
const FIRST_ERROR: u8 = 0x80;
const LAST_ERROR: u8 = 0xA2;
const ERROR_CODES: usize = (LAST_ERROR - FIRST_ERROR) as usize + 1;

/// One counter per error reason code.
#[derive(Debug)]
pub struct ReasonCounts([AtomicU64; ERROR_CODES]);

impl Default for ReasonCounts {
    fn default() -> Self {
        ReasonCounts(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl ReasonCounts {
    /// Counts one; a non-error code (never given for a close) is counted as unspecified.
    pub fn add(&self, reason: ReasonCode) {
        let i = reason.as_u8().saturating_sub(FIRST_ERROR) as usize;
        self.0[i.min(ERROR_CODES - 1)].fetch_add(1, Relaxed);
    }

    pub fn get(&self, reason: ReasonCode) -> u64 {
        let i = reason.as_u8().saturating_sub(FIRST_ERROR) as usize;
        self.0[i.min(ERROR_CODES - 1)].load(Relaxed)
    }

    /// Every reason with its count, zeros included.
    pub fn all(&self) -> impl Iterator<Item = (ReasonCode, u64)> + '_ {
        (FIRST_ERROR..=LAST_ERROR).filter_map(move |code| {
            let reason = ReasonCode::from_u8(code)?;
            Some((reason, self.0[(code - FIRST_ERROR) as usize].load(Relaxed)))
        })
    }
}

/// A reason code's name as a metric label or log key: `MalformedPacket` → `malformed_packet`.
pub(crate) fn reason_label(reason: ReasonCode) -> String {
    let mut label = String::new();
    for (i, c) in format!("{reason:?}").chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                label.push('_');
            }
            label.push(c.to_ascii_lowercase());
        } else {
            label.push(c);
        }
    }
    label
}

/// The protocol versions a client may connect with, as metric labels and in the REST views.
pub(crate) const PROTOCOLS: [ProtocolVersion; 2] = [ProtocolVersion::V311, ProtocolVersion::V5];

pub(crate) fn protocol_label(v: ProtocolVersion) -> &'static str {
    match v {
        ProtocolVersion::V311 => "3.1.1",
        ProtocolVersion::V5 => "5.0",
    }
}

/// Connections attached to a session, per listener (`ListenerKind::ALL` order) and protocol
/// version ([`PROTOCOLS`] order).
pub type ConnectionsByListener = [[u64; PROTOCOLS.len()]; ListenerKind::ALL.len()];

/// What the router reports when asked.
#[derive(Debug, Clone, Default)]
pub struct EngineSnapshot {
    pub stats: Stats,
    pub connections: usize,
    /// `connections`, by listener and protocol version.
    pub connections_by_listener: ConnectionsByListener,
    pub sessions: usize,
    pub subscriptions: usize,
    pub retained: usize,
    /// Bytes of log segments on disk (0 without persistence).
    pub storage_disk_bytes: u64,
    /// Actions waiting for their journal records to be durable.
    pub storage_held_actions: usize,
    /// The log found the disk full and keeps records in memory until a retry writes them.
    pub storage_blocked: bool,
    /// Every work queue's counters.
    pub queues: Vec<ferrymq_core::queues::QueueCounters>,
    /// Messages waiting for a `$delayed/…` publish to come due.
    pub delayed_publishes: u64,
}
