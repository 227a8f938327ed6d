//! The per-queue metrics of `/metrics`, written straight into the text. With 1,000 queues
//! they are 20,000 of a scrape's ~20,200 samples (20 a queue), and prometheus-client's
//! generic encoder (about 100 ns a sample through its label-set and value encoders) made
//! each scrape cost 1.8-2.3 ms of CPU, enough to move the p99 of a paced latency run on two
//! cores (docs/performance.md). The text is the library's, byte for byte: the tests encode
//! the same queues both ways and compare.

use ferrymq_core::queues::QueueCounters;
use ferrymq_core::workqueue::Cause;

/// Whether a family's samples are counters (`_total`) or gauges.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

/// A family with one integer sample per queue.
struct PerQueue {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    value: fn(&QueueCounters) -> u64,
}

/// The families before `ferrymq_queue_oldest_age_seconds`, in the order they are written.
const BEFORE_AGE: &[PerQueue] = &[
    per_queue(
        Kind::Gauge,
        "ferrymq_queue_depth",
        "Messages waiting in the queue (ready or delayed).",
        |q| q.depth,
    ),
    per_queue(
        Kind::Gauge,
        "ferrymq_queue_leased",
        "Messages leased to consumers, not yet acknowledged.",
        |q| q.leased,
    ),
    per_queue(
        Kind::Gauge,
        "ferrymq_queue_delayed",
        "Waiting messages not due yet (a retry backoff or a delay).",
        |q| q.delayed,
    ),
    per_queue(
        Kind::Gauge,
        "ferrymq_queue_bytes",
        "Topic and payload bytes held (waiting and leased).",
        |q| q.bytes,
    ),
    per_queue(
        Kind::Gauge,
        "ferrymq_queue_cached_bytes",
        "Bytes of its messages held in memory (the rest are read back from the log).",
        |q| q.cached_bytes,
    ),
    per_queue(
        Kind::Counter,
        "ferrymq_queue_unreadable",
        "Messages whose record could not be read back from the log (dropped).",
        |q| q.unreadable,
    ),
    per_queue(
        Kind::Gauge,
        "ferrymq_queue_dead_letters",
        "Dead letters kept for the queue.",
        |q| q.dead_letters,
    ),
    per_queue(
        Kind::Gauge,
        "ferrymq_queue_consumers",
        "Consumers subscribed to the queue.",
        |q| q.consumers,
    ),
];

/// The families after it.
const AFTER_AGE: &[PerQueue] = &[
    per_queue(
        Kind::Counter,
        "ferrymq_queue_enqueued",
        "Messages that entered the queue.",
        |q| q.enqueued,
    ),
    per_queue(
        Kind::Counter,
        "ferrymq_queue_acked",
        "Messages acknowledged by a consumer.",
        |q| q.acked,
    ),
    per_queue(
        Kind::Counter,
        "ferrymq_queue_nacked",
        "Failed attempts: nacks, ack timeouts, lost consumers, restarts.",
        |q| q.nacked,
    ),
    per_queue(
        Kind::Counter,
        "ferrymq_queue_redelivered",
        "Deliveries after a failed attempt.",
        |q| q.redelivered,
    ),
    per_queue(
        Kind::Counter,
        "ferrymq_queue_refused",
        "Publishes the queue refused (full under reject_new, or nothing to displace).",
        |q| q.refused,
    ),
];

const fn per_queue(
    kind: Kind,
    name: &'static str,
    help: &'static str,
    value: fn(&QueueCounters) -> u64,
) -> PerQueue {
    PerQueue {
        name,
        help,
        kind,
        value,
    }
}

/// Appends every per-queue family for `queues` to `out`.
pub(super) fn write(out: &mut String, queues: &[QueueCounters]) {
    // Each name once, escaped as a label value, with its closing quote.
    let labels: Vec<String> = queues
        .iter()
        .map(|q| {
            let mut l = String::with_capacity(q.name.len() + 2);
            escape_into(&mut l, &q.name);
            l.push('"');
            l
        })
        .collect();
    out.reserve(queues.len() * 24 * 48);
    let mut int = itoa::Buffer::new();
    for family in BEFORE_AGE {
        write_family(out, family, queues, &labels, &mut int);
    }
    header(
        out,
        "ferrymq_queue_oldest_age_seconds",
        "Age of the oldest message held (0 when empty).",
        Kind::Gauge,
    );
    let mut float = dtoa::Buffer::new();
    for (q, label) in queues.iter().zip(&labels) {
        sample_start(out, "ferrymq_queue_oldest_age_seconds", Kind::Gauge, label);
        out.push_str(float.format_finite(q.oldest_age_ms as f64 / 1000.0));
        out.push('\n');
    }
    for family in AFTER_AGE {
        write_family(out, family, queues, &labels, &mut int);
    }
    let dropped = "ferrymq_queue_dropped";
    header(
        out,
        dropped,
        "Messages dropped from the queue unconsumed, by reason.",
        Kind::Counter,
    );
    for (q, label) in queues.iter().zip(&labels) {
        for (reason, n) in [
            ("overflow", q.dropped_overflow),
            ("expired", q.dropped_expired),
        ] {
            sample_start_with(out, dropped, label, "reason", reason);
            out.push_str(int.format(n));
            out.push('\n');
        }
    }
    let dead = "ferrymq_queue_dead_lettered";
    header(
        out,
        dead,
        "Messages that became dead letters, by cause.",
        Kind::Counter,
    );
    for (q, label) in queues.iter().zip(&labels) {
        for (cause, n) in Cause::ALL.iter().zip(q.dead_lettered) {
            sample_start_with(out, dead, label, "cause", cause.as_str());
            out.push_str(int.format(n));
            out.push('\n');
        }
    }
}

fn write_family(
    out: &mut String,
    family: &PerQueue,
    queues: &[QueueCounters],
    labels: &[String],
    int: &mut itoa::Buffer,
) {
    header(out, family.name, family.help, family.kind);
    for (q, label) in queues.iter().zip(labels) {
        sample_start(out, family.name, family.kind, label);
        out.push_str(int.format((family.value)(q)));
        out.push('\n');
    }
}

/// `# HELP` and `# TYPE`, both naming the samples (with `_total` for a counter). The help
/// texts here need no escaping.
fn header(out: &mut String, name: &str, help: &str, kind: Kind) {
    let (suffix, type_name) = match kind {
        Kind::Counter => ("_total", "counter"),
        Kind::Gauge => ("", "gauge"),
    };
    for (what, text) in [("# HELP ", help), ("# TYPE ", type_name)] {
        out.push_str(what);
        out.push_str(name);
        out.push_str(suffix);
        out.push(' ');
        out.push_str(text);
        out.push('\n');
    }
}

/// `name[_total]{queue="…"} ` up to the value.
fn sample_start(out: &mut String, name: &str, kind: Kind, label: &str) {
    out.push_str(name);
    if let Kind::Counter = kind {
        out.push_str("_total");
    }
    out.push_str("{queue=\"");
    out.push_str(label);
    out.push_str("} ");
}

/// `name_total{queue="…",key="value"} ` (counters with a second label).
fn sample_start_with(out: &mut String, name: &str, label: &str, key: &str, value: &str) {
    out.push_str(name);
    out.push_str("_total{queue=\"");
    out.push_str(label);
    out.push(',');
    out.push_str(key);
    out.push_str("=\"");
    escape_into(out, value);
    out.push_str("\"} ");
}

/// A label value as the text format escapes it: backslash, double quote and newline.
fn escape_into(out: &mut String, s: &str) {
    let mut last = 0;
    for (i, b) in s.bytes().enumerate() {
        let escaped = match b {
            b'\\' => "\\\\",
            b'"' => "\\\"",
            b'\n' => "\\n",
            _ => continue,
        };
        out.push_str(&s[last..i]);
        out.push_str(escaped);
        last = i + 1;
    }
    out.push_str(&s[last..]);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::fmt;
    use std::sync::Arc;

    use prometheus_client::collector::Collector;
    use prometheus_client::encoding::DescriptorEncoder;
    use prometheus_client::metrics::MetricType;
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::exposition::{family, COUNTER, GAUGE};

    /// The library's encoding of the same families: the oracle.
    #[derive(Debug)]
    struct Oracle(Vec<QueueCounters>);

    impl Collector for Oracle {
        fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
            queues(&mut enc, &self.0)
        }
    }

    fn library(queues: &[QueueCounters]) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Oracle(queues.to_vec())));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).unwrap();
        out
    }

    fn ours(queues: &[QueueCounters]) -> String {
        let mut out = String::new();
        write(&mut out, queues);
        out
    }

    /// Queues with every counter different, names that need escaping, ages with and
    /// without fractions.
    fn sample_queues() -> Vec<QueueCounters> {
        let names = [
            "jobs",
            "a\\b",
            "say \"hi\"",
            "two\nlines",
            "émoji-🚀",
            "",
            "x.y-z_0",
        ];
        names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let n = i as u64 * 100;
                QueueCounters {
                    name: Arc::from(*name),
                    depth: n + 1,
                    leased: n + 2,
                    delayed: n + 3,
                    bytes: u64::MAX - n,
                    dead_letters: n + 5,
                    consumers: n + 6,
                    cached_bytes: n + 7,
                    oldest_age_ms: [0, 1, 999, 1000, 1234, 86_400_123, 123_456_789_012][i],
                    enqueued: n + 9,
                    acked: n + 10,
                    nacked: n + 11,
                    redelivered: n + 12,
                    dropped_overflow: n + 13,
                    dropped_expired: n + 14,
                    refused: n + 15,
                    unreadable: n + 16,
                    dead_lettered: std::array::from_fn(|c| n + 20 + c as u64),
                }
            })
            .collect()
    }

    #[test]
    fn the_block_is_what_the_library_writes_byte_for_byte() {
        let queues = sample_queues();
        let (expected, got) = (library(&queues), ours(&queues));
        assert!(expected.contains(r#"queue="say \"hi\"""#), "{expected}");
        for (line, (e, g)) in expected.lines().zip(got.lines()).enumerate() {
            assert_eq!(e, g, "line {}", line + 1);
        }
        assert_eq!(expected, got);
    }

    #[test]
    fn no_queues_still_describe_every_family() {
        assert_eq!(library(&[]), ours(&[]));
        assert!(ours(&[]).contains("# TYPE ferrymq_queue_depth gauge\n"));
    }

    /// xorshift64: the same "random" queues on every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// 0, `u64::MAX`, a small number or any number.
        fn value(&mut self) -> u64 {
            match self.next() % 4 {
                0 => 0,
                1 => u64::MAX,
                2 => self.next() % 1000,
                _ => self.next(),
            }
        }

        /// Empty, 4 KiB, or a few characters, each one the text format escapes or one it
        /// must leave alone (`\r`, tab, braces, `,`, `=`, `#`, NUL, multi-byte).
        fn name(&mut self) -> String {
            const CHARS: &[char] = &[
                'a', 'Z', '0', '-', '_', '.', '\\', '"', '\n', '\r', '\t', ' ', '{', '}', ',', '=',
                '#', '\0', 'é', '🚀',
            ];
            let len = match self.next() % 8 {
                0 => 0,
                1 => 4096,
                n => n as usize * 3,
            };
            (0..len)
                .map(|_| CHARS[(self.next() % CHARS.len() as u64) as usize])
                .collect()
        }
    }

    /// The fixed sample has one value per field and seven names; here every field takes
    /// extreme and arbitrary values (ages that print with an exponent) and names take any
    /// mix of special characters, in 300 sets of up to 4 queues.
    #[test]
    fn random_names_and_counters_are_what_the_library_writes() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..300 {
            let queues: Vec<QueueCounters> = (0..rng.next() % 5)
                .map(|_| QueueCounters {
                    name: Arc::from(rng.name().as_str()),
                    depth: rng.value(),
                    leased: rng.value(),
                    delayed: rng.value(),
                    bytes: rng.value(),
                    dead_letters: rng.value(),
                    consumers: rng.value(),
                    cached_bytes: rng.value(),
                    oldest_age_ms: rng.value(),
                    enqueued: rng.value(),
                    acked: rng.value(),
                    nacked: rng.value(),
                    redelivered: rng.value(),
                    dropped_overflow: rng.value(),
                    dropped_expired: rng.value(),
                    refused: rng.value(),
                    unreadable: rng.value(),
                    dead_lettered: std::array::from_fn(|_| rng.value()),
                })
                .collect();
            let (expected, got) = (library(&queues), ours(&queues));
            let first = expected.lines().zip(got.lines()).find(|(e, g)| e != g);
            assert!(
                expected == got,
                "round {round}: (library, ours) first differ at {first:?}"
            );
        }
    }

    /// One sample per queue (`queue="name"`).
    fn per_queue(
        e: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        kind: MetricType,
        queues: &[QueueCounters],
        value: impl Fn(&QueueCounters) -> u64,
    ) -> fmt::Result {
        family(
            e,
            name,
            help,
            kind,
            queues.iter().map(|q| ([("queue", &*q.name)], value(q))),
        )
    }

    /// The per-queue families through the library, as /metrics wrote them before.
    fn queues(e: &mut DescriptorEncoder, q: &[QueueCounters]) -> fmt::Result {
        per_queue(
            e,
            "ferrymq_queue_depth",
            "Messages waiting in the queue (ready or delayed).",
            GAUGE,
            q,
            |v| v.depth,
        )?;
        per_queue(
            e,
            "ferrymq_queue_leased",
            "Messages leased to consumers, not yet acknowledged.",
            GAUGE,
            q,
            |v| v.leased,
        )?;
        per_queue(
            e,
            "ferrymq_queue_delayed",
            "Waiting messages not due yet (a retry backoff or a delay).",
            GAUGE,
            q,
            |v| v.delayed,
        )?;
        per_queue(
            e,
            "ferrymq_queue_bytes",
            "Topic and payload bytes held (waiting and leased).",
            GAUGE,
            q,
            |v| v.bytes,
        )?;
        per_queue(
            e,
            "ferrymq_queue_cached_bytes",
            "Bytes of its messages held in memory (the rest are read back from the log).",
            GAUGE,
            q,
            |v| v.cached_bytes,
        )?;
        per_queue(
            e,
            "ferrymq_queue_unreadable",
            "Messages whose record could not be read back from the log (dropped).",
            COUNTER,
            q,
            |v| v.unreadable,
        )?;
        per_queue(
            e,
            "ferrymq_queue_dead_letters",
            "Dead letters kept for the queue.",
            GAUGE,
            q,
            |v| v.dead_letters,
        )?;
        per_queue(
            e,
            "ferrymq_queue_consumers",
            "Consumers subscribed to the queue.",
            GAUGE,
            q,
            |v| v.consumers,
        )?;
        let mut m = e.encode_descriptor(
            "ferrymq_queue_oldest_age_seconds",
            "Age of the oldest message held (0 when empty).",
            None,
            GAUGE,
        )?;
        for v in q {
            let age = v.oldest_age_ms as f64 / 1000.0;
            m.encode_family(&[("queue", &*v.name)])?
                .encode_gauge(&age)?;
        }
        per_queue(
            e,
            "ferrymq_queue_enqueued",
            "Messages that entered the queue.",
            COUNTER,
            q,
            |v| v.enqueued,
        )?;
        per_queue(
            e,
            "ferrymq_queue_acked",
            "Messages acknowledged by a consumer.",
            COUNTER,
            q,
            |v| v.acked,
        )?;
        per_queue(
            e,
            "ferrymq_queue_nacked",
            "Failed attempts: nacks, ack timeouts, lost consumers, restarts.",
            COUNTER,
            q,
            |v| v.nacked,
        )?;
        per_queue(
            e,
            "ferrymq_queue_redelivered",
            "Deliveries after a failed attempt.",
            COUNTER,
            q,
            |v| v.redelivered,
        )?;
        per_queue(
            e,
            "ferrymq_queue_refused",
            "Publishes the queue refused (full under reject_new, or nothing to displace).",
            COUNTER,
            q,
            |v| v.refused,
        )?;
        family(
            e,
            "ferrymq_queue_dropped",
            "Messages dropped from the queue unconsumed, by reason.",
            COUNTER,
            q.iter().flat_map(|v| {
                let n = &*v.name;
                [
                    ([("queue", n), ("reason", "overflow")], v.dropped_overflow),
                    ([("queue", n), ("reason", "expired")], v.dropped_expired),
                ]
            }),
        )?;
        family(
            e,
            "ferrymq_queue_dead_lettered",
            "Messages that became dead letters, by cause.",
            COUNTER,
            q.iter().flat_map(|v| {
                let n = &*v.name;
                Cause::ALL
                    .iter()
                    .zip(v.dead_lettered)
                    .map(move |(c, count)| ([("queue", n), ("cause", c.as_str())], count))
            }),
        )
    }
}
