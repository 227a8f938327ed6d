//! What a benchmark run found, as a table or JSON.

use std::fmt::Write;

use serde::Serialize;

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub label: String,
    pub scenario: String,
    /// `tcp`, `tls`, `ws` or `wss`.
    pub transport: String,
    pub publishers: usize,
    pub subscribers: usize,
    pub qos: u8,
    pub payload: usize,
    /// Messages published (acknowledged, for QoS 1/2).
    pub published: u64,
    /// Deliveries expected: published × subscribers.
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub elapsed_secs: f64,
    /// Deliveries per second (received / elapsed).
    pub deliveries_per_sec: f64,
    /// Latency percentiles in microseconds, when measured.
    pub latency_us: Option<Latency>,
    /// Connections scenario: how many were held, and the broker's memory.
    pub connections: Option<Connections>,
    /// Queue scenario: what the consumers did besides acking.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueStats>,
    pub protocol_errors: Vec<String>,
    pub timed_out: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Connections {
    pub requested: usize,
    pub held: usize,
    pub failed: usize,
    pub broker_rss_before_kb: Option<u64>,
    pub broker_rss_after_kb: Option<u64>,
    pub kb_per_connection: Option<f64>,
    /// Seconds from the first connection attempt to the last CONNACK.
    pub setup_secs: f64,
    /// Connections set up per second (TCP, TLS/WebSocket handshakes, CONNECT/CONNACK).
    pub connections_per_sec: f64,
    /// Connections being set up at once.
    pub concurrency: usize,
    /// Why the first few connections that failed did.
    pub errors: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct QueueStats {
    pub queue: String,
    pub receive_maximum: u16,
    pub nack_once: bool,
    /// Deliveries nacked (PUBACK 0x80): with `nack_once`, every first delivery.
    pub nacked: u64,
    /// Deliveries whose `x-attempt` was above 1.
    pub redelivered: u64,
    /// Deliveries of messages from an earlier run, acked and not counted.
    pub stale: u64,
    /// Highest `x-attempt` seen (0: the broker sent none).
    pub max_attempt: u32,
}

impl Report {
    /// Why this run must fail the command, if it must.
    pub fn failure(&self) -> Option<String> {
        if let Some(e) = self.protocol_errors.first() {
            return Some(format!("protocol error: {e}"));
        }
        if self.qos > 0 && self.lost > 0 {
            return Some(format!("{} QoS {} messages lost", self.lost, self.qos));
        }
        if self.qos == 2 && self.duplicates > 0 {
            return Some(format!("{} QoS 2 messages duplicated", self.duplicates));
        }
        if let Some(c) = &self.connections {
            if c.failed > 0 {
                let first = c
                    .errors
                    .first()
                    .map(|e| format!(" (first: {e})"))
                    .unwrap_or_default();
                return Some(format!(
                    "{} of {} connections failed{first}",
                    c.failed, c.requested
                ));
            }
        }
        None
    }

    pub fn table(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "{} / {} over {}",
            self.label, self.scenario, self.transport
        );
        if let Some(c) = &self.connections {
            let _ = writeln!(
                o,
                "  setup                {:.0} connections/s ({:.3} s, {} at a time)",
                c.connections_per_sec, c.setup_secs, c.concurrency
            );
            let _ = writeln!(
                o,
                "  connections held     {} of {} ({} failed)",
                c.held, c.requested, c.failed
            );
            if let (Some(b), Some(a)) = (c.broker_rss_before_kb, c.broker_rss_after_kb) {
                let _ = writeln!(o, "  broker RSS           {b} KiB -> {a} KiB");
            }
            if let Some(k) = c.kb_per_connection {
                let _ = writeln!(o, "  per connection       {k:.2} KiB");
            }
            return o;
        }
        let _ = writeln!(
            o,
            "  {} pub -> {} sub, QoS {}, {} B payload",
            self.publishers, self.subscribers, self.qos, self.payload
        );
        let _ = writeln!(o, "  published            {}", self.published);
        let _ = writeln!(
            o,
            "  received             {} of {}",
            self.received, self.expected
        );
        let _ = writeln!(
            o,
            "  lost / dup / reorder {} / {} / {}",
            self.lost, self.duplicates, self.reordered
        );
        let _ = writeln!(
            o,
            "  elapsed              {:.3} s{}",
            self.elapsed_secs,
            if self.timed_out { " (timed out)" } else { "" }
        );
        if let Some(q) = &self.queue {
            let _ = writeln!(
                o,
                "  queue {:?}, receive maximum {}{}",
                q.queue,
                q.receive_maximum,
                if q.nack_once { ", nack once" } else { "" }
            );
            let _ = writeln!(
                o,
                "  nacked / redelivered {} / {} (highest x-attempt {}, {} stale)",
                q.nacked, q.redelivered, q.max_attempt, q.stale
            );
            let _ = writeln!(
                o,
                "  throughput           {:.0} msgs/s (published -> acked, distinct)",
                self.deliveries_per_sec
            );
        } else {
            let _ = writeln!(
                o,
                "  throughput           {:.0} deliveries/s",
                self.deliveries_per_sec
            );
        }
        if let Some(l) = &self.latency_us {
            let _ = writeln!(
                o,
                "  latency µs           p50 {} p90 {} p99 {} p99.9 {} max {}",
                l.p50, l.p90, l.p99, l.p999, l.max
            );
        }
        for e in &self.protocol_errors {
            let _ = writeln!(o, "  PROTOCOL ERROR       {e}");
        }
        o
    }
}
