//! Counters kept by the network layer, and the Prometheus text exposition.
//!
//! The engine keeps its own plain counters ([`ferrymq_core::Stats`]); the router copies them
//! out on request, and this module renders both. No per-message locking or allocation.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use ferrymq_core::queues::QueueView;
use ferrymq_core::workqueue::Cause;
use ferrymq_core::Stats;

use crate::alarms::AlarmState;
use ferrymq_mqtt::ReasonCode;

use crate::config::ListenerKind;
use crate::limits::Refusal;

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
    /// Configuration reloads applied, and refused (an invalid file: nothing changed).
    pub config_reloads_ok: AtomicU64,
    pub config_reloads_error: AtomicU64,
    /// Audit log lines dropped because its writer fell behind (`audit.rs`).
    pub audit_dropped: AtomicU64,
}

impl NetMetrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
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

/// What the router reports when asked.
#[derive(Debug, Clone, Default)]
pub struct EngineSnapshot {
    pub stats: Stats,
    pub connections: usize,
    pub sessions: usize,
    pub subscriptions: usize,
    pub retained: usize,
    /// Bytes of log segments on disk (0 without persistence).
    pub storage_disk_bytes: u64,
    /// Actions waiting for their journal records to be durable.
    pub storage_held_actions: usize,
    /// The log found the disk full and keeps records in memory until a retry writes them.
    pub storage_blocked: bool,
    /// Every work queue with its counters.
    pub queues: Vec<ferrymq_core::queues::QueueView>,
    /// Messages waiting for a `$delayed/…` publish to come due.
    pub delayed_publishes: u64,
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

/// One sample per queue (`queue="name"`; names need no escaping: letters, digits, `-_.`).
fn per_queue(
    o: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    queues: &[QueueView],
    value: impl Fn(&QueueView) -> u64,
) {
    let labels: Vec<String> = queues
        .iter()
        .map(|q| format!("queue=\"{}\"", q.def.name))
        .collect();
    let samples: Vec<(&str, u64)> = labels
        .iter()
        .zip(queues)
        .map(|(l, q)| (l.as_str(), value(q)))
        .collect();
    metric(o, name, kind, help, &samples);
}

/// The work-queue metrics (docs/queues.md).
fn render_queues(o: &mut String, e: &EngineSnapshot) {
    let q = &e.queues;
    per_queue(
        o,
        "ferrymq_queue_depth",
        "gauge",
        "Messages waiting in the queue (ready or delayed).",
        q,
        |v| v.depth,
    );
    per_queue(
        o,
        "ferrymq_queue_leased",
        "gauge",
        "Messages leased to consumers, not yet acknowledged.",
        q,
        |v| v.leased as u64,
    );
    per_queue(
        o,
        "ferrymq_queue_delayed",
        "gauge",
        "Waiting messages not due yet (a retry backoff or a delay).",
        q,
        |v| v.delayed as u64,
    );
    per_queue(
        o,
        "ferrymq_queue_bytes",
        "gauge",
        "Topic and payload bytes held (waiting and leased).",
        q,
        |v| v.bytes,
    );
    per_queue(
        o,
        "ferrymq_queue_cached_bytes",
        "gauge",
        "Bytes of its messages held in memory (the rest are read back from the log).",
        q,
        |v| v.cached_bytes,
    );
    per_queue(
        o,
        "ferrymq_queue_unreadable_total",
        "counter",
        "Messages whose record could not be read back from the log (dropped).",
        q,
        |v| v.stats.unreadable,
    );
    per_queue(
        o,
        "ferrymq_queue_dead_letters",
        "gauge",
        "Dead letters kept for the queue.",
        q,
        |v| v.dead_letters as u64,
    );
    per_queue(
        o,
        "ferrymq_queue_consumers",
        "gauge",
        "Consumers subscribed to the queue.",
        q,
        |v| v.consumers as u64,
    );
    per_queue(
        o,
        "ferrymq_queue_oldest_age_ms",
        "gauge",
        "Age of the oldest message held (0 when empty).",
        q,
        |v| v.oldest_age_ms.unwrap_or(0),
    );
    per_queue(
        o,
        "ferrymq_queue_enqueued_total",
        "counter",
        "Messages that entered the queue.",
        q,
        |v| v.stats.enqueued,
    );
    per_queue(
        o,
        "ferrymq_queue_acked_total",
        "counter",
        "Messages acknowledged by a consumer.",
        q,
        |v| v.stats.acked,
    );
    per_queue(
        o,
        "ferrymq_queue_nacked_total",
        "counter",
        "Failed attempts: nacks, ack timeouts, lost consumers, restarts.",
        q,
        |v| v.stats.nacked,
    );
    per_queue(
        o,
        "ferrymq_queue_redelivered_total",
        "counter",
        "Deliveries after a failed attempt.",
        q,
        |v| v.stats.redelivered,
    );
    per_queue(
        o,
        "ferrymq_queue_refused_total",
        "counter",
        "Publishes the queue refused (full under reject_new, or nothing to displace).",
        q,
        |v| v.stats.refused,
    );
    let mut dropped: Vec<(String, u64)> = Vec::new();
    let mut dead: Vec<(String, u64)> = Vec::new();
    for v in q {
        let n = &v.def.name;
        dropped.push((
            format!("queue=\"{n}\",reason=\"overflow\""),
            v.stats.dropped_overflow,
        ));
        dropped.push((
            format!("queue=\"{n}\",reason=\"expired\""),
            v.stats.dropped_expired,
        ));
        for c in Cause::ALL {
            let count = v.stats.dead_lettered.get(&c).copied().unwrap_or(0);
            dead.push((format!("queue=\"{n}\",cause=\"{}\"", c.as_str()), count));
        }
    }
    let dropped: Vec<(&str, u64)> = dropped.iter().map(|(l, n)| (l.as_str(), *n)).collect();
    metric(
        o,
        "ferrymq_queue_dropped_total",
        "counter",
        "Messages dropped from the queue unconsumed, by reason.",
        &dropped,
    );
    let dead: Vec<(&str, u64)> = dead.iter().map(|(l, n)| (l.as_str(), *n)).collect();
    metric(
        o,
        "ferrymq_queue_dead_lettered_total",
        "counter",
        "Messages that became dead letters, by cause.",
        &dead,
    );
    metric(
        o,
        "ferrymq_delayed_publishes",
        "gauge",
        "$delayed publishes waiting to come due.",
        &[("", e.delayed_publishes)],
    );
}

/// Renders the Prometheus text format (version 0.0.4).
pub fn render(net: &NetMetrics, e: &EngineSnapshot, alarms: &[AlarmState]) -> String {
    let mut o = String::with_capacity(4096);
    render_queues(&mut o, e);
    metric(
        &mut o,
        "ferrymq_router_step_max_us",
        "gauge",
        "The longest router step since start, in microseconds.",
        &[("", net.router_step_max_us.load(Relaxed))],
    );
    metric(
        &mut o,
        "ferrymq_router_steps_over_10ms_total",
        "counter",
        "Router steps that took over 10 ms (routing stalled meanwhile).",
        &[("", net.router_steps_over_10ms.load(Relaxed))],
    );
    let s = &e.stats;
    let g = |c: &AtomicU64| c.load(Relaxed);
    metric(
        &mut o,
        "ferrymq_connections",
        "gauge",
        "Connections attached to a session.",
        &[("", e.connections as u64)],
    );
    metric(
        &mut o,
        "ferrymq_connections_open",
        "gauge",
        "Open connections (every listener), including those not yet past CONNECT.",
        &[("", g(&net.connections_open))],
    );
    metric(
        &mut o,
        "ferrymq_preauth_buffer_bytes",
        "gauge",
        "Bytes of read buffer held by connections that have not completed CONNECT \
         (at most limits.preauth_buffer_bytes).",
        &[("", g(&net.preauth_buffer_bytes))],
    );
    metric(
        &mut o,
        "ferrymq_config_reloads_total",
        "counter",
        "Configuration reloads, by result (error: the file was refused whole).",
        &[
            ("result=\"ok\"", g(&net.config_reloads_ok)),
            ("result=\"error\"", g(&net.config_reloads_error)),
        ],
    );
    metric(
        &mut o,
        "ferrymq_audit_dropped_total",
        "counter",
        "Audit log lines dropped because the writer could not keep up.",
        &[("", g(&net.audit_dropped))],
    );
    metric(
        &mut o,
        "ferrymq_connections_accepted_total",
        "counter",
        "Connections accepted (every listener).",
        &[("", g(&net.connections_accepted))],
    );
    let per_listener = |counters: &[AtomicU64; ListenerKind::ALL.len()]| -> Vec<(String, u64)> {
        ListenerKind::ALL
            .iter()
            .map(|t| {
                let n = g(&counters[*t as usize]);
                (format!("listener=\"{}\"", t.name()), n)
            })
            .collect()
    };
    for (name, kind, help, counters) in [
        (
            "ferrymq_listener_connections_open",
            "gauge",
            "Open connections, by listener (mqtt, mqtts, ws, wss).",
            &net.listener_open,
        ),
        (
            "ferrymq_listener_connections_accepted_total",
            "counter",
            "Connections accepted, by listener.",
            &net.listener_accepted,
        ),
        (
            "ferrymq_listener_handshake_failures_total",
            "counter",
            "TLS or WebSocket handshakes that failed or timed out, by listener.",
            &net.handshake_failures,
        ),
    ] {
        let samples = per_listener(counters);
        let samples: Vec<(&str, u64)> = samples.iter().map(|(l, n)| (l.as_str(), *n)).collect();
        metric(&mut o, name, kind, help, &samples);
    }
    // One sample per connection limit (named after its key), and `connect` for CONNECTs the
    // engine refused (not authorized, bad client id, ...).
    let refused: Vec<(String, u64)> = Refusal::ALL
        .iter()
        .map(|r| {
            let n = g(&net.connections_refused[*r as usize]);
            (format!("reason=\"{}\"", r.label()), n)
        })
        .chain([("reason=\"connect\"".to_string(), s.connects_refused)])
        .collect();
    let samples: Vec<(&str, u64)> = refused.iter().map(|(l, n)| (l.as_str(), *n)).collect();
    metric(
        &mut o,
        "ferrymq_connections_refused_total",
        "counter",
        "Connections refused, by the limit reached (CONNACK 0x89/0x9F) or connect (CONNECT refused).",
        &samples,
    );
    let auth: Vec<(String, u64)> = crate::auth::AuthRefusal::ALL
        .iter()
        .map(|r| {
            let n = g(&net.auth_refused[*r as usize]);
            (format!("reason=\"{}\"", r.label()), n)
        })
        .collect();
    let samples: Vec<(&str, u64)> = auth.iter().map(|(l, n)| (l.as_str(), *n)).collect();
    metric(
        &mut o,
        "ferrymq_auth_refused_total",
        "counter",
        "CONNECTs refused by authentication: bad_credentials (0x86), not_authorized (0x87, \
         anonymous), banned (0x8A), busy (not checked within the connect timeout).",
        &samples,
    );
    metric(
        &mut o,
        "ferrymq_acl_denied_total",
        "counter",
        "What the ACL refused: publishes, subscriptions, and deliveries (messages not sent to \
         a subscriber that may not read their topic: routed, retained, replayed on resume).",
        &[
            ("action=\"publish\"", s.acl_denied_publishes),
            ("action=\"subscribe\"", s.acl_denied_subscriptions),
            ("action=\"deliver\"", s.acl_denied_deliveries),
        ],
    );
    metric(
        &mut o,
        "ferrymq_sessions",
        "gauge",
        "Sessions, connected or not.",
        &[("", e.sessions as u64)],
    );
    metric(
        &mut o,
        "ferrymq_subscriptions",
        "gauge",
        "Subscriptions, shared memberships included.",
        &[("", e.subscriptions as u64)],
    );
    metric(
        &mut o,
        "ferrymq_retained_messages",
        "gauge",
        "Retained messages stored.",
        &[("", e.retained as u64)],
    );
    metric(
        &mut o,
        "ferrymq_storage_disk_bytes",
        "gauge",
        "Bytes of log segments on disk.",
        &[("", e.storage_disk_bytes)],
    );
    metric(
        &mut o,
        "ferrymq_storage_held_actions",
        "gauge",
        "Packets waiting for their journal records to be durable before they are sent.",
        &[("", e.storage_held_actions as u64)],
    );
    metric(
        &mut o,
        "ferrymq_process_resident_memory_bytes",
        "gauge",
        "Resident memory of the broker process (what limits.memory_high_watermark compares).",
        &[("", crate::resources::rss_bytes().unwrap_or(0))],
    );
    metric(
        &mut o,
        "ferrymq_storage_blocked",
        "gauge",
        "1 while a log write that found the disk full is being retried (its records are kept \
         in memory, durable work is refused), 0 otherwise.",
        &[("", u64::from(e.storage_blocked))],
    );
    metric(
        &mut o,
        "ferrymq_messages_received_total",
        "counter",
        "PUBLISH packets accepted from clients, by QoS.",
        &[
            ("qos=\"0\"", s.messages_received[0]),
            ("qos=\"1\"", s.messages_received[1]),
            ("qos=\"2\"", s.messages_received[2]),
        ],
    );
    metric(
        &mut o,
        "ferrymq_messages_sent_total",
        "counter",
        "Messages delivered to subscribers, by QoS (redeliveries not counted).",
        &[
            ("qos=\"0\"", s.messages_sent[0]),
            ("qos=\"1\"", s.messages_sent[1]),
            ("qos=\"2\"", s.messages_sent[2]),
        ],
    );
    metric(
        &mut o,
        "ferrymq_payload_bytes_received_total",
        "counter",
        "Payload bytes of accepted PUBLISH packets.",
        &[("", s.payload_bytes_received)],
    );
    metric(
        &mut o,
        "ferrymq_payload_bytes_sent_total",
        "counter",
        "Payload bytes of delivered messages.",
        &[("", s.payload_bytes_sent)],
    );
    metric(
        &mut o,
        "ferrymq_bytes_received_total",
        "counter",
        "Bytes read from MQTT connections.",
        &[("", g(&net.bytes_received))],
    );
    metric(
        &mut o,
        "ferrymq_bytes_sent_total",
        "counter",
        "Bytes written to MQTT connections.",
        &[("", g(&net.bytes_sent))],
    );
    metric(
        &mut o,
        "ferrymq_messages_dropped_total",
        "counter",
        "Messages not delivered, by reason.",
        &[
            ("reason=\"queue_full\"", s.dropped_queue_full),
            ("reason=\"expired\"", s.dropped_expired),
            ("reason=\"packet_too_large\"", s.dropped_too_large),
            ("reason=\"no_subscribers\"", s.dropped_no_subscribers),
            ("reason=\"slow_consumer\"", g(&net.dropped_slow_consumer)),
            ("reason=\"memory_high_watermark\"", s.dropped_memory_high),
            ("reason=\"storage_full\"", s.dropped_storage_full),
        ],
    );
    metric(
        &mut o,
        "ferrymq_publisher_pauses_total",
        "counter",
        "Times a publisher's input was held back because it fed a subscriber over its high mark.",
        &[("", g(&net.publisher_pauses))],
    );
    metric(
        &mut o,
        "ferrymq_slow_subscribers_total",
        "counter",
        "Subscribers that stayed over their high mark past limits.slow_consumer_grace_ms.",
        &[("", g(&net.slow_subscribers))],
    );
    metric(
        &mut o,
        "ferrymq_publishes_refused_total",
        "counter",
        "QoS 1/2 publishes refused (0x97, or a 3.1.1 connection closed), by reason: a full \
         session queue (queue_full = reject, or held past queue_full_timeout_ms), memory over \
         its high-water mark, or storage full (which also counts refused durable sessions \
         and their subscriptions).",
        &[
            ("reason=\"queue_full\"", s.refused_queue_full),
            ("reason=\"memory_high_watermark\"", s.refused_memory_high),
            ("reason=\"storage_full\"", s.refused_storage_full),
        ],
    );
    metric(
        &mut o,
        "ferrymq_acks_held_total",
        "counter",
        "QoS 1/2 publishes whose PUBACK/PUBREC was held for a full session queue \
         (mqtt.queue_full = backpressure).",
        &[("", s.acks_held_total)],
    );
    metric(
        &mut o,
        "ferrymq_queued_messages_high_water",
        "gauge",
        "Most QoS 1/2 messages one session has had queued (beyond those in flight) since start.",
        &[("", s.queued_high_water)],
    );
    metric(
        &mut o,
        "ferrymq_acks_held",
        "gauge",
        "PUBACK/PUBREC held now for full session queues, or queued behind one that is.",
        &[("", s.held_acks)],
    );
    let labels: Vec<String> = alarms
        .iter()
        .map(|a| format!("name=\"{}\"", a.name.as_str()))
        .collect();
    let samples: Vec<(&str, u64)> = labels
        .iter()
        .zip(alarms)
        .map(|(l, a)| (l.as_str(), u64::from(a.active)))
        .collect();
    metric(
        &mut o,
        "ferrymq_alarm_active",
        "gauge",
        "1 while the alarm is raised (see GET /api/v1/alarms), 0 otherwise.",
        &samples,
    );
    // The reasons a healthy broker sees are always present (a dashboard finds them at
    // zero); any other appears once it has happened. A slow consumer is `quota_exceeded`.
    let always = [
        ReasonCode::MalformedPacket,
        ReasonCode::ProtocolError,
        ReasonCode::KeepAliveTimeout,
        ReasonCode::QuotaExceeded,
    ];
    let disconnects: Vec<(String, u64)> = net
        .disconnects
        .all()
        .filter(|(r, n)| *n > 0 || always.contains(r))
        .map(|(r, n)| (format!("reason=\"{}\"", reason_label(r)), n))
        .collect();
    let samples: Vec<(&str, u64)> = disconnects.iter().map(|(l, n)| (l.as_str(), *n)).collect();
    metric(
        &mut o,
        "ferrymq_disconnects_total",
        "counter",
        "Connections closed by the server for breaking a rule, by the reason code given.",
        &samples,
    );
    metric(
        &mut o,
        "ferrymq_malformed_packets_total",
        "counter",
        "Packets that failed to decode (each closes its connection).",
        &[("", g(&net.malformed_packets))],
    );
    o
}
