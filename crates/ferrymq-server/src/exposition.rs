//! The Prometheus exposition of `/metrics`, through `prometheus_client` (the text format
//! 0.0.4). Every metric is gathered at scrape time: a [`Scrape`] holds what the router
//! reported ([`EngineSnapshot`]), the network layer's atomics ([`NetMetrics`]) and the
//! alarms, and a registry made for the one scrape encodes it as a [`Collector`]. Nothing here
//! runs on a message's path. The catalogue, with what each metric means, is
//! `docs/metrics.md`; keep the two together.
//!
//! Counter names are given without `_total`: the encoder appends it.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use ferrymq_mqtt::ReasonCode;

use crate::alarms::AlarmState;
use crate::config::ListenerKind;
use crate::histogram::HistogramSnapshot;
use crate::limits::Refusal;
use crate::metrics::{protocol_label, reason_label, EngineSnapshot, NetMetrics, PROTOCOLS};

mod queue_block;

const COUNTER: MetricType = MetricType::Counter;
const GAUGE: MetricType = MetricType::Gauge;

/// Renders every metric in the Prometheus text format (version 0.0.4).
pub fn render(
    net: &Arc<NetMetrics>,
    mut engine: EngineSnapshot,
    alarms: Vec<AlarmState>,
) -> String {
    // The per-queue families are most of the text and are written without the library
    // (queue_block.rs says why); everything else goes through it.
    let queues = std::mem::take(&mut engine.queues);
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape {
        net: net.clone(),
        engine,
        alarms,
        rss: crate::resources::rss_bytes().unwrap_or(0),
    }));
    let mut out = String::with_capacity(16 * 1024);
    if prometheus_text::encode(&mut out, &registry).is_err() {
        // Writing to a String does not fail; an encoder error would be a bug of ours.
        out.push_str("# encoding failed\n");
    }
    queue_block::write(&mut out, &queues);
    out
}

/// Everything one scrape reads.
#[derive(Debug)]
struct Scrape {
    net: Arc<NetMetrics>,
    engine: EngineSnapshot,
    alarms: Vec<AlarmState>,
    rss: u64,
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let e = &mut enc;
        self.connections(e)?;
        self.messages(e)?;
        self.state(e)?;
        one(
            e,
            "ferrymq_delayed_publishes",
            "$delayed publishes waiting to come due.",
            GAUGE,
            self.engine.delayed_publishes,
        )?;
        self.latency(e)
    }
}

fn value(m: &mut MetricEncoder, kind: MetricType, v: u64) -> fmt::Result {
    match kind {
        MetricType::Counter => m.encode_counter::<NoLabelSet, u64, f64>(&v, None),
        _ => m.encode_gauge(&v),
    }
}

/// A metric with one sample and no labels.
fn one(e: &mut DescriptorEncoder, name: &str, help: &str, kind: MetricType, v: u64) -> fmt::Result {
    value(&mut e.encode_descriptor(name, help, None, kind)?, kind, v)
}

/// A metric with one sample per label set.
fn family<L: EncodeLabelSet>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in samples {
        value(&mut m.encode_family(&labels)?, kind, v)?;
    }
    Ok(())
}

fn histogram(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    h: &HistogramSnapshot,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
    m.encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &h.buckets, None)
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Relaxed)
}

const QOS: [&str; 3] = ["0", "1", "2"];

fn by_qos(
    counts: &[u64; 3],
) -> impl Iterator<Item = ([(&'static str, &'static str); 1], u64)> + '_ {
    QOS.iter().zip(counts).map(|(q, n)| ([("qos", *q)], *n))
}

fn by_listener(
    counters: &[AtomicU64; ListenerKind::ALL.len()],
) -> impl Iterator<Item = ([(&'static str, &'static str); 1], u64)> + '_ {
    ListenerKind::ALL
        .iter()
        .map(|k| ([("listener", k.name())], load(&counters[*k as usize])))
}

impl Scrape {
    fn connections(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let (net, s) = (&self.net, &self.engine.stats);
        one(
            e,
            "ferrymq_connections",
            "Connections attached to a session.",
            GAUGE,
            self.engine.connections as u64,
        )?;
        let by = &self.engine.connections_by_listener;
        family(
            e,
            "ferrymq_client_connections",
            "Connections whose CONNECT was accepted, by listener and MQTT protocol version.",
            GAUGE,
            ListenerKind::ALL.iter().flat_map(|k| {
                PROTOCOLS.iter().enumerate().map(move |(i, v)| {
                    (
                        [("listener", k.name()), ("protocol", protocol_label(*v))],
                        by[*k as usize][i],
                    )
                })
            }),
        )?;
        one(
            e,
            "ferrymq_connections_open",
            "Open connections (every listener), including those not yet past CONNECT.",
            GAUGE,
            load(&net.connections_open),
        )?;
        one(
            e,
            "ferrymq_preauth_buffer_bytes",
            "Bytes of read buffer held by connections that have not completed CONNECT \
             (at most limits.preauth_buffer_bytes).",
            GAUGE,
            load(&net.preauth_buffer_bytes),
        )?;
        one(
            e,
            "ferrymq_connections_accepted",
            "Connections accepted (every listener).",
            COUNTER,
            load(&net.connections_accepted),
        )?;
        family(
            e,
            "ferrymq_listener_connections_open",
            "Open connections, by listener (mqtt, mqtts, ws, wss).",
            GAUGE,
            by_listener(&net.listener_open),
        )?;
        family(
            e,
            "ferrymq_listener_connections_accepted",
            "Connections accepted, by listener.",
            COUNTER,
            by_listener(&net.listener_accepted),
        )?;
        family(
            e,
            "ferrymq_listener_handshake_failures",
            "TLS or WebSocket handshakes that failed or timed out, by listener.",
            COUNTER,
            by_listener(&net.handshake_failures),
        )?;
        // One sample per connection limit (named after its key), and `connect` for CONNECTs
        // the engine refused (not authorized, bad client id, ...).
        family(
            e,
            "ferrymq_connections_refused",
            "Connections refused, by the limit reached (CONNACK 0x89/0x9F) or connect (CONNECT refused).",
            COUNTER,
            Refusal::ALL
                .iter()
                .map(|r| ([("reason", r.label())], load(&net.connections_refused[*r as usize])))
                .chain([([("reason", "connect")], s.connects_refused)]),
        )?;
        family(
            e,
            "ferrymq_auth_refused",
            "CONNECTs refused by authentication: bad_credentials (0x86), not_authorized (0x87, \
             anonymous), banned (0x8A), busy (not checked within the connect timeout).",
            COUNTER,
            crate::auth::AuthRefusal::ALL.iter().map(|r| {
                (
                    [("reason", r.label())],
                    load(&net.auth_refused[*r as usize]),
                )
            }),
        )?;
        family(
            e,
            "ferrymq_acl_denied",
            "What the ACL refused: publishes, subscriptions, and deliveries (messages not sent to \
             a subscriber that may not read their topic: routed, retained, replayed on resume).",
            COUNTER,
            [
                ([("action", "publish")], s.acl_denied_publishes),
                ([("action", "subscribe")], s.acl_denied_subscriptions),
                ([("action", "deliver")], s.acl_denied_deliveries),
            ],
        )?;
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
            .map(|(r, n)| (reason_label(r), n))
            .collect();
        family(
            e,
            "ferrymq_disconnects",
            "Connections closed by the server for breaking a rule, by the reason code given.",
            COUNTER,
            disconnects
                .iter()
                .map(|(r, n)| ([("reason", r.as_str())], *n)),
        )?;
        one(
            e,
            "ferrymq_malformed_packets",
            "Packets that failed to decode (each closes its connection).",
            COUNTER,
            load(&net.malformed_packets),
        )
    }

    fn messages(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let (net, s) = (&self.net, &self.engine.stats);
        family(
            e,
            "ferrymq_messages_received",
            "PUBLISH packets accepted from clients, by QoS.",
            COUNTER,
            by_qos(&s.messages_received),
        )?;
        family(
            e,
            "ferrymq_messages_sent",
            "Messages delivered to subscribers, by QoS of the delivery (redeliveries not counted).",
            COUNTER,
            by_qos(&s.messages_sent),
        )?;
        family(
            e,
            "ferrymq_payload_bytes_received",
            "Payload bytes of accepted PUBLISH packets, by QoS.",
            COUNTER,
            by_qos(&s.payload_bytes_received),
        )?;
        family(
            e,
            "ferrymq_payload_bytes_sent",
            "Payload bytes of delivered messages, by QoS of the delivery.",
            COUNTER,
            by_qos(&s.payload_bytes_sent),
        )?;
        one(
            e,
            "ferrymq_bytes_received",
            "Bytes read from MQTT connections.",
            COUNTER,
            load(&net.bytes_received),
        )?;
        one(
            e,
            "ferrymq_bytes_sent",
            "Bytes written to MQTT connections.",
            COUNTER,
            load(&net.bytes_sent),
        )?;
        family(
            e,
            "ferrymq_messages_dropped",
            "Messages not delivered, by reason.",
            COUNTER,
            [
                ([("reason", "queue_full")], s.dropped_queue_full),
                ([("reason", "expired")], s.dropped_expired),
                ([("reason", "packet_too_large")], s.dropped_too_large),
                ([("reason", "no_subscribers")], s.dropped_no_subscribers),
                (
                    [("reason", "slow_consumer")],
                    load(&net.dropped_slow_consumer),
                ),
                ([("reason", "memory_high_watermark")], s.dropped_memory_high),
                ([("reason", "storage_full")], s.dropped_storage_full),
            ],
        )?;
        one(
            e,
            "ferrymq_publisher_pauses",
            "Times a publisher's input was held back because it fed a subscriber over its high mark.",
            COUNTER,
            load(&net.publisher_pauses),
        )?;
        one(
            e,
            "ferrymq_slow_subscribers",
            "Subscribers that stayed over their high mark past limits.slow_consumer_grace_ms.",
            COUNTER,
            load(&net.slow_subscribers),
        )?;
        family(
            e,
            "ferrymq_publishes_refused",
            "QoS 1/2 publishes refused (0x97, or a 3.1.1 connection closed), by reason: a full \
             session queue (queue_full = reject, or held past queue_full_timeout_ms), memory over \
             its high-water mark, or storage full (which also counts refused durable sessions \
             and their subscriptions).",
            COUNTER,
            [
                ([("reason", "queue_full")], s.refused_queue_full),
                ([("reason", "memory_high_watermark")], s.refused_memory_high),
                ([("reason", "storage_full")], s.refused_storage_full),
            ],
        )?;
        one(
            e,
            "ferrymq_acks_held",
            "QoS 1/2 publishes whose PUBACK/PUBREC was held for a full session queue \
             (mqtt.queue_full = backpressure).",
            COUNTER,
            s.acks_held_total,
        )?;
        one(
            e,
            "ferrymq_acks_held",
            "PUBACK/PUBREC held now for full session queues, or queued behind one that is.",
            GAUGE,
            s.held_acks,
        )?;
        one(
            e,
            "ferrymq_queued_messages_high_water",
            "Most QoS 1/2 messages one session has had queued (beyond those in flight) since start.",
            GAUGE,
            s.queued_high_water,
        )
    }

    fn state(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let en = &self.engine;
        one(
            e,
            "ferrymq_sessions",
            "Sessions, connected or not.",
            GAUGE,
            en.sessions as u64,
        )?;
        one(
            e,
            "ferrymq_subscriptions",
            "Subscriptions, shared memberships included.",
            GAUGE,
            en.subscriptions as u64,
        )?;
        one(
            e,
            "ferrymq_retained_messages",
            "Retained messages stored.",
            GAUGE,
            en.retained as u64,
        )?;
        one(
            e,
            "ferrymq_storage_disk_bytes",
            "Bytes of log segments on disk.",
            GAUGE,
            en.storage_disk_bytes,
        )?;
        one(
            e,
            "ferrymq_storage_held_actions",
            "Packets waiting for their journal records to be durable before they are sent.",
            GAUGE,
            en.storage_held_actions as u64,
        )?;
        one(
            e,
            "ferrymq_storage_blocked",
            "1 while a log write that found the disk full is being retried (its records are kept \
             in memory, durable work is refused), 0 otherwise.",
            GAUGE,
            u64::from(en.storage_blocked),
        )?;
        one(
            e,
            "ferrymq_process_resident_memory_bytes",
            "Resident memory of the broker process (what limits.memory_high_watermark compares).",
            GAUGE,
            self.rss,
        )?;
        family(
            e,
            "ferrymq_alarm_active",
            "1 while the alarm is raised (see GET /api/v1/alarms), 0 otherwise.",
            GAUGE,
            self.alarms
                .iter()
                .map(|a| ([("name", a.name.as_str())], u64::from(a.active))),
        )?;
        let net = &self.net;
        family(
            e,
            "ferrymq_config_reloads",
            "Config reloads, by result: ok (applied) or error (refused; the config in force stays).",
            COUNTER,
            [
                ([("result", "ok")], load(&net.config_reloads_ok)),
                ([("result", "error")], load(&net.config_reloads_error)),
            ],
        )?;
        one(
            e,
            "ferrymq_audit_dropped",
            "Audit records dropped because the audit log's queue was full.",
            COUNTER,
            load(&net.audit_dropped),
        )
    }

    fn latency(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let net = &self.net;
        histogram(
            e,
            "ferrymq_delivery_latency_seconds",
            "From the router step that accepted a PUBLISH to its encoding into the subscriber's \
             socket write, per delivery (millisecond resolution; retained and DUP deliveries \
             left out).",
            &net.delivery.histogram.snapshot(),
        )?;
        histogram(
            e,
            "ferrymq_router_step_duration_seconds",
            "Router steps (a batch of input: engine, log hand-off, dispatch); routing waits meanwhile.",
            &net.router_step.snapshot(),
        )?;
        let max = load(&net.router_step_max_us) as f64 / 1e6;
        e.encode_descriptor(
            "ferrymq_router_step_max_seconds",
            "The longest router step since start.",
            None,
            GAUGE,
        )?
        .encode_gauge(&max)?;
        one(
            e,
            "ferrymq_router_steps_over_10ms",
            "Router steps that took over 10 ms (routing stalled meanwhile).",
            COUNTER,
            load(&net.router_steps_over_10ms),
        )?;
        histogram(
            e,
            "ferrymq_storage_append_duration_seconds",
            "Log writes (one per group commit or router step), without their fsync.",
            &net.storage.append.snapshot(),
        )?;
        histogram(
            e,
            "ferrymq_storage_fsync_duration_seconds",
            "fdatasync calls on the log (storage.fsync = always: one per group; interval: one per interval with writes).",
            &net.storage.fsync.snapshot(),
        )?;
        histogram(
            e,
            "ferrymq_storage_checkpoint_duration_seconds",
            "Checkpoints: the router's time making their records and handing them to the log.",
            &net.storage.checkpoint.snapshot(),
        )
    }
}
