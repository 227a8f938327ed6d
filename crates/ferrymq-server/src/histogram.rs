//! Duration histograms that hot paths update with a few relaxed atomic adds, read at scrape
//! time (`metrics.rs` hands them to the Prometheus encoder).
//!
//! Not `prometheus_client::metrics::histogram::Histogram`: that one takes a mutex per
//! observation, and the router thread, the commit thread and every subscriber's writer record
//! here. Bounds are fixed at compile time, in microseconds; a value lands in the first bucket
//! whose bound is at least the value (Prometheus `le`), or in the last (`+Inf`) bucket.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Bounds for work measured in microseconds: a router step, a log write, an fsync, a
/// checkpoint (50 µs to 10 s).
pub(crate) const STEP_BOUNDS_US: &[u64] = &[
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 10_000_000,
];

/// Bounds for publish-to-deliver latency, which is measured in whole milliseconds (the
/// engine's clock): 1 ms to 60 s.
pub(crate) const LATENCY_BOUNDS_US: &[u64] = &[
    1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000, 60_000_000,
];

/// The most buckets a histogram here has (its bounds and `+Inf`).
const MAX_BUCKETS: usize = 17;

#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// One more than `bounds`: the last counts values above every bound.
    buckets: [AtomicU64; MAX_BUCKETS],
    sum_us: AtomicU64,
}

/// What a scrape reads: per-bucket counts (not cumulative) with their upper bounds in
/// seconds, the last `+Inf`; the sum in seconds; the count (the buckets' total, so the two
/// always agree even while observations land during the read).
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub buckets: Vec<(f64, u64)>,
    pub sum_seconds: f64,
    pub count: u64,
}

/// A duration histogram ([`STEP_BOUNDS_US`]).
impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(STEP_BOUNDS_US)
    }
}

impl Histogram {
    pub(crate) const fn new(bounds: &'static [u64]) -> Histogram {
        assert!(bounds.len() < MAX_BUCKETS);
        Histogram {
            bounds,
            buckets: [const { AtomicU64::new(0) }; MAX_BUCKETS],
            sum_us: AtomicU64::new(0),
        }
    }

    fn bucket(&self, us: u64) -> usize {
        self.bounds.partition_point(|&b| b < us)
    }

    /// Records one observation of `us` microseconds.
    pub fn observe_us(&self, us: u64) {
        self.buckets[self.bucket(us)].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    pub fn observe(&self, took: Duration) {
        self.observe_us(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let n = self.bounds.len() + 1;
        let mut buckets = Vec::with_capacity(n);
        let mut count = 0;
        for (i, b) in self.buckets[..n].iter().enumerate() {
            let c = b.load(Relaxed);
            count += c;
            let le = self
                .bounds
                .get(i)
                .map_or(f64::INFINITY, |&us| us as f64 / 1e6);
            buckets.push((le, c));
        }
        HistogramSnapshot {
            buckets,
            sum_seconds: self.sum_us.load(Relaxed) as f64 / 1e6,
            count,
        }
    }
}

/// Publish-to-deliver latencies of one write batch, counted locally and added to the shared
/// histogram once ([`LatencyBatch::flush`]): a subscriber's writer pays one clock read per
/// batch and a few atomic adds, not three per message.
///
/// What it measures: from the router step that accepted the PUBLISH (the message's
/// `received_at`, the engine's millisecond clock) to the writer encoding it into its next
/// socket write. Retained messages sent on subscribe and redeliveries (DUP) are left out;
/// messages that waited in a queue or an offline session count with their wait.
#[derive(Debug)]
pub(crate) struct LatencyBatch<'a> {
    histogram: &'a Histogram,
    clock: &'a EngineClock,
    /// The engine clock, read at the first delivery of the batch.
    now_ms: Option<u64>,
    counts: [u32; MAX_BUCKETS],
    sum_ms: u64,
}

impl<'a> LatencyBatch<'a> {
    pub(crate) fn new(histogram: &'a Histogram, clock: &'a EngineClock) -> LatencyBatch<'a> {
        LatencyBatch {
            histogram,
            clock,
            now_ms: None,
            counts: [0; MAX_BUCKETS],
            sum_ms: 0,
        }
    }

    /// Counts one delivery. By value, not `&mut self`: a writer's local that is ever
    /// borrowed stays in its `async` state across every later await (96 bytes in every
    /// connection's future, measured); moved in and out, it is gone before the write waits.
    #[must_use]
    pub(crate) fn record(mut self, d: &ferrymq_core::Delivery) -> Self {
        if d.retain || d.dup {
            return self;
        }
        let now = *self.now_ms.get_or_insert_with(|| self.clock.now_ms());
        let ms = now.saturating_sub(d.message.received_at.0);
        let i = self.histogram.bucket(ms.saturating_mul(1000));
        self.counts[i] = self.counts[i].saturating_add(1);
        self.sum_ms = self.sum_ms.saturating_add(ms);
        self
    }

    pub(crate) fn flush(self) {
        if self.now_ms.is_none() {
            return;
        }
        for (bucket, &n) in self.histogram.buckets.iter().zip(&self.counts) {
            if n > 0 {
                bucket.fetch_add(u64::from(n), Relaxed);
            }
        }
        self.histogram
            .sum_us
            .fetch_add(self.sum_ms.saturating_mul(1000), Relaxed);
    }
}

/// The engine's clock (`ferrymq_core::Time`, ms since the Unix epoch, advancing with the
/// monotonic clock from the router's start) for the network layer: the router sets the
/// offset once; readers add the process-wide monotonic [`crate::router::clock_ms`].
#[derive(Debug, Default)]
pub struct EngineClock {
    offset_ms: AtomicU64,
}

impl EngineClock {
    /// Called by the router when it starts: the engine's time is `epoch_ms` now.
    pub(crate) fn start(&self, epoch_ms: u64) {
        let offset = epoch_ms.saturating_sub(crate::router::clock_ms());
        self.offset_ms.store(offset, Relaxed);
    }

    pub(crate) fn now_ms(&self) -> u64 {
        self.offset_ms.load(Relaxed) + crate::router::clock_ms()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_on_a_bound_lands_in_that_bound_s_bucket_and_above_every_bound_in_inf() {
        static H: Histogram = Histogram::new(STEP_BOUNDS_US);
        H.observe_us(50);
        H.observe_us(51);
        H.observe_us(20_000_000);
        let s = H.snapshot();
        assert_eq!(s.buckets.len(), STEP_BOUNDS_US.len() + 1);
        assert_eq!(s.buckets[0], (0.00005, 1));
        assert_eq!(s.buckets[1], (0.0001, 1));
        assert_eq!(s.buckets.last(), Some(&(f64::INFINITY, 1)));
        assert_eq!(s.count, 3);
        assert!((s.sum_seconds - 20.000101).abs() < 1e-9);
    }

    fn delivery(received_ms: u64, retain: bool, dup: bool) -> ferrymq_core::Delivery {
        let message =
            ferrymq_core::Message::new("t", bytes::Bytes::new(), ferrymq_core::Time(received_ms));
        ferrymq_core::Delivery {
            message: std::sync::Arc::new(message),
            qos: ferrymq_mqtt::QoS::AtMostOnce,
            packet_id: None,
            dup,
            retain,
            subscription_ids: Vec::new(),
            expiry_remaining: None,
            attempt: None,
        }
    }

    #[test]
    fn a_batch_counts_live_deliveries_on_the_engine_clock_and_adds_them_once_flushed() {
        let h = Histogram::new(LATENCY_BOUNDS_US);
        let clock = EngineClock::default();
        clock.start(1_000_000);
        let now = clock.now_ms();
        let mut batch = LatencyBatch::new(&h, &clock);
        batch = batch.record(&delivery(now, false, false));
        batch = batch.record(&delivery(now.saturating_sub(30), false, false));
        // Retained on subscribe, and a redelivery: not a publish-to-deliver latency.
        batch = batch.record(&delivery(now.saturating_sub(90_000), true, false));
        batch = batch.record(&delivery(now.saturating_sub(90_000), false, true));
        assert_eq!(h.snapshot().count, 0, "nothing shared before the flush");
        batch.flush();
        let s = h.snapshot();
        assert_eq!(s.count, 2);
        // The clock may tick between the reads: 0-1 ms lands in the first bucket or the
        // second, 30-31 ms in the 50 ms one.
        assert_eq!(s.buckets[0].1 + s.buckets[1].1, 1, "{s:?}");
        assert_eq!(s.buckets[5], (0.05, 1), "{s:?}");
        assert!(s.sum_seconds >= 0.030 && s.sum_seconds <= 0.032, "{s:?}");
    }
}
